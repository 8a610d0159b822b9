"""Cloudflare Workers AI's run endpoint, on genqueue's queue: /ai/run/<model>.

The model is the served model's own name (GET /v1/models: a LoRA variant as "<model>:<lora>"), or the
seed's name, @cf/meta/llama-2-7b-chat-int8, which runs the served base model; any other is a 404
naming the served ones. The body is the jobs API's (the same schema); the job goes through the same
queue and workers. The answer waits for the job and comes in Cloudflare's envelope, {"result",
"success", "errors", "messages"}, or, with "stream": true, as the jobs API's SSE stream. Errors use
the same envelope with success false (api/errors.py renders it for every /ai/ and /client/v4/ path).
Both Cloudflare path shapes are served: /ai/run/<model> and the account-scoped
/client/v4/accounts/<account_id>/ai/run/<model> (the account id is accepted and not used).
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from api import waiting
from api.errors import ApiError, job_failure
from api.http import json_body, validate
from api.jobs import stream_response
from api.openapi import IDEMPOTENCY_KEY, document
from api.schemas import EnvelopeSchema, GenerationSchema, StreamEventSchema, to_submission
from api.service import model_service

bp = Blueprint("workers_ai", __name__)

SEED_MODEL = "@cf/meta/llama-2-7b-chat-int8"  # the Workers AI model whose input genqueue's mirrors
RUN_PATH = "/ai/run/<path:model>"
ACCOUNT_RUN_PATH = "/client/v4/accounts/<account_id>/ai/run/<path:model>"
RESULT_FIELDS = ("response", "tool_calls", "usage", "finish_reason")


def envelope(result: dict) -> dict:
    return {"result": result, "success": True, "errors": [], "messages": []}


def lora_of(model: str) -> str | None:
    """The LoRA variant the path's model names (None: the base model); a 404 for a model not served."""
    if model == SEED_MODEL:
        return None
    served = model_service().find(current_app.config["DEFAULT_QUEUE"], model, also=SEED_MODEL)
    return served.lora


@bp.post(RUN_PATH)
@bp.post(ACCOUNT_RUN_PATH)
@document(
    summary="Run a model (Workers AI-compatible)",
    description=(
        "The model is the served model's name (GET /v1/models), or @cf/meta/llama-2-7b-chat-int8 for the served "
        "base model. Queues the body as a job and waits for it (up to GENQUEUE_SYNC_TIMEOUT_S, then 504 with the job "
        "id in X-Job-Id; the job goes on). `stream: true` answers the jobs API's SSE stream instead. "
        "Errors come in the same envelope with success false."
    ),
    tags=["Workers AI"],
    request=GenerationSchema,
    parameters=[IDEMPOTENCY_KEY],
    headers={200: ["X-Job-Id"], 504: ["X-Job-Id"]},
    events=StreamEventSchema,
    examples={
        "request": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32},
        200: {
            "result": {
                "response": "Hello! How can I help you today?",
                "tool_calls": [],
                "usage": {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40},
                "finish_reason": "stop",
            },
            "success": True,
            "errors": [],
            "messages": [],
        },
    },
    responses={
        200: ("The finished generation, or with stream: true, its SSE stream", EnvelopeSchema, "text/event-stream"),
        400: ("Invalid fields (each named with its limit), or a request the model cannot run", EnvelopeSchema),
        404: ("A model that is not served (the message names the served ones)", EnvelopeSchema),
        415: ("The body is not JSON", EnvelopeSchema),
        429: ("The queue is full, or this client holds its limit of waits or streams (Retry-After)", EnvelopeSchema),
        500: ("The engine failed", EnvelopeSchema),
        503: ("Redis is unreachable", EnvelopeSchema),
        504: ("The job did not end in time; it goes on (X-Job-Id)", EnvelopeSchema),
    },
)
def run(model: str, account_id: str | None = None):
    lora = lora_of(model)
    data = validate(GenerationSchema(), json_body())
    if lora is not None and data.get("lora", lora) != lora:
        message = f"the model {model!r} is the LoRA variant {lora!r}; the body names {data['lora']!r}"
        raise ApiError(400, "invalid_request", message, {"lora": [message]})
    stream = data.get("stream", False)
    submission = to_submission({**data, "lora": data.get("lora", lora)})
    record, hold = waiting.submit_held(submission, waiting.STREAMS if stream else waiting.WAITS)
    if stream:
        return stream_response(record.id, hold=hold, submitted=True)
    headers = {"X-Job-Id": record.id}
    ended = waiting.wait(record, current_app.config["SYNC_TIMEOUT_S"], hold, submitted=True)
    if ended is None:
        return waiting.gone_response()
    if not ended.status.terminal:
        message = f"job {record.id} has not ended in time; read it at /v1/jobs/{record.id}"
        raise ApiError(504, "timeout", message, headers=headers)
    if ended.result is not None:  # succeeded, or cancelled with what it had generated
        return jsonify(envelope({key: ended.result[key] for key in RESULT_FIELDS})), 200, headers
    raise job_failure(record.id, ended.status.value, ended.error)
