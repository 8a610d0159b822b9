"""Request validation: marshmallow schemas mirroring Workers AI's llama-2-7b-chat-int8 input.

Fields are strict: a number must be a JSON number (not a string or a boolean), a flag a JSON
boolean, and unknown fields are refused, so a typo never passes silently. Every parameter of the
source API is here; those the engine cannot honour exactly are refused with the reason (`REFUSALS`).
"""

from __future__ import annotations

import math
import numbers

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate, validates_schema

from engine.request import DEFAULT_MAX_TOKENS, DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE
from engine.stop import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from genqueue.config import QUEUES

MAX_TEXT_CHARS = 131072  # prompt and message content, as in the source API
MAX_TOKENS_LIMIT = 131072  # schema bound; the worker also checks prompt + max_tokens against the model
MAX_SEED = 9999999999
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


class FunctionToolSchema(Schema):
    """A tool in the {"type": "function", "function": {...}} form."""

    type = fields.String(required=True, validate=validate.OneOf(["function"]))
    function = fields.Nested(ToolSchema, required=True)


class FunctionSchema(Schema):
    """An entry of Workers AI's `functions`: rendered into the prompt like a tool (never executed)."""

    name = fields.String(required=True, validate=validate.Length(min=1))
    code = fields.String(required=True)


class ToolField(fields.Field):
    """Either tool form: {"type": "function", "function": {...}} or the flat {name, description, parameters}."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict):
            raise ValidationError("Not a valid tool: give an object.")
        schema = FunctionToolSchema() if "function" in value or "type" in value else ToolSchema()
        return schema.load(value)


def doc(text: str) -> dict:
    """Field metadata for the OpenAPI description."""
    return {"metadata": {"description": text}}


class GenerationSchema(Schema):
    """A generation job: exactly one of prompt or messages, and how to sample (Workers AI's
    llama-2-7b-chat-int8 input)."""

    prompt = fields.String(
        validate=validate.Length(min=1, max=MAX_TEXT_CHARS),
        **doc("Sent as one user turn through the chat template, unless raw. Exactly one of prompt or messages."),
    )
    messages = fields.List(
        fields.Nested(MessageSchema),
        validate=validate.Length(min=1),
        **doc("The conversation, rendered by the chat template. Exactly one of prompt or messages."),
    )
    raw = StrictBoolean(load_default=False, **doc("Send the prompt to the model as is, without the chat template."))
    stream = StrictBoolean(load_default=False, **doc("Answer with the SSE stream of the job's chunks."))
    max_tokens = StrictInteger(
        load_default=DEFAULT_MAX_TOKENS,
        validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT),
        **doc("Most tokens to generate; prompt plus max_tokens must fit the model's context."),
    )
    temperature = StrictFloat(
        load_default=DEFAULT_TEMPERATURE, validate=validate.Range(min=0, max=5), **doc("0 is greedy decoding.")
    )
    top_p = StrictFloat(
        validate=validate.Range(min=0, max=2), **doc("Nucleus sampling; 0 is greedy, 1 and above cut nothing.")
    )
    top_k = StrictInteger(validate=validate.Range(min=1, max=50), **doc("Sample among the k likeliest; 1 is greedy."))
    seed = StrictInteger(validate=[validate.Range(min=1, max=MAX_SEED), refuse("seed")], **doc(REFUSALS["seed"]))
    repetition_penalty = StrictFloat(
        load_default=DEFAULT_REPETITION_PENALTY,
        validate=[validate.Range(min=0, max=2), above_zero("repetition_penalty")],
        **doc("CTranslate2's repetition penalty: above 1 penalizes tokens already generated; must be above 0."),
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
        fields.Nested(FunctionSchema), **doc("Functions ({name, code}) listed to the model like tools; never run.")
    )
    tools = fields.List(
        ToolField(),
        **doc("Tools, flat or as {type: function, function}; calls the model makes come back in tool_calls."),
    )
    stop = StopSequences(
        **doc("One string or up to 4: generation ends at the first occurrence, left out of the response.")
    )
    queue = fields.String(
        validate=validate.OneOf(QUEUES),
        **doc("Which workers run the job; none: the GPU queue while a GPU worker is alive, else the default."),
    )

    @validates_schema
    def _one_input(self, data, **_kwargs):
        if ("prompt" in data) == ("messages" in data):
            message = "Give exactly one of prompt or messages."
            raise ValidationError({"prompt": [message], "messages": [message]})
        if data.get("raw") and "messages" in data:
            raise ValidationError("raw=true takes a prompt: messages need the chat template.", "raw")
        if data.get("raw") and (data.get("tools") or data.get("functions")):
            raise ValidationError("raw=true sends the prompt as is: tools and functions need the chat template.", "raw")


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
