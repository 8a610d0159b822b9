"""Every error the API answers, from one table, rendered in the envelope of the route's surface.

Views and the service layer raise `ApiError` (status, code, message, the fields at fault); other
exceptions are mapped to one here (`to_api_error`): werkzeug's HTTP errors, Redis or the broker
being unreachable (503), input too deep or undecodable (400) or too slow to arrive (408), the
engine's errors (400 for a request that cannot be served as asked, derived from engine.errors'
hierarchy, else 500). One handler renders each in its surface's shape:
- native (`/v1/jobs`, `/v1/batches`, ...): {"error": {"code", "message", "fields"}}
- OpenAI (`/v1/chat/completions`, ...): {"error": {"message", "type", "param", "code"}}
- Cloudflare (`/ai/run/...`): {"result": null, "success": false, "errors": [{code, message, fields?}], "messages": []}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import ClientDisconnected, HTTPException

from engine.errors import EngineError, InvalidRequestError

log = logging.getLogger(__name__)

REDIS_RETRY_AFTER_S = 5

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    """Raised by a view or the service layer to answer with an error; `fields` maps each bad field
    to its problems."""

    def __init__(self, status: int, code: str, message: str, fields: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        self.headers = headers or {}

    @property
    def param(self) -> str | None:
        """The first field at fault (OpenAI's `param`)."""
        return next(iter(self.fields), None)


def _codes_under(cls: type[EngineError]) -> set[str]:
    return {cls.code}.union(*(_codes_under(sub) for sub in cls.__subclasses__()))


# Job error codes that mean the request itself cannot be served as asked (a 400), not a server failure.
REQUEST_ERROR_CODES = _codes_under(InvalidRequestError) | {"invalid_request"}


def status_of(code: str) -> int:
    """The HTTP status of a failed job's error code."""
    return 400 if code in REQUEST_ERROR_CODES else 500


def job_failure(job_id: str, status: str, error: dict | None) -> ApiError:
    """The error a synchronous request answers for its job that did not succeed (X-Job-Id names it)."""
    headers = {"X-Job-Id": job_id}
    if status == "cancelled":
        return ApiError(409, "job_cancelled", f"job {job_id} was cancelled", headers=headers)
    error = error or {}
    code = error.get("code", "engine_error")
    return ApiError(status_of(code), code, error.get("message", "the generation failed"), headers=headers)


def queue_unavailable() -> ApiError:
    return ApiError(
        503,
        "queue_unavailable",
        "the job queue (Redis) is unavailable; retry shortly",
        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
    )


def to_api_error(exc: BaseException) -> ApiError:
    """The answer for any exception a request raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ClientDisconnected) and isinstance(exc.__context__, TimeoutError)  # werkzeug's wrapping
    ):
        return ApiError(408, "request_timeout", "the request body stopped arriving (GENQUEUE_BODY_TIMEOUT_S)")
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        return ApiError(status, HTTP_CODES.get(status, "http_error"), exc.description or exc.name)
    if isinstance(exc, redis.OutOfMemoryError):  # maxmemory reached under noeviction: nothing is evicted
        log.warning("Redis is full: %s", exc)
        return ApiError(
            503,
            "store_full",
            "the job store (Redis) is full; new jobs are refused until accepted ones end and expire",
            headers={"Retry-After": "30"},
        )
    if isinstance(exc, redis.RedisError | OperationalError):  # OperationalError: Celery could not publish
        log.warning("Redis unavailable: %s", exc)
        return queue_unavailable()
    if isinstance(exc, EngineError):
        return ApiError(status_of(exc.code), exc.code, str(exc))
    if isinstance(exc, RecursionError):  # input nested deeper than any of our checks expected
        return ApiError(400, "invalid_request", "the request nests too deeply to be read")
    if isinstance(exc, json.JSONDecodeError):
        return ApiError(400, "malformed_json", "the request holds JSON that is not valid")
    if isinstance(exc, UnicodeError):
        return ApiError(400, "invalid_request", "the request holds text that is not valid UTF-8")
    log.error("unexpected error answering %s %s", request.method, request.path, exc_info=exc)
    return ApiError(500, "internal_error", "the server failed to answer this request; it is logged")


# -- the three envelopes ------------------------------------------------------------------------------


def native_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"code": error.code, "message": error.message, "fields": error.fields}}


def openai_body(error: ApiError) -> dict[str, Any]:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def cloudflare_body(error: ApiError) -> dict[str, Any]:
    entry: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.fields:
        entry["fields"] = error.fields
    return {"result": None, "success": False, "errors": [entry], "messages": []}


Envelope = Callable[[ApiError], dict[str, Any]]
ENVELOPES: dict[str, Envelope] = {"openai": openai_body, "openai_files": openai_body, "workers_ai": cloudflare_body}
# By path, for what no route matched (an unknown path or method under a surface's prefix).
PATH_ENVELOPES: dict[str, Envelope] = {
    "/ai/": cloudflare_body,
    "/client/v4/": cloudflare_body,
    "/v1/chat/": openai_body,
    "/v1/completions": openai_body,
    "/v1/models": openai_body,
    "/v1/files": openai_body,
}


def envelope_of_request() -> Envelope:
    """The envelope of the route's surface (its blueprint), else of its path's."""
    if request.blueprint in ENVELOPES:
        return ENVELOPES[request.blueprint]
    return next((env for prefix, env in PATH_ENVELOPES.items() if request.path.startswith(prefix)), native_body)


def render(error: ApiError, envelope: Envelope | None = None):
    envelope = envelope or envelope_of_request()
    response = jsonify(envelope(error))
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(Exception, lambda exc: render(to_api_error(exc)))
