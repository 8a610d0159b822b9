"""The batches resource: many generation requests at once, their progress, results in input order, cancel.

A batch arrives as JSON ({"requests": [...], "metadata"?}) or as a JSONL upload (one {"custom_id",
"body"} a line), read line by line from the request stream so the API's memory does not grow with
the upload. Every item is checked with the jobs' own schema while the batch service writes it (a
chunk at a time, nothing queued); only when all are valid are they queued, on the device's batch queue.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import IO, Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from api.errors import ApiError, render
from api.http import PAGE_PARAMETERS, check_text, json_body, list_page, owner, page_limit, parse_json
from api.openai import batches as openai_batches
from api.openai.batches import OpenAIBatchObjectSchema, OpenAIBatchSchema
from api.openai.protocol import OpenAIErrorSchema
from api.openapi import JSON, document
from api.schemas import (
    METADATA_RULE,
    BatchCreateSchema,
    BatchListSchema,
    BatchSchema,
    ErrorSchema,
    GenerationSchema,
    is_metadata,
    to_submission,
)
from api.service import batch_service, model_service
from api.service.batches import Checked, too_large
from api.service.models import RequestCheck, request_problems
from tasks.store.batches import BatchRequest
from tasks.store.views import batch_view

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")

ANY_BATCH = {"oneOf": [BatchSchema, OpenAIBatchObjectSchema]}  # by the form it was made in
EITHER_ERROR = {"oneOf": [ErrorSchema, OpenAIErrorSchema]}  # OpenAI's form is answered in OpenAI's shape
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "application/jsonlines")
MAX_CUSTOM_ID_CHARS = 512
JSONL_LINE_FIELDS = ("custom_id", "body")
READ_BUFFER_BYTES = 1 << 16


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


# -- reading the upload ----------------------------------------------------------------------------


@bp.errorhandler(RequestEntityTooLarge)
def _body_too_large(_exc: RequestEntityTooLarge):
    """werkzeug stops a chunked body at request.max_content_length: the same answer as our own count."""
    setting = "BATCH_MAX_BYTES" if request.mimetype in JSONL_TYPES else "BATCH_MAX_JSON_BYTES"
    max_bytes = current_app.config[setting]
    return render(too_large(f"the batch is larger than {max_bytes} bytes (GENQUEUE_{setting})"))


def jsonl_lines(stream: IO[bytes], max_bytes: int, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for each non-blank line, never holding more than one line of at most
    max_line_bytes: a longer line, or more than max_bytes in all, is a 413 naming the limit."""
    if isinstance(stream, io.RawIOBase):  # werkzeug's LimitedStream reads a line a byte at a time
        stream = io.BufferedReader(stream, READ_BUFFER_BYTES)
    read = line_number = 0
    while True:
        line = stream.readline(min(max_line_bytes, max_bytes - read) + 1)
        if not line:
            return
        read += len(line)
        line_number += 1
        if read > max_bytes:
            raise too_large(f"the batch is larger than {max_bytes} bytes (GENQUEUE_BATCH_MAX_BYTES)")
        if len(line.rstrip(b"\r\n")) > max_line_bytes:
            limit = f"{max_line_bytes} bytes (GENQUEUE_BATCH_MAX_LINE_BYTES)"
            raise too_large(f"line {line_number} of the batch is longer than {limit}")
        if line.strip():
            yield line_number, line


def jsonl_items(stream: IO[bytes], max_bytes: int, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    """(line number, the line's JSON document, or a ValidationError) for each line of a JSONL upload."""
    for line_number, line in jsonl_lines(stream, max_bytes, max_line_bytes):
        try:
            document = parse_json(line, "the line")
            check_text(document)
            yield line_number, document
        except ApiError as exc:
            yield line_number, ValidationError({"_schema": [f"Not valid JSON: {exc.message}"]})
        except UnicodeError as exc:  # a lone surrogate
            yield line_number, ValidationError({"_schema": [f"Not valid text: {exc}"]})


def check_item(schema: GenerationSchema, raw: Any, jsonl: bool, check: RequestCheck) -> BatchRequest:
    """A request of the batch as a job's request, or a ValidationError naming its bad fields. A JSON
    batch's request is a job's body plus an optional custom_id; a JSONL line is {"custom_id", "body"},
    and the body's problems are named under "body". A request the served model cannot run (its
    context, its LoRA variants) is refused here, as POST /v1/jobs refuses it (ModelService.request_check)."""
    if isinstance(raw, ValidationError):
        raise raw
    if not isinstance(raw, dict):
        shape = '{"custom_id", "body": {...}}' if jsonl else "a job's request and an optional custom_id"
        raise ValidationError({"_schema": [f"Must be a JSON object: {shape}."]})
    custom_id, body, problems = split_line(raw) if jsonl else (raw.get("custom_id"), _without_id(raw), {})
    if custom_id is not None and (not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS):
        problems["custom_id"] = [f"Must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters."]
    data, body_problems = check_body(schema, body)
    request = None
    if not body_problems and body is not None:
        request = to_submission(data).request
        body_problems = request_problems(check, request)
    if body_problems:
        problems.update({"body": body_problems} if jsonl else body_problems)
    if problems or request is None:
        raise ValidationError(problems)
    return BatchRequest(custom_id=custom_id, request=request.to_dict())


def split_line(line: dict) -> tuple[Any, dict | None, dict[str, Any]]:
    """A JSONL line's custom_id and body, and the problems of its shape."""
    problems: dict[str, Any] = {name: ["Unknown field."] for name in sorted(set(line) - set(JSONL_LINE_FIELDS))}
    body = line.get("body")
    if not isinstance(body, dict):
        problems["body"] = ["Missing or not an object: a job's request."]
        body = None
    return line.get("custom_id"), body, problems


def _without_id(request_body: dict) -> dict:
    return {name: value for name, value in request_body.items() if name != "custom_id"}


def check_body(schema: GenerationSchema, body: dict | None) -> tuple[dict, dict[str, Any]]:
    """A batch request's body loaded by the jobs' schema, and its problems (stream is refused)."""
    if body is None:
        return {}, {}
    data, problems = {}, {}
    try:
        data = schema.load(body)
    except ValidationError as exc:
        problems = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    if body.get("stream") is True:
        problems["stream"] = ["Not available in a batch: read the batch's results instead."]
    if "webhook" in body:
        problems["webhook"] = ["Not available per request: give the batch a webhook, told once when it ends."]
    if "metadata" in body:
        problems["metadata"] = ["Not available per request: give the batch metadata; custom_id names a request."]
    return data, problems


def checked_items(items: Iterator[tuple[int, Any]], jsonl: bool, check: RequestCheck) -> Iterator[Checked]:
    """(position, the request or its problems) for each request of the upload."""
    schema = GenerationSchema()
    for position, raw in items:
        try:
            yield position, check_item(schema, raw, jsonl, check)
        except ValidationError as exc:
            yield position, exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}


def check_metadata(metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not is_metadata(metadata):
        raise ApiError(400, "invalid_request", "invalid fields: metadata", {"metadata": [METADATA_RULE]})
    return metadata


def metadata_from_query() -> dict[str, str]:
    raw = request.args.get("metadata")
    if raw is None:
        return {}
    try:
        metadata = parse_json(raw, "metadata")
        check_text(metadata)
    except ApiError as exc:
        raise ApiError(400, "invalid_request", "invalid fields: metadata", {"metadata": [exc.message]}) from None
    except UnicodeError as exc:
        raise ApiError(400, "invalid_unicode", f"metadata is not valid text: {exc}") from None
    return check_metadata(metadata)


# -- views -------------------------------------------------------------------------------------------


@bp.post("")
@document(
    "Submit a batch of generation requests",
    description=(
        'JSON {"requests": [{"custom_id"?, ...job body}], "metadata"?, "webhook"?} or a JSONL upload (Content-Type: '
        'application/jsonl, one {"custom_id"?, "body": {...}} a line, metadata as ?metadata=<JSON>, webhook as '
        "?webhook=<URL>), or OpenAI's form {input_file_id, endpoint, completion_window, metadata?} (an uploaded "
        "file's lines; answered in OpenAI's shape, 200). Every item is validated before anything is queued. A "
        "webhook receives one signed POST when the batch ends (batch.completed, batch.completed_with_errors, "
        "batch.failed or batch.cancelled)."
    ),
    tags=["Batches"],
    # The JSONL form (Content-Type: application/jsonl) is in the description: generated clients take one
    # media type a body.
    request={JSON: {"oneOf": [BatchCreateSchema, OpenAIBatchSchema]}},
    headers={201: ["Location"], 200: ["Location"]},
    examples={
        "request": {
            "requests": [
                {"custom_id": "q1", "prompt": "What is the capital of France?", "max_tokens": 32},
                {"custom_id": "q2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32},
            ],
            "metadata": {"run": "nightly"},
        }
    },
    responses={
        201: ("The batch (a JSON or JSONL batch)", BatchSchema),
        200: ("The batch in OpenAI's shape (made from an uploaded file: input_file_id)", OpenAIBatchObjectSchema),
        400: (
            "Invalid items, listed by index or line and field (OpenAI's error shape for input_file_id)",
            EITHER_ERROR,
        ),
        404: ("An input_file_id that is not one of your files, or a model that is not served", EITHER_ERROR),
        413: ("Too many items or bytes", ErrorSchema),
        415: ("Neither JSON nor JSONL", ErrorSchema),
        503: ("Redis is unreachable or full", EITHER_ERROR),
    },
)
def create_batch():
    """Validate every request, write the items, then queue them all: 201 with the batch."""
    jsonl = request.mimetype in JSONL_TYPES
    # A JSON body is parsed whole (about ten times its size in memory): it gets a lower cap than JSONL.
    setting = "BATCH_MAX_BYTES" if jsonl else "BATCH_MAX_JSON_BYTES"
    max_bytes = int(current_app.config[setting])
    request.max_content_length = max_bytes  # werkzeug stops reading there too, even a chunked body
    if request.content_length is not None and request.content_length > max_bytes:
        hint = "" if jsonl else "; send larger batches as JSONL"
        raise too_large(f"the batch is larger than {max_bytes} bytes (GENQUEUE_{setting}){hint}")
    if jsonl:
        metadata, webhook = metadata_from_query(), request.args.get("webhook")
        line_cap = int(current_app.config["BATCH_MAX_LINE_BYTES"])
        items, where = jsonl_items(request.stream, max_bytes, line_cap), "lines"
    elif request.is_json:
        body = json_body()
        if "input_file_id" in body:  # OpenAI's form: the requests are the lines of an uploaded file
            return openai_batches.create(body)
        unknown = sorted(set(body) - {"requests", "metadata", "webhook"})
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
        metadata, webhook = check_metadata(body.get("metadata")), body.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            raise ApiError(400, "invalid_request", "invalid fields: webhook", {"webhook": ["Must be a URL string."]})
        items, where = enumerate(body["requests"]), "requests"
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the batch as JSON (Content-Type: application/json) or JSONL (Content-Type: application/jsonl)",
        )
    check = model_service().request_check(batch_service().queue)
    record = batch_service().create(checked_items(items, where == "lines", check), where, owner(), metadata, webhook)
    location = url_for("batches.get_batch", batch_id=record.id)
    return jsonify(batch_view(record)), 201, {"Location": location}


@bp.get("")
@document(
    "List your batches, newest first",
    tags=["Batches"],
    parameters=PAGE_PARAMETERS,
    responses={200: ("A page of batches", BatchListSchema), 400: ("An invalid limit or after", ErrorSchema)},
)
def list_batches():
    """The caller's batches, newest first: ?limit= (1 to 100) and ?after=<id> of the last one seen."""
    records, has_more = batch_service().list(owner(), page_limit(), request.args.get("after") or None)
    return list_page([batch_view(record) for record in records], has_more)


@bp.get("/<batch_id>")
@document(
    "Read a batch: status, request counts, usage, timestamps",
    tags=["Batches"],
    responses={200: ("The batch", ANY_BATCH), 404: ("Unknown or expired batch", ErrorSchema)},
)
def get_batch(batch_id: str):
    return jsonify(batch_view(batch_service().get(batch_id, owner())))


@bp.get("/<batch_id>/results")
@document(
    "The batch's results as JSONL, in input order",
    description='One {"custom_id", "index", "result" | "error"} line per ended request; while running, those so far.',
    tags=["Batches"],
    headers={200: ["X-Batch-Status", "X-Batch-Ended"]},
    responses={200: ("JSONL lines", None, "application/jsonl"), 404: ("Unknown or expired batch", ErrorSchema)},
)
def batch_results(batch_id: str):
    """JSONL, one line per ended item in input order; while the batch runs, those ended so far."""
    record, entries = batch_service().results(batch_id, owner())

    def lines() -> Iterator[str]:
        for entry in entries:
            yield json.dumps(result_line(entry), ensure_ascii=False) + "\n"

    headers = {"X-Batch-Status": record.status.value, "X-Batch-Ended": str(record.ended)}
    return Response(lines(), mimetype="application/jsonl", headers=headers)


@bp.post("/<batch_id>/cancel")
@document(
    "Cancel a batch: queued items never run, running ones stop",
    tags=["Batches"],
    responses={
        200: ("The batch, cancelled", ANY_BATCH),
        202: ("The batch, cancelling", ANY_BATCH),
        404: ("Unknown or expired batch", ErrorSchema),
        409: ("The batch already ended", ErrorSchema),
    },
)
def cancel_batch(batch_id: str):
    """Cancel: queued items never run, running ones stop within a few tokens, ended ones keep their
    results. 200 once cancelled, 202 while running items stop; 409 for a batch that already ended."""
    status, record = batch_service().cancel(batch_id, owner())
    return jsonify(batch_view(record)), 200 if status.terminal else 202
