"""OpenAI-compatible routes on the same queue: chat completions, completions and the model list.

Each request becomes a native job (api/openai/serving.py), so it is queued, batched, stored and
streamable at /v1/jobs/<id> like any other (its id is in the X-Job-Id header); only the shapes of the
request and the answer are OpenAI's (api/openai/protocol.py). Errors use OpenAI's shape
(api/errors.py renders it for this blueprint).
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from marshmallow import Schema, fields

from api import waiting
from api.http import json_body
from api.openai.protocol import (
    OPENAI_ERROR,
    ChatCompletionAnswerSchema,
    ChatCompletionChunkSchema,
    ChatCompletionSchema,
    CompletionSchema,
    Shape,
    TextCompletionAnswerSchema,
    parse,
)
from api.openai.serving import answer_stream, answer_sync, to_submission
from api.openapi import IDEMPOTENCY_KEY, document
from api.service import model_service
from api.service.models import ServedModel

bp = Blueprint("openai", __name__, url_prefix="/v1")

# What a generation route may answer besides its completion.
GENERATION_ERRORS = {status: OPENAI_ERROR for status in (400, 404, 409, 429, 503, 504)}
STREAM_DOC = "With stream: Server-Sent Events of chunks, then data: [DONE]"


class ModelSchema(Schema):
    id = fields.String()
    object = fields.String()
    created = fields.Integer()
    owned_by = fields.String()


class ModelListSchema(Schema):
    object = fields.String()
    data = fields.List(fields.Nested(ModelSchema))


def model_entry(model: ServedModel) -> dict:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": "genqueue"}


def queue() -> str:
    return current_app.config["DEFAULT_QUEUE"]


@bp.get("/models")
@document(
    "OpenAI-compatible: the models a request may name",
    description="The model the queue's workers loaded, and its LoRA variants as '<model>:<lora>'.",
    tags=["OpenAI-compatible"],
    responses={200: ("The list", ModelListSchema)},
)
def list_models():
    return jsonify({"object": "list", "data": [model_entry(m) for m in model_service().served(queue())]})


@bp.get("/models/<path:model>")
@document(
    "OpenAI-compatible: one model",
    tags=["OpenAI-compatible"],
    responses={200: ("The model", ModelSchema), 404: OPENAI_ERROR},
)
def get_model(model: str):
    return jsonify(model_entry(model_service().find(queue(), model)))


def run(chat: bool):
    data = parse(ChatCompletionSchema if chat else CompletionSchema, json_body())
    model = model_service().find(queue(), data["model"])
    submission = to_submission(data, chat, model.lora)
    kind = waiting.STREAMS if data["stream"] else waiting.WAITS
    record, hold = waiting.submit_held(submission, kind)
    shape = Shape.of(chat, record, data["model"])
    if data["stream"]:
        include_usage = data.get("stream_options", {}).get("include_usage", False)
        return answer_stream(record, shape, include_usage, hold, tools_offered=bool(submission.request.tools))
    return answer_sync(record, shape, hold)


CHAT_EXAMPLE = {
    "model": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 64,
}


@bp.post("/chat/completions")
@document(
    "OpenAI-compatible chat completion, run as a job on the queue",
    description="Parameters genqueue cannot honour exactly (seed, penalties, n > 1, logprobs, response_format, a "
    "forced tool_choice, ...) are refused with a 400 naming them. Tools are offered to the model; its calls come "
    "back as tool_calls. The job's id is in the X-Job-Id header.",
    tags=["OpenAI-compatible"],
    request=ChatCompletionSchema,
    parameters=[IDEMPOTENCY_KEY],
    headers={200: ["X-Job-Id"], 504: ["X-Job-Id"]},
    events=ChatCompletionChunkSchema,
    examples={
        "request": CHAT_EXAMPLE,
        200: {
            "id": "chatcmpl-job_Xp3b9Qe0LqWv2mHc7rT1uYkA",
            "object": "chat.completion",
            "created": 1796292000,
            "model": "smollm2-135m-instruct",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "The capital of France is Paris.", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 37, "completion_tokens": 8, "total_tokens": 45},
        },
    },
    responses={
        200: ("The chat.completion; " + STREAM_DOC, ChatCompletionAnswerSchema, "text/event-stream"),
        **GENERATION_ERRORS,
    },
)
def chat_completions():
    return run(chat=True)


@bp.post("/completions")
@document(
    "OpenAI-compatible text completion (the prompt is sent raw), run as a job on the queue",
    tags=["OpenAI-compatible"],
    request=CompletionSchema,
    parameters=[IDEMPOTENCY_KEY],
    headers={200: ["X-Job-Id"], 504: ["X-Job-Id"]},
    events=TextCompletionAnswerSchema,
    examples={"request": {"model": "smollm2-135m-instruct", "prompt": "Once upon a time", "max_tokens": 16}},
    responses={
        200: ("The text_completion; " + STREAM_DOC, TextCompletionAnswerSchema, "text/event-stream"),
        **GENERATION_ERRORS,
    },
)
def completions():
    return run(chat=False)
