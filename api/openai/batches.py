"""OpenAI's Batch API on genqueue's batches: POST /v1/batches with an input_file_id (the batches route
takes both forms, api/batches.py), and a batch's results as OpenAI's output and error files.

Each line of the input file, {"custom_id", "method": "POST", "url", "body"}, becomes a batch request
through the same checks as one sent to that endpoint alone (its schema, the served model, its context
and LoRA variants), all before anything is queued; one bad line refuses the batch with a 400 naming
each bad line (OpenAI's error shape). The batch then runs as any other: per key, on the batch queue.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate
from werkzeug.wrappers import Response

from api.errors import ApiError, openai_body, render
from api.http import check_text, owner
from api.http import validate as load
from api.openai.protocol import ChatCompletionSchema, CompletionSchema, Shape, parse
from api.openai.serving import to_submission
from api.schemas import MetadataField
from api.service import batch_service, file_service, model_service
from api.service.batches import Checked
from api.service.models import RequestCheck, request_problems
from tasks.store import keys
from tasks.store.batches import BatchRecord, BatchRequest
from tasks.store.views import batch_view, output_file_id

CHAT_ENDPOINT, COMPLETIONS_ENDPOINT = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = {CHAT_ENDPOINT: ChatCompletionSchema, COMPLETIONS_ENDPOINT: CompletionSchema}
COMPLETION_WINDOWS = ("24h",)  # OpenAI's only one; genqueue runs a batch to its end, never expiring it early
LINE_FIELDS = ("custom_id", "method", "url", "body")
MAX_CUSTOM_ID_CHARS = 512
PER_REQUEST_REFUSED = {
    "stream": "Not available in a batch: read the batch's output file instead.",
    "webhook": "Not available per request in a batch.",
    "metadata": "Not available per request: give the batch metadata; custom_id names a request.",
}


class OpenAIBatchSchema(Schema):
    """The body of POST /v1/batches in OpenAI's form (the native form sends requests instead)."""

    input_file_id = fields.String(required=True, metadata={"description": "A file uploaded with purpose batch."})
    endpoint = fields.String(required=True, validate=validate.OneOf(list(ENDPOINTS)))
    completion_window = fields.String(
        required=True,
        validate=validate.OneOf(COMPLETION_WINDOWS),
        metadata={"description": "24h. The batch runs to its end: it is never expired early."},
    )
    metadata = MetadataField()


def create(body: dict) -> Response:
    """Create a batch from an uploaded file: 200 with the batch in OpenAI's shape, or an OpenAI-shaped error."""
    try:
        data = load(OpenAIBatchSchema(), body)
        source = file_service().get(data["input_file_id"], owner())
        if source.purpose != "batch":
            raise ApiError(400, "invalid_request", "the input file's purpose must be batch", {"input_file_id": []})
        queue = batch_service().queue
        model, lines = model_of(iter(file_service().lines(source)), queue)
        info = {
            "endpoint": data["endpoint"],
            "input_file_id": source.id,
            "completion_window": data["completion_window"],
            "model": model,
        }
        items = checked_lines(lines, data["endpoint"], model, model_service().request_check(queue))
        record = batch_service().create(items, "lines", owner(), data.get("metadata") or {}, openai=info)
    except ApiError as exc:
        return render(exc, openai_body)
    response = Response(json.dumps(batch_view(record)), mimetype="application/json")
    response.headers["Location"] = f"/v1/batches/{record.id}"
    return response


def model_of(lines: Iterator[str], queue: str) -> tuple[str, Iterator[str]]:
    """The model the batch runs, the first line's (every line must name it, as OpenAI requires; a
    served one), and the lines again from the first."""
    first = next(lines, None)
    if first is None:
        raise ApiError(400, "invalid_request", "the input file has no lines", {"input_file_id": ["Empty."]})
    try:
        model = json.loads(first)["body"]["model"]
    except (ValueError, KeyError, TypeError):
        model = None
    if not isinstance(model, str):
        message = "line 1 of the input file names no body.model"
        raise ApiError(400, "invalid_batch", message, {"lines": {"1": {"body": {"model": ["Missing."]}}}})
    model_service().find(queue, model)  # a 404 naming the served ones
    return model, itertools.chain([first], lines)


def checked_lines(lines: Iterator[str], endpoint: str, model: str, check: RequestCheck) -> Iterator[Checked]:
    """(line number, the request or its problems) for each line of the input file."""
    schema = ENDPOINTS[endpoint]
    lora = model_service().find(batch_service().queue, model).lora
    seen: set[str] = set()
    for number, text in enumerate(lines, 1):
        try:
            yield number, check_line(text, endpoint, schema, model, lora, check, seen)
        except ValidationError as exc:
            yield number, exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}


def check_line(
    text: str, endpoint: str, schema: type[Schema], model: str, lora: str | None, check: RequestCheck, seen: set
) -> BatchRequest:
    """A line as the batch request it asks for, or a ValidationError naming its bad fields."""
    try:
        line = json.loads(text)
        check_text(line)
    except ValueError as exc:
        raise ValidationError({"_schema": [f"Not valid JSON text: {exc}"]}) from None
    if not isinstance(line, dict):
        raise ValidationError({"_schema": ['Must be a JSON object: {"custom_id", "method", "url", "body"}.']})
    problems: dict[str, Any] = {name: ["Unknown field."] for name in sorted(set(line) - set(LINE_FIELDS))}
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        problems["custom_id"] = [f"Must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters."]
    elif custom_id in seen:
        problems["custom_id"] = ["Already used by another line: each line needs its own."]
    if isinstance(custom_id, str):
        seen.add(custom_id)
    if line.get("method") != "POST":
        problems["method"] = ["Must be POST."]
    if line.get("url") != endpoint:
        problems["url"] = [f"Must be the batch's endpoint, {endpoint}."]
    body = line.get("body")
    if not isinstance(body, dict):
        problems["body"] = ["Missing or not an object: the request's body."]
        raise ValidationError(problems)
    body_problems = {name: [why] for name, why in PER_REQUEST_REFUSED.items() if body.get(name) not in (None, False)}
    if body.get("model") != model:
        body_problems["model"] = [f"Must be {model!r}, the model of the batch's first line (one model a batch)."]
    request = None
    if not body_problems:
        try:
            submission = to_submission(parse(schema, body), endpoint == CHAT_ENDPOINT, lora)
            request = submission.request
            body_problems = request_problems(check, request)
        except ApiError as exc:
            body_problems = exc.fields or {"_schema": [exc.message]}
    if body_problems:
        problems["body"] = body_problems
    if problems or request is None:
        raise ValidationError(problems)
    return BatchRequest(custom_id=custom_id, request=request.to_dict())


# -- output and error files ------------------------------------------------------------------------


def output_lines(batch: BatchRecord, entries: Iterable[dict], errors: bool) -> Iterator[str]:
    """The batch's output file (its succeeded requests) or error file (the others), as OpenAI writes
    them: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error"}."""
    info = batch.openai or {}
    chat = info.get("endpoint") == CHAT_ENDPOINT
    for entry in entries:
        end = entry["end"]
        succeeded = end.get("status") == "succeeded"
        if succeeded == errors:
            continue
        job_id = keys.batch_item(batch.id, entry["index"])
        line: dict[str, Any] = {"id": f"batch_req_{job_id}", "custom_id": entry["custom_id"]}
        if succeeded:
            body = Shape(chat, job_id, batch.created_at, info.get("model", "")).completion(end["result"])
            line.update(response={"status_code": 200, "request_id": job_id, "body": body}, error=None)
        else:
            error = end.get("error") or {"code": "cancelled", "message": "the request was cancelled"}
            line.update(response=None, error={"code": error.get("code"), "message": error.get("message")})
        yield json.dumps(line, ensure_ascii=False) + "\n"


def output_file(batch: BatchRecord, errors: bool) -> tuple[str, Iterator[str]]:
    """The file id and lines of the batch's output (or error) file."""
    _record, entries = batch_service().results(batch.id, owner())
    return output_file_id(batch.id, errors), output_lines(batch, entries, errors)


# -- Response shapes, for the OpenAPI document ---------------------------------------------------------


class OpenAIRequestCountsSchema(Schema):
    total = fields.Integer()
    completed = fields.Integer()
    failed = fields.Integer(metadata={"description": "Failed or cancelled."})


class OpenAIBatchObjectSchema(Schema):
    """A batch made from an uploaded file, in OpenAI's shape (timestamps in Unix seconds)."""

    id = fields.String()
    object = fields.String(metadata={"description": "batch"})
    endpoint = fields.String()
    model = fields.String()
    errors = fields.Dict(allow_none=True)
    input_file_id = fields.String()
    completion_window = fields.String()
    status = fields.String(
        metadata={
            "description": "validating, in_progress, finalizing, completed (every request ended: failed ones are in "
            "the error file), failed (could not be queued), cancelling, cancelled"
        }
    )
    output_file_id = fields.String(allow_none=True)
    error_file_id = fields.String(allow_none=True)
    created_at = fields.Integer()
    in_progress_at = fields.Integer(allow_none=True)
    finalizing_at = fields.Integer(allow_none=True)
    completed_at = fields.Integer(allow_none=True)
    failed_at = fields.Integer(allow_none=True)
    cancelling_at = fields.Integer(allow_none=True)
    cancelled_at = fields.Integer(allow_none=True)
    expires_at = fields.Integer(allow_none=True)
    expired_at = fields.Integer(allow_none=True)
    request_counts = fields.Nested(OpenAIRequestCountsSchema)
    usage = fields.Dict()
    metadata = fields.Dict(keys=fields.String(), values=fields.String(), allow_none=True)
