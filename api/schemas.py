"""Request validation: marshmallow schemas mirroring Workers AI's llama-2-7b-chat-int8 input.

Fields are strict: a number must be a JSON number (not a string or a boolean), a flag a JSON
boolean, and unknown fields are refused, so a typo never passes silently.
"""

from __future__ import annotations

import math
import numbers

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from engine.request import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE
from genqueue.config import QUEUES

MAX_TEXT_CHARS = 131072  # prompt and message content, as in the source API
MAX_TOKENS_LIMIT = 131072  # schema bound; the worker also checks prompt + max_tokens against the model
ROLES = ("system", "user", "assistant", "tool")


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


class MessageSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    content = fields.String(required=True, validate=validate.Length(max=MAX_TEXT_CHARS))


class GenerationSchema(Schema):
    """A generation job: exactly one of prompt or messages, and how to sample."""

    prompt = fields.String(validate=validate.Length(min=1, max=MAX_TEXT_CHARS))
    messages = fields.List(fields.Nested(MessageSchema), validate=validate.Length(min=1))
    raw = StrictBoolean(load_default=False)
    stream = StrictBoolean(load_default=False)
    max_tokens = StrictInteger(load_default=DEFAULT_MAX_TOKENS, validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT))
    temperature = StrictFloat(load_default=DEFAULT_TEMPERATURE, validate=validate.Range(min=0, max=5))
    top_p = StrictFloat(validate=validate.Range(min=0, max=2))
    top_k = StrictInteger(validate=validate.Range(min=1, max=50))
    # Which workers run the job; none: the GPU queue while a GPU worker is alive, else the default.
    queue = fields.String(validate=validate.OneOf(QUEUES))

    @validates_schema
    def _one_input(self, data, **_kwargs):
        if ("prompt" in data) == ("messages" in data):
            message = "Give exactly one of prompt or messages."
            raise ValidationError({"prompt": [message], "messages": [message]})
        if data.get("raw") and "messages" in data:
            raise ValidationError("raw=true takes a prompt: messages need the chat template.", "raw")
