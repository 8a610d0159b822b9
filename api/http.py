"""What the routes of every surface share: reading a JSON body, validating it with a schema, the
caller's owner, list pages."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, jsonify, request
from marshmallow import Schema, ValidationError

from api import request_id
from api.auth import current_owner
from api.errors import ApiError
from api.generation import Submission
from api.service import job_service
from tasks.store.jobs import JobRecord

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_JSON_DEPTH = 64  # how deeply arrays and objects may nest in a JSON body (a 400 beyond)
DEFAULT_PAGE, MAX_PAGE = 20, 100  # items per list page (?limit=)
# The paging parameters of every list call, for its @document.
PAGE_PARAMETERS = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"Items per page, 1 to {MAX_PAGE} (default {DEFAULT_PAGE})",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
    },
    {
        "name": "after",
        "in": "query",
        "required": False,
        "description": "The last_id of the previous page: the page after it",
        "schema": {"type": "string"},
    },
]


def owner() -> str:
    """The caller's owner name: its API key's, or '' for an open API."""
    return current_owner() or ""


def json_body() -> dict:
    """The request's JSON object, or a 415/400 that says what is wrong with it."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    body = parse_json(request.get_data())
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    try:
        check_text(body)
    except UnicodeError as exc:
        raise ApiError(400, "invalid_unicode", f"the body is not valid text: {exc}") from exc
    return body


def parse_json(data: bytes | str, what: str = "the body") -> Any:
    """A JSON document nested at most MAX_JSON_DEPTH deep, or a 400 saying what is wrong with it."""
    try:
        document = json.loads(data)
    except RecursionError:
        raise nested_too_deep(what) from None
    except ValueError:  # not JSON, or not UTF-8
        raise ApiError(400, "malformed_json", f"{what} is not valid JSON") from None
    if nesting(document) > MAX_JSON_DEPTH:
        raise nested_too_deep(what)
    return document


def nested_too_deep(what: str) -> ApiError:
    return ApiError(400, "json_too_deep", f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} deep")


def nesting(document: Any) -> int:
    """How deeply arrays and objects nest in a decoded JSON document (a scalar: 0), counted up to
    MAX_JSON_DEPTH + 1, level by level (no recursion)."""
    depth, level = 0, [document]
    while depth <= MAX_JSON_DEPTH:
        containers = [node for node in level if isinstance(node, dict | list)]
        if not containers:
            return depth
        depth += 1
        level = [child for node in containers for child in (node.values() if isinstance(node, dict) else node)]
    return depth


def check_text(document: object) -> None:
    """Raise UnicodeError if a JSON document holds a lone surrogate (\\ud800 to \\udfff escaped alone):
    JSON allows the escape, but it is no text, and every string the API echoes back must encode."""
    json.dumps(document, ensure_ascii=False).encode("utf-8")


def validate(schema: Schema, body: dict) -> dict:
    """The body loaded by the schema, or a 400 naming each bad field."""
    try:
        return schema.load(body)
    except ValidationError as exc:
        fields = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise ApiError(
            400, "invalid_request", f"invalid fields: {', '.join(sorted(map(str, fields)))}", fields
        ) from exc


def page_limit() -> int:
    """?limit= of a list call: 1 to MAX_PAGE, DEFAULT_PAGE if not given; else a 400."""
    raw = request.args.get("limit", str(DEFAULT_PAGE))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise ApiError(
            400, "invalid_request", f"limit must be from 1 to {MAX_PAGE}", {"limit": [f"Must be 1 to {MAX_PAGE}."]}
        )
    return int(raw)


def list_page(data: list[dict], has_more: bool) -> Response:
    """A page of a list in OpenAI's shape: object, data, first_id, last_id, has_more."""
    first_id, last_id = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return jsonify({"object": "list", "data": data, "first_id": first_id, "last_id": last_id, "has_more": has_more})


def submit(submission: Submission) -> JobRecord:
    """Queue the caller's submission, honouring its Idempotency-Key header."""
    return job_service().submit(submission, owner(), request.headers.get("Idempotency-Key"), request_id.current())
