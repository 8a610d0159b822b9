"""OpenAI's wire format: the request schemas of chat completions and completions, the parameters
genqueue refuses and why, and the shapes of the answers (the protocol layer, as vLLM's OpenAI server
splits it: protocol, serving, routes).

Parameters follow the native API's rule: each is honoured exactly or refused with a 400 that names
it. CTranslate2 has no per-call seed and no frequency or presence penalty, so `seed` and non-zero
penalties are refused; so is every parameter genqueue does not implement (logprobs, response_format,
...), rather than ignored. Tools are offered to the model as the native API offers them; a
tool_choice that would force a call ("required", a named function) is refused: nothing constrains
decoding, so no call can be guaranteed. Of the sampling extras other OpenAI-compatible servers (vLLM, TGI, llama.cpp)
take, top_k and repetition_penalty are honoured; the rest are refused (SERVER_EXTRAS_REFUSED).
"""

from __future__ import annotations

import json

from marshmallow import INCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema

from api.errors import ApiError
from api.schemas import (
    MAX_MESSAGES,
    MAX_TEXT_CHARS,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    MAX_TOOLS_CHARS,
    MAX_TOP_K,
    MetadataField,
    StopSequences,
    StrictBoolean,
    StrictFloat,
    StrictInteger,
    WebhookField,
    above_zero,
    check_total_text,
)
from engine.tools import Tool, without_call_markup
from tasks.store.jobs import JobRecord

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
    "parallel_tool_calls": "the model may make several calls in one reply; false cannot be enforced",
    "functions": "the deprecated functions parameter is not supported: give tools",
    "function_call": "the deprecated function_call parameter is not supported: give tools and tool_choice",
    "response_format": "structured output (response_format) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model does not reason",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "service_tier": "there is one service tier",
    "store": "completions are kept as genqueue jobs, not stored by this flag",
    "prompt_cache_key": "prompt caching is not supported",
    "prompt_cache_retention": "prompt caching is not supported",
    "safety_identifier": "safety identifiers are not supported",
}
# The sampling extras vLLM's, TGI's and llama.cpp's OpenAI-compatible servers take beside OpenAI's
# fields. top_k and repetition_penalty map exactly onto CTranslate2 (_CommonSchema takes them); these
# do not, and are refused with the reason.
SERVER_EXTRAS_REFUSED = {
    "min_p": "CTranslate2 has no min-p sampling",
    "typical_p": "CTranslate2 has no typical sampling",
    "top_a": "CTranslate2 has no top-a sampling",
    "tfs_z": "CTranslate2 has no tail-free sampling",
    "mirostat": "CTranslate2 has no Mirostat sampling",
    "mirostat_tau": "CTranslate2 has no Mirostat sampling",
    "mirostat_eta": "CTranslate2 has no Mirostat sampling",
    "dynatemp_range": "CTranslate2 has no dynamic temperature",
    "min_tokens": (
        "CTranslate2's min_length applies to a whole engine call, shared by every job batched into it, "
        "so one job's minimum cannot be honoured alone"
    ),
    "ignore_eos": "a generation always ends at the model's end-of-turn token (or max_tokens)",
    "stop_token_ids": "end tokens apply to a whole engine call; give stop strings (stop) instead",
    "repeat_penalty": (
        "llama.cpp's penalty covers a window of the last tokens, prompt included; use repetition_penalty, "
        "CTranslate2's, which counts the generated tokens"
    ),
    "repeat_last_n": "CTranslate2's repetition_penalty counts every generated token, not a window",
    "length_penalty": "beam search is not used",
    "use_beam_search": "beam search is not used",
    "early_stopping": "beam search is not used",
    "include_stop_str_in_output": "the stop string is always left out of the text",
    "guided_json": "constrained decoding is not supported",
    "guided_regex": "constrained decoding is not supported",
    "guided_choice": "constrained decoding is not supported",
    "guided_grammar": "constrained decoding is not supported",
    "grammar": "constrained decoding is not supported",
    "json_schema": "constrained decoding is not supported",
    "truncate_prompt_tokens": "prompts are never truncated: one over the context fails with context_length_exceeded",
    "truncate": "prompts are never truncated: one over the context fails with context_length_exceeded",
    "n_probs": "log probabilities are not returned",
    "do_sample": "sampling is set by temperature (0 is greedy), top_p and top_k",
}
UNSUPPORTED.update(SERVER_EXTRAS_REFUSED)
NEUTRAL = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False,),
    "echo": (False,),
    "parallel_tool_calls": (True,),
    "modalities": (["text"],),
    "min_p": (0,),
    "typical_p": (1,),
    "tfs_z": (1,),
    "mirostat": (0,),
    "min_tokens": (0,),
    "ignore_eos": (False,),
    "repeat_penalty": (1,),
    "length_penalty": (1,),
    "use_beam_search": (False,),
    "early_stopping": (False,),
    "include_stop_str_in_output": (False,),
}


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


class ToolCallFunctionSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1))
    arguments = fields.String(required=True, metadata={"description": "The arguments, as a JSON object in a string."})


class MessageToolCallSchema(Schema):
    """A call an assistant turn made (OpenAI's shape): sent back, it is shown to the model as its own."""

    id = fields.String(required=True)
    type = fields.String(required=True, validate=validate.Equal("function"))
    function = fields.Nested(ToolCallFunctionSchema, required=True)

    @validates_schema
    def _arguments_are_an_object(self, data, **_kwargs):
        try:
            arguments = json.loads(data["function"]["arguments"])
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ValidationError("Must hold a JSON object, as a string.", "function")


class ChatMessageSchema(Schema):
    # developer is OpenAI's newer name for system; tool turns answer an assistant's tool_calls.
    role = fields.String(
        required=True,
        validate=validate.OneOf(
            ("system", "developer", "user", "assistant", "tool"),
            error="Must be one of: system, developer, user, assistant, tool.",
        ),
    )
    content = MessageContent(required=True, allow_none=True)
    tool_calls = fields.List(fields.Nested(MessageToolCallSchema), validate=validate.Length(min=1))
    tool_call_id = fields.String(metadata={"description": "The call a tool turn answers."})

    @validates_schema
    def _roles(self, data, **_kwargs):
        if data.get("content") is None and not data.get("tool_calls"):
            raise ValidationError("Must be given: only an assistant turn with tool_calls may leave it null.", "content")
        if "tool_calls" in data and data["role"] != "assistant":
            raise ValidationError("Only an assistant turn makes tool calls.", "tool_calls")
        if (data["role"] == "tool") != ("tool_call_id" in data):
            raise ValidationError("A tool turn, and only a tool turn, names the call it answers.", "tool_call_id")


class FunctionDefinitionSchema(Schema):
    name = fields.String(required=True, validate=[validate.Length(min=1, max=64), validate.Regexp(r"^[A-Za-z0-9_-]+$")])
    description = fields.String()
    parameters = fields.Dict(metadata={"description": "The arguments, as a JSON Schema object."})
    strict = StrictBoolean(
        validate=validate.Equal(False, error="strict: true needs constrained decoding, which is not supported."),
    )


class OpenAIToolSchema(Schema):
    type = fields.String(required=True, validate=validate.Equal("function"))
    function = fields.Nested(FunctionDefinitionSchema, required=True)

    @post_load
    def _tool(self, data, **_kwargs) -> Tool:
        function = data["function"]
        return Tool(
            name=function["name"], description=function.get("description"), parameters=function.get("parameters")
        )


class ToolChoice(fields.Field):
    """auto (the default) or none; "required" and a named function would force a call, which nothing can."""

    def _deserialize(self, value, attr, data, **kwargs):
        if value in ("auto", "none"):
            return value
        if value == "required" or isinstance(value, dict):
            raise ValidationError(
                "Only auto and none are supported: forcing a tool call needs constrained decoding, which "
                "CTranslate2 does not offer (offer the tools with auto; the reply's calls are parsed)."
            )
        raise ValidationError("Must be auto or none.")


class StreamOptionsSchema(Schema):
    include_usage = StrictBoolean(load_default=False)


class _CommonSchema(Schema):
    """What both endpoints take. Unknown fields pass here; check_parameters refuses them by name."""

    class Meta:
        unknown = INCLUDE

    model = fields.String(required=True, validate=validate.Length(min=1))
    max_tokens = StrictInteger(validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT))
    temperature = StrictFloat(validate=validate.Range(min=0, max=2))
    top_p = StrictFloat(validate=validate.Range(min=0, max=1))
    stop = StopSequences()
    stream = StrictBoolean(load_default=False)
    stream_options = fields.Nested(StreamOptionsSchema)
    user = fields.String(validate=validate.Length(max=256))  # an end-user id for the caller's records
    # Beside OpenAI's fields, as vLLM, TGI and llama.cpp take them (OpenAI clients: extra_body).
    # top_k -1 or 0 means no limit, as in vLLM and llama.cpp; the native API's bounds otherwise.
    top_k = StrictInteger(
        validate=validate.Range(min=-1, max=MAX_TOP_K, error=f"Must be 1 to {MAX_TOP_K}, or -1 or 0 for no limit."),
        metadata={"description": "Sample among the k likeliest; 1 is greedy; -1 or 0: no limit."},
    )
    repetition_penalty = StrictFloat(
        validate=[validate.Range(min=0, max=2), above_zero("repetition_penalty")],
        metadata={"description": "CTranslate2's: above 1 penalizes tokens already generated; 1 is none."},
    )
    webhook = WebhookField()
    metadata = MetadataField()

    @validates_schema
    def _stream_options_need_stream(self, data, **_kwargs):
        if "stream_options" in data and not data.get("stream"):
            raise ValidationError("Only allowed when stream is true.", "stream_options")


class ChatCompletionSchema(_CommonSchema):
    messages = fields.List(
        fields.Nested(ChatMessageSchema), required=True, validate=validate.Length(min=1, max=MAX_MESSAGES)
    )
    max_completion_tokens = StrictInteger(validate=validate.Range(min=1, max=MAX_TOKENS_LIMIT))
    tools = fields.List(fields.Nested(OpenAIToolSchema), validate=validate.Length(max=MAX_TOOLS))
    tool_choice = ToolChoice(metadata={"description": "auto (default) or none; forcing a call is refused."})

    @validates_schema
    def _total_text(self, data, **_kwargs):
        check_total_text([m["content"] or "" for m in data.get("messages", ())])

    @validates_schema
    def _tools(self, data, **_kwargs):
        if "tool_choice" in data and not data.get("tools"):
            raise ValidationError("Only allowed when tools are given.", "tool_choice")
        if len(json.dumps([tool.to_dict() for tool in data.get("tools", ())])) > MAX_TOOLS_CHARS:
            raise ValidationError(f"Tools together exceed {MAX_TOOLS_CHARS} characters of JSON.", "tools")

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
            message = f"Unsupported parameter {name!r}: {UNSUPPORTED[name]}."
            raise ApiError(400, "unsupported_parameter", message, {name: [message]})
        message = f"Unrecognized request argument supplied: {name}"
        raise ApiError(400, "unknown_parameter", message, {name: [message]})
    try:
        data = schema.load(body)
    except ValidationError as exc:
        name, problems = _first_problem(exc.messages)
        raise ApiError(
            400, "invalid_value", f"Invalid value for {name!r}: {problems}", {name or "body": [problems]}
        ) from exc
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


def answer_content(text: str, has_calls: bool) -> str | None:
    """A chat answer's content: the text, less its <tool_call> blocks when it made calls (null if
    nothing else is left), so a turn sent back with its tool_calls reads as the model wrote it."""
    if not has_calls:
        return text
    rest = without_call_markup(text)
    return rest if rest.strip() else None


class Shape:
    """How one endpoint's answers look: chat completions or text completions."""

    def __init__(self, chat: bool, job_id: str, created: float, model: str):
        self.chat = chat
        self.job_id = job_id
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id
        self.created = int(created)
        self.model = model

    @classmethod
    def of(cls, chat: bool, record: JobRecord, model: str) -> Shape:
        return cls(chat, record.id, record.created_at, model)

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def tool_calls(self, result: dict) -> list[dict]:
        """The job's tool calls in OpenAI's shape: arguments as a JSON string, an id per call."""
        return [
            {
                "id": f"call_{index}_{self.job_id}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
            }
            for index, call in enumerate(result.get("tool_calls") or [])
        ]

    def finish_reason(self, result: dict) -> str | None:
        """OpenAI's: tool_calls when the reply made calls and ended by itself."""
        reason = result.get("finish_reason")
        return "tool_calls" if self.chat and reason == "stop" and result.get("tool_calls") else reason

    def completion(self, result: dict) -> dict:
        text = result["response"]
        if self.chat:
            calls = self.tool_calls(result)
            message = {"role": "assistant", "content": answer_content(text, bool(calls)), "refusal": None}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason(result)}
            return {**self.head("chat.completion"), "choices": [choice], "usage": result["usage"]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": result["finish_reason"]}
        return {**self.head("text_completion"), "choices": [choice], "usage": result["usage"]}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            return self._chat_chunk(delta, finish_reason)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self.head("text_completion"), "choices": [choice]}

    def tool_calls_chunk(self, calls: list[dict]) -> dict:
        return self._chat_chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}, None)

    def _chat_chunk(self, delta: dict, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self.head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": usage}


# -- Response shapes, for the OpenAPI document ---------------------------------------------------------


class OpenAIErrorDetailSchema(Schema):
    message = fields.String()
    type = fields.String(metadata={"description": "invalid_request_error or server_error"})
    param = fields.String(allow_none=True, metadata={"description": "The parameter at fault, e.g. messages[0].role"})
    code = fields.String(allow_none=True)


class OpenAIErrorSchema(Schema):
    error = fields.Nested(OpenAIErrorDetailSchema)


# An OpenAI route's error response, as api/openapi.py document() takes it.
OPENAI_ERROR = ("OpenAI's error shape: {error: {message, type, param, code}}", OpenAIErrorSchema)


class OpenAIUsageSchema(Schema):
    prompt_tokens = fields.Integer()
    completion_tokens = fields.Integer()
    total_tokens = fields.Integer()


class AnswerToolCallSchema(Schema):
    id = fields.String()
    type = fields.String(metadata={"description": "function"})
    function = fields.Nested(ToolCallFunctionSchema)


class AssistantMessageSchema(Schema):
    role = fields.String(metadata={"description": "assistant"})
    content = fields.String(
        allow_none=True, metadata={"description": "The text, less any tool-call blocks; null when it was only calls."}
    )
    refusal = fields.String(allow_none=True)
    tool_calls = fields.List(fields.Nested(AnswerToolCallSchema))


class ChatChoiceSchema(Schema):
    index = fields.Integer()
    message = fields.Nested(AssistantMessageSchema)
    logprobs = fields.Raw(allow_none=True, metadata={"type": "object", "description": "Always null."})
    finish_reason = fields.String(metadata={"description": "stop, length or tool_calls"})


class ChatCompletionAnswerSchema(Schema):
    """A chat.completion (with stream: chat.completion.chunk events, ChatCompletionChunk)."""

    id = fields.String()
    object = fields.String(metadata={"description": "chat.completion"})
    created = fields.Integer()
    model = fields.String()
    choices = fields.List(fields.Nested(ChatChoiceSchema))
    usage = fields.Nested(OpenAIUsageSchema)


class ChunkToolCallSchema(AnswerToolCallSchema):
    index = fields.Integer()


class ChunkDeltaSchema(Schema):
    role = fields.String()
    content = fields.String(allow_none=True)
    tool_calls = fields.List(fields.Nested(ChunkToolCallSchema))


class ChunkChoiceSchema(Schema):
    index = fields.Integer()
    delta = fields.Nested(ChunkDeltaSchema)
    logprobs = fields.Raw(allow_none=True, metadata={"type": "object", "description": "Always null."})
    finish_reason = fields.String(allow_none=True)


class ChatCompletionChunkSchema(Schema):
    """The data of one event of a chat completion's stream; the stream ends with data: [DONE]."""

    id = fields.String()
    object = fields.String(metadata={"description": "chat.completion.chunk"})
    created = fields.Integer()
    model = fields.String()
    choices = fields.List(fields.Nested(ChunkChoiceSchema))
    usage = fields.Nested(OpenAIUsageSchema, allow_none=True, metadata={"description": "With include_usage."})


class TextChoiceSchema(Schema):
    index = fields.Integer()
    text = fields.String()
    logprobs = fields.Raw(allow_none=True, metadata={"type": "object", "description": "Always null."})
    finish_reason = fields.String(allow_none=True, metadata={"description": "stop or length"})


class TextCompletionAnswerSchema(Schema):
    """A text_completion (with stream: the same shape per event, then data: [DONE])."""

    id = fields.String()
    object = fields.String(metadata={"description": "text_completion"})
    created = fields.Integer()
    model = fields.String()
    choices = fields.List(fields.Nested(TextChoiceSchema))
    usage = fields.Nested(OpenAIUsageSchema, allow_none=True)
