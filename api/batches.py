"""The batches resource: many generation requests at once, their progress, results in input order, cancel.

A batch arrives as JSON ({"requests": [...], "metadata"?}) or as a JSONL upload (one {"custom_id",
"body"} a line), read line by line from the request stream so the API's memory does not grow with
the upload. Every item is checked with the jobs' own schema while its record is written (a chunk at
a time, nothing queued); only when all are valid are they queued, on the device's batch queue.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterator
from typing import IO, Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request, url_for
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from api.auth import current_owner
from api.errors import ApiError, error_response
from api.jobs import iso, json_body
from api.openapi import document
from api.schemas import ErrorSchema, GenerationSchema
from tasks.batches import WRITE_CHUNK, BatchItem, BatchRecord, BatchStore
from tasks.states import BatchState

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")

JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "application/jsonlines")
MAX_LISTED_ERRORS = 100  # invalid items named in a 400; all are counted
MAX_CUSTOM_ID_CHARS = 512
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
DEFAULT_PAGE, MAX_PAGE = 20, 100
JSONL_LINE_FIELDS = ("custom_id", "body")
READ_BUFFER_BYTES = 1 << 16


def init_app(app: Flask) -> None:
    app.extensions["genqueue.batches"] = BatchStore(app.extensions["genqueue.store"], app.config["BATCH_TTL_S"])
    app.register_blueprint(bp)


def batches() -> BatchStore:
    return current_app.extensions["genqueue.batches"]


def batch_view(record: BatchRecord) -> dict:
    return {
        "id": record.id,
        "object": "batch",
        "status": record.status.value,
        "request_counts": {
            "total": record.total,
            "completed": record.completed,
            "failed": record.failed,
            "cancelled": record.cancelled,
        },
        "usage": {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens,
        },
        "metadata": record.metadata,
        "created_at": iso(record.created_at),
        **{name: iso(record.timestamps.get(name)) for name in BatchRecord.TIMESTAMPS},
        "expires_at": iso(record.expires_at),
        "error": record.error,
        "results_url": url_for("batches.batch_results", batch_id=record.id),
    }


def result_line(entry: dict[str, Any]) -> dict[str, Any]:
    """An item's line in the results: its result (a cancelled one's partial output too), or its error."""
    end = entry["end"]
    line = {"custom_id": entry["custom_id"], "index": entry["index"]}
    if end.get("result") is not None:
        line["result"] = end["result"]
    elif end.get("error"):
        line["error"] = end["error"]
    else:  # cancelled before it ran
        line["error"] = {"code": end.get("status", "cancelled"), "message": "the request was cancelled before it ran"}
    return line


def get_record(batch_id: str) -> BatchRecord:
    """The batch, if it exists and belongs to the caller's key: another key's batch is a 404 too."""
    record = batches().get(batch_id)
    if record is None or record.owner != (current_owner() or ""):
        raise ApiError(404, "batch_not_found", f"no batch {batch_id!r} (unknown, or expired)")
    return record


# -- reading the upload ----------------------------------------------------------------------------


def too_large(what: str) -> ApiError:
    return ApiError(413, "batch_too_large", what)


@bp.errorhandler(RequestEntityTooLarge)
def _body_too_large(_exc: RequestEntityTooLarge):
    """werkzeug stops a chunked body at request.max_content_length: the same answer as our own count."""
    max_bytes = current_app.config["BATCH_MAX_BYTES"]
    error = too_large(f"the batch is larger than {max_bytes} bytes (GENQUEUE_BATCH_MAX_BYTES)")
    return error_response(error.status, error.code, error.message)


def jsonl_lines(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for each non-blank line, never holding more than one line."""
    if isinstance(stream, io.RawIOBase):  # werkzeug's LimitedStream reads a line a byte at a time
        stream = io.BufferedReader(stream, READ_BUFFER_BYTES)
    read = line_number = 0
    while True:
        line = stream.readline(max_bytes - read + 1)
        if not line:
            return
        read += len(line)
        if read > max_bytes:
            raise too_large(f"the batch is larger than {max_bytes} bytes (GENQUEUE_BATCH_MAX_BYTES)")
        line_number += 1
        if line.strip():
            yield line_number, line


def jsonl_items(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[int, Any]]:
    """(line number, the line's JSON document, or a ValidationError) for each line of a JSONL upload."""
    for line_number, line in jsonl_lines(stream, max_bytes):
        try:
            yield line_number, json.loads(line)
        except ValueError as exc:
            yield line_number, ValidationError({"_schema": [f"Not valid JSON: {exc}"]})


def check_item(schema: GenerationSchema, raw: Any, jsonl: bool) -> BatchItem:
    """A request of the batch as a job's request, or a ValidationError naming its bad fields. A JSON
    batch's request is a job's body plus an optional custom_id; a JSONL line is {"custom_id", "body"},
    and the body's problems are named under "body"."""
    if isinstance(raw, ValidationError):
        raise raw
    if not isinstance(raw, dict):
        shape = '{"custom_id", "body": {...}}' if jsonl else "a job's request and an optional custom_id"
        raise ValidationError({"_schema": [f"Must be a JSON object: {shape}."]})
    problems: dict[str, Any] = {}
    if jsonl:
        problems.update({name: ["Unknown field."] for name in sorted(set(raw) - set(JSONL_LINE_FIELDS))})
        custom_id, body = raw.get("custom_id"), raw.get("body")
        if not isinstance(body, dict):
            problems["body"] = ["Missing or not an object: a job's request."]
            body = None
    else:
        body = dict(raw)
        custom_id = body.pop("custom_id", None)
    if custom_id is not None and (not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS):
        problems["custom_id"] = [f"Must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters."]
    params: dict[str, Any] = {}
    if body is not None:
        request_problems: dict[str, Any] = {}
        try:
            params = schema.load(body)
        except ValidationError as exc:
            request_problems = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        if body.get("stream") is True:
            request_problems["stream"] = ["Not available in a batch: read the batch's results instead."]
        if request_problems:
            problems.update({"body": request_problems} if jsonl else request_problems)
    if problems:
        raise ValidationError(problems)
    params.pop("stream", None)
    return BatchItem(custom_id=custom_id, request=params)


def check_metadata(metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA_PAIRS
        or not all(isinstance(k, str) and 1 <= len(k) <= MAX_METADATA_KEY_CHARS for k in metadata)
        or not all(isinstance(v, str) and len(v) <= MAX_METADATA_VALUE_CHARS for v in metadata.values())
    ):
        message = (
            f"Must be an object of at most {MAX_METADATA_PAIRS} string pairs, keys of 1 to "
            f"{MAX_METADATA_KEY_CHARS} characters, values of at most {MAX_METADATA_VALUE_CHARS}."
        )
        raise ApiError(400, "invalid_request", "invalid fields: metadata", {"metadata": [message]})
    return metadata


def metadata_from_query() -> dict[str, str]:
    raw = request.args.get("metadata")
    if raw is None:
        return {}
    try:
        return check_metadata(json.loads(raw))
    except ValueError:
        raise ApiError(
            400, "invalid_request", "invalid fields: metadata", {"metadata": ["Must be a JSON object."]}
        ) from None


# -- views -------------------------------------------------------------------------------------------


@bp.post("")
@document(
    "Submit a batch of generation requests",
    description=(
        'JSON {"requests": [{"custom_id"?, ...job body}], "metadata"?} or a JSONL upload (Content-Type: '
        'application/jsonl, one {"custom_id"?, "body": {...}} a line, metadata as ?metadata=<JSON>). Every item is '
        "validated before anything is queued."
    ),
    tags=["Batches"],
    responses={
        201: ("The batch (Location: /v1/batches/<id>)", None),
        400: ("Invalid items, listed by index or line and field", ErrorSchema),
        413: ("Too many items or bytes", ErrorSchema),
        415: ("Neither JSON nor JSONL", ErrorSchema),
    },
)
def create_batch():
    """Validate every request, write the items, then queue them all: 201 with the batch."""
    max_bytes = int(current_app.config["BATCH_MAX_BYTES"])
    request.max_content_length = max_bytes  # werkzeug stops reading there too, even a chunked body
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(f"the batch is larger than {max_bytes} bytes (GENQUEUE_BATCH_MAX_BYTES)")
    if request.mimetype in JSONL_TYPES:
        metadata = metadata_from_query()
        items, where = jsonl_items(request.stream, max_bytes), "lines"
    elif request.is_json:
        body = json_body()
        unknown = sorted(set(body) - {"requests", "metadata"})
        if unknown:
            raise ApiError(
                400,
                "invalid_request",
                f"invalid fields: {', '.join(unknown)}",
                {k: ["Unknown field."] for k in unknown},
            )
        if not isinstance(body.get("requests"), list):
            raise ApiError(
                400, "invalid_request", "invalid fields: requests", {"requests": ["Missing or not an array."]}
            )
        metadata = check_metadata(body.get("metadata"))
        items, where = enumerate(body["requests"]), "requests"
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the batch as JSON (Content-Type: application/json) or JSONL (Content-Type: application/jsonl)",
        )
    record = build_batch(items, where, metadata)
    location = url_for("batches.get_batch", batch_id=record.id)
    return jsonify(batch_view(record)), 201, {"Location": location}


def build_batch(items: Iterator[tuple[int, Any]], where: str, metadata: dict) -> BatchRecord:
    """Write the items a chunk at a time while checking each; refuse the batch (discarding what was
    written) if any is invalid or a limit is passed; else queue every item."""
    store, owner = batches(), current_owner()
    queue = current_app.config["DEFAULT_QUEUE"]
    max_items = int(current_app.config["BATCH_MAX_ITEMS"])
    batch_id = "batch_" + secrets.token_urlsafe(18)
    schema = GenerationSchema()
    store.create(batch_id, owner, queue, metadata)
    total = written = invalid = 0
    errors: dict[str, Any] = {}
    chunk: list[BatchItem] = []
    try:
        for position, raw in items:
            total += 1
            if total > max_items:
                raise too_large(f"the batch has more than {max_items} requests (GENQUEUE_BATCH_MAX_ITEMS)")
            try:
                item = check_item(schema, raw, jsonl=where == "lines")
            except ValidationError as exc:
                invalid += 1
                if len(errors) < MAX_LISTED_ERRORS:
                    errors[str(position)] = exc.messages
                continue
            if invalid:
                continue  # the batch will be refused: check the rest, write nothing more
            chunk.append(item)
            if len(chunk) == WRITE_CHUNK:
                store.add_items(batch_id, owner, queue, written, chunk)
                written += len(chunk)
                chunk = []
        if invalid or not total:
            raise invalid_batch(where, total, invalid, errors)
        if chunk:
            store.add_items(batch_id, owner, queue, written, chunk)
            written += len(chunk)
    except BaseException:
        store.discard(batch_id, owner, written)
        raise
    try:
        store.enqueue(current_app.extensions["genqueue.celery"], batch_id, queue, total)
    except Exception as exc:
        current_app.logger.exception("batch %s: queueing failed", batch_id)
        store.fail(batch_id, total, {"code": "enqueue_failed", "message": f"queueing the items failed: {exc}"})
        raise
    current_app.logger.info("batch %s: %d requests queued on %s", batch_id, total, queue)
    return store.get(batch_id)


def invalid_batch(where: str, total: int, invalid: int, errors: dict[str, Any]) -> ApiError:
    if not total:
        return ApiError(400, "invalid_request", "the batch has no requests", {where: ["Must hold at least one."]})
    unit = "line" if where == "lines" else "index"
    listed = ", ".join(errors)
    more = f" and {invalid - len(errors)} more" if invalid > len(errors) else ""
    return ApiError(
        400,
        "invalid_batch",
        f"{invalid} of {total} requests are invalid (by {unit}: {listed}{more}); nothing was queued",
        {where: errors},
    )


@bp.get("")
@document(
    "List your batches, newest first",
    tags=["Batches"],
    parameters=[
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
        },
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
    ],
    responses={200: ("A page of batches", None), 400: ("An invalid limit or after", ErrorSchema)},
)
def list_batches():
    """The caller's batches, newest first: ?limit= (1 to 100) and ?after=<id> of the last one seen."""
    raw_limit = request.args.get("limit", str(DEFAULT_PAGE))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise ApiError(
            400, "invalid_request", f"limit must be from 1 to {MAX_PAGE}", {"limit": [f"Must be 1 to {MAX_PAGE}."]}
        )
    after = request.args.get("after") or None
    try:
        records, has_more = batches().list(current_owner(), int(raw_limit), after)
    except KeyError:
        raise ApiError(
            400, "invalid_request", f"no batch {after!r} to list after", {"after": ["Not one of your batches."]}
        ) from None
    data = [batch_view(record) for record in records]
    return jsonify(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


@bp.get("/<batch_id>")
@document(
    "Read a batch: status, request counts, usage, timestamps",
    tags=["Batches"],
    responses={200: ("The batch", None), 404: ("Unknown or expired batch", ErrorSchema)},
)
def get_batch(batch_id: str):
    return jsonify(batch_view(get_record(batch_id)))


@bp.get("/<batch_id>/results")
@document(
    "The batch's results as JSONL, in input order",
    description='One {"custom_id", "index", "result" | "error"} line per ended request; while running, those so far.',
    tags=["Batches"],
    responses={200: ("JSONL lines", None, "application/jsonl"), 404: ("Unknown or expired batch", ErrorSchema)},
)
def batch_results(batch_id: str):
    """JSONL, one line per ended item in input order; while the batch runs, those ended so far."""
    record = get_record(batch_id)
    store = batches()

    def lines() -> Iterator[str]:
        for entry in store.results(batch_id, record.total):
            yield json.dumps(result_line(entry), ensure_ascii=False) + "\n"

    headers = {"X-Batch-Status": record.status.value, "X-Batch-Ended": str(record.ended)}
    return Response(lines(), mimetype="application/jsonl", headers=headers)


@bp.post("/<batch_id>/cancel")
@document(
    "Cancel a batch: queued items never run, running ones stop",
    tags=["Batches"],
    responses={
        200: ("The batch, cancelled", None),
        202: ("The batch, cancelling", None),
        404: ("Unknown or expired batch", ErrorSchema),
        409: ("The batch already ended", ErrorSchema),
    },
)
def cancel_batch(batch_id: str):
    """Cancel: queued items never run, running ones stop within a few tokens, ended ones keep their
    results. 200 once cancelled, 202 while running items stop; 409 for a batch that already ended."""
    get_record(batch_id)
    status = batches().cancel(batch_id)
    if status is None:
        raise ApiError(404, "batch_not_found", f"no batch {batch_id!r} (unknown, or expired)")
    if status in (BatchState.COMPLETED, BatchState.FAILED):
        raise ApiError(409, "batch_already_ended", f"batch {batch_id!r} already {status.value}; nothing to cancel")
    current_app.logger.info("batch %s: cancel requested (%s)", batch_id, status.value)
    return jsonify(batch_view(get_record(batch_id))), 200 if status is BatchState.CANCELLED else 202
