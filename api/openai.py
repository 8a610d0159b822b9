"""OpenAI-compatible endpoints on the same queue: chat completions, completions and the model list.

Each request becomes a native job through api.jobs.submit, so it is queued, batched, stored and
streamable at /v1/jobs/<id> like any other (its id is in the X-Job-Id header); only the shapes of the
request and the answer are OpenAI's. Parameters follow the native API's rule: each is honoured
exactly or refused with a 400 that names it. CTranslate2 has no per-call seed and no frequency or
presence penalty, so `seed` and non-zero penalties are refused; so is every parameter genqueue does not
implement (logprobs, tools, ...), rather than ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import redis
from flask import Blueprint, Response, current_app, jsonify
from marshmallow import INCLUDE, Schema, ValidationError, fields, validate, validates_schema

from api.errors import ApiError
from api.health import live_workers
from api.jobs import SSE_HEADERS, get_record, json_body, store, submit
from api.openapi import document
from api.schemas import (
    MAX_TEXT_CHARS,
    MAX_TOKENS_LIMIT,
    GenerationSchema,
    StopSequences,
    StrictBoolean,
    StrictFloat,
    StrictInteger,
)
from engine.lora import variant_dir_name
from engine.model import METADATA_FILE
from genqueue import config
from tasks.states import JobState
from tasks.store import CHUNK, JobRecord

bp = Blueprint("openai", __name__, url_prefix="/v1")

DONE = "data: [DONE]\n\n"
# OpenAI's documented defaults where they differ from the native API's.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's is "until the context is full"; genqueue bounds every job
DEFAULT_COMPLETION_MAX_TOKENS = 16
# Job errors that mean the request itself cannot run (a 400), as opposed to a server failure (500).
REQUEST_ERROR_CODES = {"invalid_request", "context_length_exceeded", "chat_template_error"}

# OpenAI parameters genqueue knows and does not implement, with the reason given in the 400.
# A parameter set to its neutral value (in NEUTRAL) is accepted: it asks for nothing.
UNSUPPORTED = {
    "seed": "CTranslate2 has no per-call seed, so a seeded request could not be repeated exactly",
    "frequency_penalty": "CTranslate2 has no frequency penalty; only 0 is accepted",
    "presence_penalty": "CTranslate2 has no presence penalty; only 0 is accepted",
    "n": "one choice per request: n must be 1",
    "best_of": "one choice per request: best_of must be 1",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "logit_bias": "CTranslate2 takes no per-token logit bias",
    "echo": "the prompt is not echoed",
    "suffix": "insertion (suffix) is not supported",
    "tools": "tool calling is not supported by the OpenAI-compatible endpoints yet",
    "tool_choice": "tool calling is not supported by the OpenAI-compatible endpoints yet",
    "parallel_tool_calls": "tool calling is not supported by the OpenAI-compatible endpoints yet",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "structured output (response_format) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model does not reason",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "service_tier": "there is one service tier",
    "store": "completions are kept as genqueue jobs, not stored by this flag",
    "metadata": "metadata is not supported",
    "prompt_cache_key": "prompt caching is not supported",
    "prompt_cache_retention": "prompt caching is not supported",
    "safety_identifier": "safety identifiers are not supported",
}
NEUTRAL = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False,),
    "echo": (False,),
    "parallel_tool_calls": (True,),
    "modalities": (["text"],),
}


class OpenAIError(Exception):
    """Raised by a view of this blueprint to answer with OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@bp.errorhandler(OpenAIError)
def _openai_error(exc: OpenAIError):
    return jsonify(exc.body()), exc.status


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError):  # json_body and get_record speak the native shape; answer OpenAI's
    param = next(iter(exc.fields), None)
    return jsonify(OpenAIError(exc.status, exc.message, param, exc.code).body()), exc.status, exc.headers


@bp.errorhandler(redis.RedisError)
def _redis_down(exc: redis.RedisError):
    current_app.logger.warning("Redis unavailable: %s", exc)
    error = OpenAIError(503, "the job queue (Redis) is unavailable; retry shortly", code="queue_unavailable")
    return jsonify(error.body()), 503, {"Retry-After": "5"}


# -- the models ----------------------------------------------------------------------------------


LORA_SEPARATOR = ":"  # a LoRA variant's model id: "<base model>:<lora name>"


def served_models() -> dict[str, str | None]:
    """The model ids a request may name, each with the LoRA variant it selects (None: the base).

    The workers of the queue jobs go to serve the model they loaded and its variants, so naming any
    other could not be honoured. Before any worker is up, the configured model (GENQUEUE_MODEL) and
    the variants its metadata lists are served, so requests can queue for them.
    """
    queue = current_app.config["DEFAULT_QUEUE"]
    bases: dict[str, set[str]] = {}
    for worker in live_workers(store().redis):
        if worker.get("model") and queue in worker.get("queues", "").split(","):
            loras = bases.setdefault(worker["model"], set())
            loras.update(name for name in worker.get("loras", "").split(",") if name)
    if not bases:
        model_dir = Path(config.model_path(current_app.config))
        bases[model_dir.name] = set((_metadata(model_dir.name).get("lora") or {}).keys())
    served: dict[str, str | None] = {}
    for base, loras in sorted(bases.items()):
        served[base] = None
        served.update({f"{base}{LORA_SEPARATOR}{lora}": lora for lora in sorted(loras)})
    return served


def available_models() -> list[dict]:
    """The served models in OpenAI's model shape."""
    entries = []
    for model_id, lora in served_models().items():
        base = model_id.removesuffix(f"{LORA_SEPARATOR}{lora}") if lora else model_id
        prepared_at = _metadata(variant_dir_name(base, lora) if lora else base).get("prepared_at", "")
        try:
            created = int(datetime.fromisoformat(prepared_at.replace("Z", "+00:00")).timestamp())
        except ValueError:
            created = 0  # prepared elsewhere: the API need not see the workers' model files
        entries.append({"id": model_id, "object": "model", "created": created, "owned_by": "genqueue"})
    return entries


def _metadata(dir_name: str) -> dict:
    try:
        return json.loads((Path(current_app.config["MODELS_DIR"]) / dir_name / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return {}


class ModelSchema(Schema):
    id = fields.String()
    object = fields.String()
    created = fields.Integer()
    owned_by = fields.String()


class ModelListSchema(Schema):
    object = fields.String()
    data = fields.List(fields.Nested(ModelSchema))


OPENAI_ERROR = ("OpenAI's error shape: {error: {message, type, param, code}}",)


@bp.get("/models")
@document(
    "OpenAI-compatible: the models a request may name",
    description="The model the queue's workers loaded, and its LoRA variants as '<model>:<lora>'.",
    tags=["OpenAI-compatible"],
    responses={200: ("The list", ModelListSchema)},
)
def list_models():
    return jsonify({"object": "list", "data": available_models()})


@bp.get("/models/<path:model>")
@document(
    "OpenAI-compatible: one model",
    tags=["OpenAI-compatible"],
    responses={200: ("The model", ModelSchema), 404: OPENAI_ERROR},
)
def get_model(model: str):
    for entry in available_models():
        if entry["id"] == model:
            return jsonify(entry)
    raise _unknown_model(model)


def _unknown_model(model: str) -> OpenAIError:
    known = ", ".join(served_models())
    return OpenAIError(
        404, f"The model {model!r} does not exist; this server serves: {known}", "model", "model_not_found"
    )


# -- request validation --------------------------------------------------------------------------


class TextPartSchema(Schema):
    type = fields.String(required=True, validate=validate.Equal("text", error="Only text content parts are supported."))
    text = fields.String(required=True)


class MessageContent(fields.Field):
    """A message's content: a string, or a list of text parts (joined with newlines)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            text = value
        elif isinstance(value, list) and value:
            kinds = {part.get("type") if isinstance(part, dict) else None for part in value} - {"text"}
            if kinds:
                raise ValidationError(f"Only text content parts are supported, not {sorted(map(str, kinds))}.")
            text = "\n".join(part["text"] for part in TextPartSchema(many=True).load(value))
        else:
            raise ValidationError("Must be a string or a non-empty list of text parts.")
        if len(text) > MAX_TEXT_CHARS:
            raise ValidationError(f"Longer than maximum length {MAX_TEXT_CHARS}.")
        return text


class ChatMessageSchema(Schema):
    # developer is OpenAI's newer name for system. Tool messages answer tool calls, not supported yet.
    role = fields.String(
        required=True,
        validate=validate.OneOf(
            ("system", "developer", "user", "assistant"), error="Must be one of: system, developer, user, assistant."
        ),
    )
    content = MessageContent(required=True)


class StreamOptionsSchema(Schema):
    include_usage = StrictBoolean(load_default=False)


class _CommonSchema(Schema):
    """What both endpoints take. Unknown fields pass here; check_parameters refuses them by name."""

    class Meta:
        unknown = INCLUDE

    model = fields.String(required=True, validate=validate.Length(min=1))
    max_tokens = StrictInteger(validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT))
    temperature = StrictFloat(load_default=DEFAULT_TEMPERATURE, validate=validate.Range(min=0, max=2))
    top_p = StrictFloat(validate=validate.Range(min=0, max=1))
    stop = StopSequences()
    stream = StrictBoolean(load_default=False)
    stream_options = fields.Nested(StreamOptionsSchema)
    user = fields.String(validate=validate.Length(max=256))  # an end-user id for the caller's records

    @validates_schema
    def _stream_options_need_stream(self, data, **_kwargs):
        if "stream_options" in data and not data.get("stream"):
            raise ValidationError("Only allowed when stream is true.", "stream_options")


class ChatCompletionSchema(_CommonSchema):
    messages = fields.List(fields.Nested(ChatMessageSchema), required=True, validate=validate.Length(min=1))
    max_completion_tokens = StrictInteger(validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT))

    @validates_schema
    def _one_max(self, data, **_kwargs):
        given = {data[k] for k in ("max_tokens", "max_completion_tokens") if k in data}
        if len(given) > 1:
            raise ValidationError("max_tokens and max_completion_tokens differ; give one.", "max_completion_tokens")


class PromptField(fields.Field):
    """A completion prompt: one string, or a list holding one string (one choice per request)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ValidationError("Must be a string (or a list of one string; token arrays are not supported).")
        if not 1 <= len(value) <= MAX_TEXT_CHARS:
            raise ValidationError(f"Length must be between 1 and {MAX_TEXT_CHARS}.")
        return value


class CompletionSchema(_CommonSchema):
    prompt = PromptField(required=True)


def parse(schema_cls: type[Schema], body: dict) -> dict:
    """The validated request, or the OpenAI-shaped 400 naming the first bad parameter."""
    body = {name: value for name, value in body.items() if value is not None}  # null means "not given"
    schema = schema_cls()
    for name, value in body.items():
        if name in schema.fields:
            continue
        if name in UNSUPPORTED:
            if _is_neutral(name, value):
                continue
            raise OpenAIError(
                400, f"Unsupported parameter {name!r}: {UNSUPPORTED[name]}.", name, "unsupported_parameter"
            )
        raise OpenAIError(400, f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
    try:
        data = schema.load(body)
    except ValidationError as exc:
        name, problems = _first_problem(exc.messages)
        raise OpenAIError(400, f"Invalid value for {name!r}: {problems}", name, "invalid_value") from exc
    return {k: v for k, v in data.items() if k in schema.fields}


def _is_neutral(name: str, value) -> bool:
    """Whether value is the parameter's no-op value (0 and 0.0 alike, but not False for 0)."""
    return any(
        isinstance(value, bool) == isinstance(neutral, bool) and value == neutral for neutral in NEUTRAL.get(name, ())
    )


def _first_problem(messages, path: str = "") -> tuple[str | None, str]:
    """The first bad parameter in marshmallow's error messages, as a path like messages[0].role."""
    if isinstance(messages, dict):
        key = min(messages, key=str)
        if key == "_schema":
            name = path
        elif isinstance(key, int):
            name = f"{path}[{key}]"
        else:
            name = f"{path}.{key}" if path else key
        return _first_problem(messages[key], name)
    if isinstance(messages, list):
        return path or None, " ".join(str(m) for m in messages)
    return path or None, str(messages)


def native_params(data: dict, lora: str | None, **input_fields) -> dict:
    """The native job body for a validated OpenAI request, checked by the native schema too."""
    params = {**input_fields, "max_tokens": data["max_tokens"], "temperature": data["temperature"]}
    if lora is not None:
        params["lora"] = lora
    for name in ("top_p", "stop"):
        if name in data:
            params[name] = data[name]
    try:
        return GenerationSchema().load(params)
    except ValidationError as exc:  # the OpenAI limits are narrower: reaching this is a bug, say so plainly
        name, problems = _first_problem(exc.messages)
        raise OpenAIError(400, f"Invalid value for {name!r}: {problems}", name, "invalid_value") from exc


def lora_of(model: str) -> str | None:
    """The LoRA variant a served model id selects; an unknown id is a 404."""
    served = served_models()
    if model not in served:
        raise _unknown_model(model)
    return served[model]


# -- answering -----------------------------------------------------------------------------------


class Shape:
    """How one endpoint's answers look: chat completions or text completions."""

    def __init__(self, chat: bool, record: JobRecord, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + record.id
        self.created = int(record.created_at)
        self.model = model

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def completion(self, result: dict) -> dict:
        text = result["response"]
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result["finish_reason"]}
            return {**self.head("chat.completion"), "choices": [choice], "usage": result["usage"]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": result["finish_reason"]}
        return {**self.head("text_completion"), "choices": [choice], "usage": result["usage"]}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self.head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": usage}


def job_error(record_status: str, error: dict | None, job_id: str) -> OpenAIError:
    """The OpenAI error for a job that did not succeed."""
    if record_status == JobState.CANCELLED.value:
        return OpenAIError(409, f"job {job_id} was cancelled", None, "job_cancelled")
    error = error or {}
    code = error.get("code", "engine_error")
    message = error.get("message", "the generation failed")
    if code in REQUEST_ERROR_CODES:
        return OpenAIError(400, message, "messages", code)
    return OpenAIError(500, f"{message} (job {job_id})", None, code)


def answer_sync(record: JobRecord, shape: Shape) -> Response:
    timeout_s = float(current_app.config["SYNC_TIMEOUT_S"])
    deadline = time.monotonic() + timeout_s
    for event in store().follow(record.id, poll_s=min(5.0, timeout_s)):
        if (event and event["type"] != CHUNK) or time.monotonic() >= deadline:
            break
    record = get_record(record.id)
    if not record.status.terminal:
        raise OpenAIError(
            504,
            f"job {record.id} did not finish within {timeout_s:g}s; it goes on: GET /v1/jobs/{record.id}",
            None,
            "timeout",
        )
    if record.status is not JobState.SUCCEEDED:
        raise job_error(record.status.value, record.error, record.id)
    return jsonify(shape.completion(record.result))


def answer_stream(record: JobRecord, shape: Shape, include_usage: bool) -> Response:
    events = store().follow(record.id, poll_s=current_app.config["SSE_KEEPALIVE_S"])
    return Response(
        _stream(events, record.id, shape, include_usage),
        mimetype="text/event-stream",
        headers={**SSE_HEADERS, "X-Job-Id": record.id},
    )


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _stream(events: Iterator[dict | None], job_id: str, shape: Shape, include_usage: bool) -> Iterator[str]:
    def with_usage(chunk: dict) -> dict:
        return {**chunk, "usage": None} if include_usage else chunk

    if shape.chat:
        yield _data(with_usage(shape.chunk(None, first=True)))
    for event in events:
        if event is None:
            yield ": keep-alive\n\n"
        elif event["type"] == CHUNK:
            yield _data(with_usage(shape.chunk(event["text"])))
        elif event["status"] == JobState.SUCCEEDED.value:
            result = event["result"] or {}
            yield _data(with_usage(shape.chunk(None, finish_reason=result.get("finish_reason"))))
            if include_usage:
                yield _data(shape.usage_chunk(result.get("usage")))
            break
        else:  # the OpenAI clients raise on an error object in the stream
            yield _data(job_error(event["status"], event.get("error"), job_id).body())
            break
    yield DONE


def run(chat: bool) -> Response:
    body = json_body()
    data = parse(ChatCompletionSchema if chat else CompletionSchema, body)
    lora = lora_of(data["model"])
    max_tokens = data.get("max_tokens") or data.get("max_completion_tokens")
    data["max_tokens"] = max_tokens or (DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS)
    if chat:
        roles = {"developer": "system"}
        messages = [{"role": roles.get(m["role"], m["role"]), "content": m["content"]} for m in data["messages"]]
        params = native_params(data, lora, messages=messages)
    else:
        params = native_params(data, lora, prompt=data["prompt"], raw=True)  # completions take text as is
    record = submit(params)
    shape = Shape(chat, record, data["model"])
    if data["stream"]:
        return answer_stream(record, shape, data.get("stream_options", {}).get("include_usage", False))
    response = answer_sync(record, shape)
    response.headers["X-Job-Id"] = record.id
    return response


STREAM_DOC = "With stream: Server-Sent Events of chunks, then data: [DONE]"


@bp.post("/chat/completions")
@document(
    "OpenAI-compatible chat completion, run as a job on the queue",
    description="Parameters genqueue cannot honour exactly (seed, penalties, n > 1, logprobs, tools, ...) are "
    "refused with a 400 naming them. The job's id is in the X-Job-Id header.",
    tags=["OpenAI-compatible"],
    request=ChatCompletionSchema,
    responses={
        200: ("The chat.completion; " + STREAM_DOC, None, "text/event-stream"),
        400: OPENAI_ERROR,
        404: OPENAI_ERROR,
        504: OPENAI_ERROR,
    },
)
def chat_completions():
    return run(chat=True)


@bp.post("/completions")
@document(
    "OpenAI-compatible text completion (the prompt is sent raw), run as a job on the queue",
    tags=["OpenAI-compatible"],
    request=CompletionSchema,
    responses={
        200: ("The text_completion; " + STREAM_DOC, None, "text/event-stream"),
        400: OPENAI_ERROR,
        404: OPENAI_ERROR,
        504: OPENAI_ERROR,
    },
)
def completions():
    return run(chat=False)
