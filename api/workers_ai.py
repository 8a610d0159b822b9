"""Cloudflare Workers AI's run endpoint for @cf/meta/llama-2-7b-chat-int8, on genqueue's queue.

The body is the jobs API's (the same schema); the job goes through the same queue and workers. The
answer waits for the job and comes in Cloudflare's envelope, {"result", "success", "errors",
"messages"}, or, with "stream": true, as the jobs API's SSE stream. Errors use the same envelope
with success false. Both Cloudflare path shapes are served: /ai/run/<model> and the account-scoped
/client/v4/accounts/<account_id>/ai/run/<model> (the account id is accepted and not used).
"""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, current_app, jsonify
from werkzeug.exceptions import HTTPException

from api.errors import REDIS_RETRY_AFTER_S, ApiError
from api.jobs import event_stream_response, json_body, submit, validate_generation, wait_for_end
from api.openapi import document
from api.schemas import EnvelopeSchema, GenerationSchema
from engine.errors import InvalidRequestError
from tasks.states import JobState

log = logging.getLogger(__name__)

bp = Blueprint("workers_ai", __name__)

MODEL_ID = "@cf/meta/llama-2-7b-chat-int8"
RUN_PATH = f"/ai/run/{MODEL_ID}"
ACCOUNT_RUN_PATH = f"/client/v4/accounts/<account_id>/ai/run/{MODEL_ID}"


def _request_error_codes(cls: type = InvalidRequestError) -> set[str]:
    """Error codes of failed jobs that mean the request itself cannot be served (a 400, not a 500)."""
    return {cls.code}.union(*(_request_error_codes(sub) for sub in cls.__subclasses__()))


REQUEST_ERROR_CODES = _request_error_codes()


def envelope(result: dict | None, errors: list[dict] | None = None):
    return {"result": result, "success": not errors, "errors": errors or [], "messages": []}


def error_envelope(status: int, code: str, message: str, fields: dict | None = None, headers: dict | None = None):
    error = {"code": code, "message": message}
    if fields:
        error["fields"] = fields
    response = jsonify(envelope(None, [error]))
    response.status_code = status
    response.headers.update(headers or {})
    return response


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError):
    return error_envelope(exc.status, exc.code, exc.message, exc.fields, exc.headers)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    return error_envelope(exc.code or 500, "http_error", exc.description or exc.name)


@bp.errorhandler(redis.RedisError)
def _redis_down(exc: redis.RedisError):
    log.warning("Redis unavailable: %s", exc)
    message = "the job queue (Redis) is unavailable; retry shortly"
    return error_envelope(503, "queue_unavailable", message, headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})


@bp.post(RUN_PATH)
@bp.post(ACCOUNT_RUN_PATH)
@document(
    summary="Run @cf/meta/llama-2-7b-chat-int8 (Workers AI-compatible)",
    description=(
        "Queues the body as a job and waits for it (up to GENQUEUE_SYNC_TIMEOUT_S, then 504 with the job "
        "id in X-Job-Id; the job goes on). `stream: true` answers the jobs API's SSE stream instead. "
        "Errors come in the same envelope with success false."
    ),
    tags=["Workers AI"],
    request=GenerationSchema,
    responses={
        200: ("The finished generation, or with stream: true, its SSE stream", EnvelopeSchema, "text/event-stream"),
        400: ("Invalid fields (each named with its limit), or a job the model refused", EnvelopeSchema),
        415: ("The body is not JSON", EnvelopeSchema),
        500: ("The engine failed", EnvelopeSchema),
        503: ("Redis is unreachable", EnvelopeSchema),
        504: ("The job did not end in time; it goes on (X-Job-Id)", EnvelopeSchema),
    },
)
def run(account_id: str | None = None):
    params = validate_generation(json_body())
    record = submit(params)
    headers = {"X-Job-Id": record.id}
    if params["stream"]:
        return event_stream_response(record.id)
    record = wait_for_end(record.id, current_app.config["SYNC_TIMEOUT_S"])
    if not record.status.terminal:
        message = f"job {record.id} has not ended in time; read it at /v1/jobs/{record.id}"
        return error_envelope(504, "timeout", message, headers=headers)
    if record.result is not None:  # succeeded, or cancelled with what it had generated
        result = {key: record.result[key] for key in ("response", "tool_calls", "usage", "finish_reason")}
        return jsonify(envelope(result)), 200, headers
    if record.status is JobState.FAILED and record.error:
        status = 400 if record.error.get("code") in REQUEST_ERROR_CODES else 500
        return error_envelope(status, record.error["code"], record.error["message"], headers=headers)
    return error_envelope(409, "cancelled", f"job {record.id} was cancelled before it ran", headers=headers)
