"""Request validation: marshmallow schemas mirroring Workers AI's llama-2-7b-chat-int8 input.

Fields are strict: a number must be a JSON number (not a string or a boolean), a flag a JSON
boolean, and unknown fields are refused, so a typo never passes silently. Every parameter of the
source API is here; those the engine cannot honour exactly are refused with the reason (`REFUSALS`).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema

from api.generation import Submission, Surface, default_of, generation_request
from config import QUEUES
from engine.request import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from engine.tools import Tool
from tasks.runtime.delivery import MAX_URL_CHARS

MAX_TEXT_CHARS = 131072  # prompt and message content, as in the source API
# Beside each field's limit, one request's whole: its messages' text together, its tools and functions
# together (as the JSON rendered into the prompt), and how many of each.
MAX_MESSAGES = 256
MAX_TOTAL_TEXT_CHARS = MAX_TEXT_CHARS
MAX_TOOLS = 64
MAX_TOOLS_CHARS = 32768
MAX_TOKENS_LIMIT = 131072  # schema bound; the worker also checks prompt + max_tokens against the model
MAX_SEED = 9999999999
# metadata: a small map of strings returned with the job or batch, with OpenAI's limits.
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
METADATA_RULE = (
    f"An object of at most {MAX_METADATA_PAIRS} string pairs, keys of 1 to {MAX_METADATA_KEY_CHARS} "
    f"characters, values of at most {MAX_METADATA_VALUE_CHARS}."
)
MAX_TOP_K = 50  # as the source API
ROLES = ("system", "user", "assistant", "tool")

# Why a parameter (or a value of it) is refused: the engine, CTranslate2 4.8.5, cannot honour it exactly.
REFUSALS = {
    "seed": (
        "seed is not supported: CTranslate2 has no per-request seed (its random generators are per "
        "thread, seeded once, and shared by every job a worker batches), so the same seed could not "
        "give the same output; omit it"
    ),
    "frequency_penalty": (
        "frequency_penalty is not supported: CTranslate2 cannot subtract count-based penalties from "
        "the logits; only 0 (no penalty) is accepted. repetition_penalty is supported"
    ),
    "presence_penalty": (
        "presence_penalty is not supported: CTranslate2 cannot subtract presence penalties from the "
        "logits; only 0 (no penalty) is accepted. repetition_penalty is supported"
    ),
    "repetition_penalty": ("repetition_penalty must be above 0: CTranslate2 divides scores by it (1 is no penalty)"),
}


class StrictBoolean(fields.Boolean):
    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise ValidationError("Not a valid boolean: use true or false.")
        return value


class StrictInteger(fields.Integer):
    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValidationError("Not a valid integer.")
        return int(value)


class StrictFloat(fields.Float):
    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValidationError("Not a valid number.")
        if not math.isfinite(value):
            raise ValidationError("Must be a finite number (not NaN or Infinity).")
        return float(value)


class StopSequences(fields.Field):
    """`stop`: one string or a list of up to MAX_STOP_SEQUENCES, each 1 to MAX_STOP_CHARS characters."""

    def _deserialize(self, value, attr, data, **kwargs):
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValidationError("Must be a string or a list of strings.")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValidationError(f"At most {MAX_STOP_SEQUENCES} stop sequences.")
        if not all(1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValidationError(f"Each stop sequence must be 1 to {MAX_STOP_CHARS} characters.")
        return stops


def is_metadata(value: Any) -> bool:
    """Whether value is a metadata map within the limits (METADATA_RULE)."""
    return (
        isinstance(value, dict)
        and len(value) <= MAX_METADATA_PAIRS
        and all(isinstance(k, str) and 1 <= len(k) <= MAX_METADATA_KEY_CHARS for k in value)
        and all(isinstance(v, str) and len(v) <= MAX_METADATA_VALUE_CHARS for v in value.values())
    )


class MetadataField(fields.Dict):
    """`metadata`: labels for the caller's own records, stored and returned with the job (or batch)."""

    def __init__(self, **kwargs):
        super().__init__(
            keys=fields.String(validate=validate.Length(min=1, max=MAX_METADATA_KEY_CHARS)),
            values=fields.String(validate=validate.Length(max=MAX_METADATA_VALUE_CHARS)),
            validate=validate.Length(max=MAX_METADATA_PAIRS),
            metadata={"description": f"Labels returned with the job. {METADATA_RULE}", **kwargs.pop("metadata", {})},
            **kwargs,
        )

    def _deserialize(self, value, attr, data, **kwargs):
        if not is_metadata(value):
            raise ValidationError(METADATA_RULE)
        return dict(value)


def WebhookField() -> fields.String:  # noqa: N802 - reads as the field it builds
    """`webhook`: an http(s) URL told when the job (or batch) ends; the service checks where it points."""
    return fields.String(
        validate=validate.Length(min=1, max=MAX_URL_CHARS),
        **doc(
            "An http(s) URL that receives a signed POST (Standard Webhooks) when the job ends: type job.succeeded, "
            "job.failed or job.cancelled, and the job as GET returns it. Refused (400) if it can never be delivered."
        ),
    )


def refuse(field: str):
    """A validator refusing every value: the parameter cannot be honoured (REFUSALS says why)."""

    def check(_value):
        raise ValidationError(REFUSALS[field])

    return check


def only_zero(field: str):
    """A validator accepting only 0: the no-op value of a penalty the engine does not have."""

    def check(value):
        if value != 0:
            raise ValidationError(REFUSALS[field])

    return check


def above_zero(field: str):
    def check(value):
        if value <= 0:
            raise ValidationError(REFUSALS[field])

    return check


class MessageSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    content = fields.String(required=True, validate=validate.Length(max=MAX_TEXT_CHARS))


class ToolPropertySchema(Schema):
    """One parameter of a tool. Other JSON Schema keywords (enum, items, ...) pass through to the prompt."""

    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True, validate=validate.Length(min=1))
    description = fields.String(required=True)


class ToolParametersSchema(Schema):
    type = fields.String(required=True, validate=validate.Length(min=1))
    properties = fields.Dict(keys=fields.String(), values=fields.Nested(ToolPropertySchema), required=True)
    required = fields.List(fields.String())


class ToolSchema(Schema):
    """A tool in Workers AI's flat form; also the `function` of the other form."""

    name = fields.String(required=True, validate=validate.Length(min=1))
    description = fields.String(required=True)
    parameters = fields.Nested(ToolParametersSchema, required=True)

    @post_load
    def _tool(self, data, **_kwargs) -> Tool:
        return Tool(name=data["name"], description=data["description"], parameters=data["parameters"])


class FunctionToolSchema(Schema):
    """A tool in the {"type": "function", "function": {...}} form."""

    type = fields.String(required=True, validate=validate.OneOf(["function"]))
    function = fields.Nested(ToolSchema, required=True)

    @post_load
    def _tool(self, data, **_kwargs) -> Tool:
        return data["function"]


class FunctionSchema(Schema):
    """An entry of Workers AI's `functions`: rendered into the prompt like a tool (never executed)."""

    name = fields.String(required=True, validate=validate.Length(min=1))
    code = fields.String(required=True)

    @post_load
    def _tool(self, data, **_kwargs) -> Tool:
        return Tool(name=data["name"], code=data["code"])


class ToolField(fields.Field):
    """Either tool form, {"type": "function", "function": {...}} or the flat {name, description,
    parameters}, loaded as the engine's Tool."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict):
            raise ValidationError("Not a valid tool: give an object.")
        schema = FunctionToolSchema() if "function" in value or "type" in value else ToolSchema()
        return schema.load(value)


def doc(text: str, default_of_option: str | None = None) -> dict:
    """Field metadata for the OpenAPI description (and the native surface's default, if any)."""
    metadata: dict[str, Any] = {"description": text}
    if default_of_option is not None:
        metadata["doc_default"] = default_of(Surface.NATIVE, default_of_option)
    return {"metadata": metadata}


class GenerationSchema(Schema):
    """A generation job: exactly one of prompt or messages, and how to sample (Workers AI's
    llama-2-7b-chat-int8 input)."""

    prompt = fields.String(
        validate=validate.Length(min=1, max=MAX_TEXT_CHARS),
        **doc("Sent as one user turn through the chat template, unless raw. Exactly one of prompt or messages."),
    )
    messages = fields.List(
        fields.Nested(MessageSchema),
        validate=validate.Length(min=1, max=MAX_MESSAGES),
        **doc(
            "The conversation, rendered by the chat template. Exactly one of prompt or messages. "
            f"At most {MAX_MESSAGES} messages of {MAX_TOTAL_TEXT_CHARS} characters together."
        ),
    )
    raw = StrictBoolean(load_default=False, **doc("Send the prompt to the model as is, without the chat template."))
    stream = StrictBoolean(load_default=False, **doc("Answer with the SSE stream of the job's chunks."))
    max_tokens = StrictInteger(
        validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT),
        **doc("Most tokens to generate; prompt plus max_tokens must fit the model's context.", "max_tokens"),
    )
    temperature = StrictFloat(validate=validate.Range(min=0, max=5), **doc("0 is greedy decoding.", "temperature"))
    top_p = StrictFloat(
        validate=validate.Range(min=0, max=2), **doc("Nucleus sampling; 0 is greedy, 1 and above cut nothing.")
    )
    top_k = StrictInteger(
        validate=validate.Range(min=1, max=MAX_TOP_K), **doc("Sample among the k likeliest; 1 is greedy.")
    )
    seed = StrictInteger(validate=[validate.Range(min=1, max=MAX_SEED), refuse("seed")], **doc(REFUSALS["seed"]))
    repetition_penalty = StrictFloat(
        validate=[validate.Range(min=0, max=2), above_zero("repetition_penalty")],
        **doc(
            "CTranslate2's repetition penalty: above 1 penalizes tokens already generated; must be above 0.",
            "repetition_penalty",
        ),
    )
    frequency_penalty = StrictFloat(
        validate=[validate.Range(min=0, max=2), only_zero("frequency_penalty")], **doc(REFUSALS["frequency_penalty"])
    )
    presence_penalty = StrictFloat(
        validate=[validate.Range(min=0, max=2), only_zero("presence_penalty")], **doc(REFUSALS["presence_penalty"])
    )
    lora = fields.String(
        validate=validate.Length(min=1, max=256),
        **doc("A LoRA variant prepared with 'genqueue model prepare --lora'; unknown names are refused."),
    )
    functions = fields.List(
        fields.Nested(FunctionSchema),
        validate=validate.Length(max=MAX_TOOLS),
        **doc("Functions ({name, code}) listed to the model like tools; never run."),
    )
    tools = fields.List(
        ToolField(),
        validate=validate.Length(max=MAX_TOOLS),
        **doc(
            "Tools, flat or as {type: function, function}; calls the model makes come back in tool_calls. "
            f"Tools and functions together: at most {MAX_TOOLS_CHARS} characters of JSON."
        ),
    )
    stop = StopSequences(
        **doc("One string or up to 4: generation ends at the first occurrence, left out of the response.")
    )
    queue = fields.String(
        validate=validate.OneOf(QUEUES),
        **doc("Which workers run the job; none: the GPU queue while a GPU worker is alive, else the default."),
    )
    webhook = WebhookField()
    metadata = MetadataField()

    @validates_schema
    def _one_input(self, data, **_kwargs):
        if ("prompt" in data) == ("messages" in data):
            message = "Give exactly one of prompt or messages."
            raise ValidationError({"prompt": [message], "messages": [message]})
        if data.get("raw") and "messages" in data:
            raise ValidationError("raw=true takes a prompt: messages need the chat template.", "raw")
        if data.get("raw") and (data.get("tools") or data.get("functions")):
            raise ValidationError("raw=true sends the prompt as is: tools and functions need the chat template.", "raw")

    @validates_schema
    def _sizes(self, data, **_kwargs):
        check_total_text([m["content"] for m in data.get("messages", ())])
        tools = [*data.get("tools", ()), *data.get("functions", ())]
        if len(json.dumps([tool.to_dict() for tool in tools])) > MAX_TOOLS_CHARS:
            raise ValidationError(f"Tools and functions together exceed {MAX_TOOLS_CHARS} characters of JSON.", "tools")


def check_total_text(texts: list[str], field: str = "messages") -> None:
    """A ValidationError when the messages' text together exceeds MAX_TOTAL_TEXT_CHARS."""
    total = sum(len(text) for text in texts)
    if total > MAX_TOTAL_TEXT_CHARS:
        raise ValidationError(f"{total} characters in all, over the limit of {MAX_TOTAL_TEXT_CHARS}.", field)


SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "lora", "stop")


def to_submission(data: dict[str, Any]) -> Submission:
    """A native body as GenerationSchema loaded it, as the service's Submission. The neutral values
    of the penalties the engine lacks (0) ask for nothing; seed never loads (it is refused)."""
    request = generation_request(
        Surface.NATIVE,
        prompt=data.get("prompt"),
        messages=data.get("messages"),
        raw=data.get("raw", False),
        tools=[*data.get("tools", ()), *data.get("functions", ())],
        **{name: data.get(name) for name in SAMPLING_FIELDS},
    )
    return Submission(
        request=request, queue=data.get("queue"), webhook=data.get("webhook"), metadata=data.get("metadata")
    )


# -- Response shapes: what the endpoints answer, for the OpenAPI document ---------------------------


class UsageSchema(Schema):
    prompt_tokens = fields.Integer()
    completion_tokens = fields.Integer()
    total_tokens = fields.Integer()


class ToolCallSchema(Schema):
    name = fields.String()
    arguments = fields.Dict(**doc("The arguments the model gave, as a JSON object."))


class ResultSchema(Schema):
    response = fields.String(**doc("The generated text (with any tool call markup the model wrote)."))
    tool_calls = fields.List(fields.Nested(ToolCallSchema), **doc("Tool calls parsed from the response; [] if none."))
    usage = fields.Nested(UsageSchema)
    finish_reason = fields.String(
        validate=validate.OneOf(["stop", "length", "cancelled"]),
        **doc("stop: end of turn; length: max_tokens reached; cancelled: stopped early."),
    )


class JobErrorSchema(Schema):
    code = fields.String(**doc("e.g. context_length_exceeded, chat_template_error, unknown_lora, engine_error"))
    message = fields.String()


class JobSchema(Schema):
    id = fields.String()
    status = fields.String(validate=validate.OneOf(["queued", "running", "succeeded", "failed", "cancelled"]))
    created_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    result = fields.Nested(ResultSchema, allow_none=True)
    error = fields.Nested(JobErrorSchema, allow_none=True)
    metadata = fields.Dict(
        keys=fields.String(), values=fields.String(), **doc("The labels given at submit ({} if none).")
    )


class JobListSchema(Schema):
    object = fields.String(validate=validate.Equal("list"))
    data = fields.List(fields.Nested(JobSchema), **doc("Newest first."))
    first_id = fields.String(allow_none=True)
    last_id = fields.String(allow_none=True, **doc("Give it as ?after= for the next page."))
    has_more = fields.Boolean()


class ErrorDetailSchema(Schema):
    code = fields.String()
    message = fields.String()
    fields_ = fields.Dict(data_key="fields", **doc("Each invalid field, with its problems."))


class ErrorSchema(Schema):
    error = fields.Nested(ErrorDetailSchema)


class EnvelopeErrorSchema(Schema):
    code = fields.String()
    message = fields.String()
    fields_ = fields.Dict(data_key="fields", **doc("Each invalid field, with its problems (400 only)."))


class EnvelopeSchema(Schema):
    """Cloudflare's response envelope."""

    result = fields.Nested(ResultSchema, allow_none=True)
    success = fields.Boolean()
    errors = fields.List(fields.Nested(EnvelopeErrorSchema))
    messages = fields.List(fields.String())


class StreamEventSchema(Schema):
    """The `data` of a job's SSE event: a chunk's text, or (last) tool_calls, usage and finish_reason;
    an `event: error` carries {error: {code, message}}. The stream ends with `data: [DONE]`."""

    response = fields.String(**doc("The chunk's text ('' in the last event)."))
    tool_calls = fields.List(fields.Nested(ToolCallSchema), **doc("Last event only."))
    usage = fields.Nested(UsageSchema, **doc("Last event only."))
    finish_reason = fields.String(**doc("Last event only: stop, length or cancelled."))


class BatchItemSchema(GenerationSchema):
    """One request of a JSON batch: a job's body (without stream or webhook) and an optional custom_id."""

    custom_id = fields.String(validate=validate.Length(min=1, max=512), **doc("Echoed in the results."))


class BatchCreateSchema(Schema):
    """A JSON batch. (A JSONL upload sends one {"custom_id", "body"} a line instead.)"""

    requests = fields.List(fields.Nested(BatchItemSchema), required=True)
    metadata = MetadataField()
    webhook = WebhookField()


class RequestCountsSchema(Schema):
    total = fields.Integer()
    completed = fields.Integer(**doc("Succeeded."))
    failed = fields.Integer()
    cancelled = fields.Integer()


class BatchSchema(Schema):
    """A batch (genqueue's shape; one made from an uploaded file has OpenAI's, OpenAIBatch)."""

    id = fields.String()
    object = fields.String(**doc("batch"))
    status = fields.String(
        validate=validate.OneOf(
            [
                "validating",
                "in_progress",
                "finalizing",
                "completed",
                "completed_with_errors",
                "failed",
                "cancelling",
                "cancelled",
            ]
        ),
        **doc(
            "completed: every request succeeded; completed_with_errors: every request ended, some failed or were "
            "cancelled alone; failed: the requests could not be queued; cancelled: the batch was cancelled."
        ),
    )
    request_counts = fields.Nested(RequestCountsSchema)
    usage = fields.Nested(UsageSchema)
    metadata = fields.Dict(keys=fields.String(), values=fields.String())
    created_at = fields.DateTime()
    in_progress_at = fields.DateTime(allow_none=True)
    finalizing_at = fields.DateTime(allow_none=True)
    completed_at = fields.DateTime(allow_none=True)
    failed_at = fields.DateTime(allow_none=True)
    cancelling_at = fields.DateTime(allow_none=True)
    cancelled_at = fields.DateTime(allow_none=True)
    expires_at = fields.DateTime(allow_none=True)
    error = fields.Nested(JobErrorSchema, allow_none=True)
    results_url = fields.String()


class AnyBatch(fields.Raw):
    """A batch in the shape of the form it was made in: BatchSchema, or OpenAI's (api/openapi.py
    documents it as oneOf the two)."""


class BatchListSchema(Schema):
    object = fields.String(validate=validate.Equal("list"))
    data = fields.List(AnyBatch(), **doc("Newest first (a batch made from a file: OpenAI's shape)."))
    first_id = fields.String(allow_none=True)
    last_id = fields.String(allow_none=True)
    has_more = fields.Boolean()


class HealthSchema(Schema):
    status = fields.String(**doc("ok"))


class QueueReadinessSchema(Schema):
    workers = fields.Integer()
    models = fields.List(fields.String())
    waiting = fields.Integer()


class WorkerSchema(Schema):
    id = fields.String()
    queues = fields.List(fields.String())
    model = fields.String()
    device = fields.String()
    compute_type = fields.String()
    loras = fields.List(fields.String())
    max_context = fields.Integer(allow_none=True)
    created = fields.Integer()
    tokenizer = fields.String(allow_none=True)
    running = fields.Integer()
    extra = fields.Dict()


class ReadinessSchema(Schema):
    status = fields.String(validate=validate.OneOf(["ready", "unavailable"]))
    missing = fields.List(fields.String())
    redis = fields.String(**doc("With a key (or an open API): ok, or why Redis is unreachable."))
    queues = fields.Dict(keys=fields.String(), values=fields.Nested(QueueReadinessSchema), **doc("With a key."))
    workers = fields.List(fields.Nested(WorkerSchema), **doc("With a key."))
