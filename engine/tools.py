"""Tool (function) calling: tool definitions into the prompt, tool calls out of the model's text.

The API turns each wire form of a tool (Workers AI's two forms of `tools`, its `functions`, OpenAI's
`tools`) into a `Tool`. When the model's chat template renders tools itself (its source mentions
`tools`), they are passed to it in the usual `{"type": "function", "function": {...}}` form.
Otherwise (SmolLM2, Llama-2) they go into the system prompt in the format below, which asks for
calls as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

`parse_tool_calls` reads such calls (or a reply that is nothing but one such JSON object) back. It
never raises: text it cannot read as a call of an offered tool leaves `tool_calls` empty, and the
text stays in the response either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

SYSTEM_PROMPT_HEADER = (
    "You can call the tools listed below. To call a tool, reply with only\n"
    f'{TOOL_CALL_OPEN}{{"name": "<tool name>", "arguments": {{<arguments as a JSON object>}}}}{TOOL_CALL_CLOSE}\n'
    "with one such line per call. If no tool is needed, answer normally.\n"
    "Tools (JSON):\n"
)

_TAGGED = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    """One callable the model is told about: a JSON-schema tool, or a Workers AI function (name, code)."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name}
        for key in ("description", "parameters", "code"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tool:
        return cls(
            name=data["name"],
            description=data.get("description"),
            parameters=data.get("parameters"),
            code=data.get("code"),
        )

    def template_form(self) -> dict[str, Any]:
        """The OpenAI-style form chat templates with a tools section expect."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = dict(self.parameters)
        if self.code is not None:
            function["code"] = self.code
        return {"type": "function", "function": function}


def system_prompt_section(tools: Sequence[Tool]) -> str:
    """The tool instructions for templates without a tools section (documented in the README)."""
    listed = json.dumps([tool.to_dict() for tool in tools], ensure_ascii=False)
    return SYSTEM_PROMPT_HEADER + listed


def _as_call(value: Any, names: set[str]) -> dict[str, Any] | None:
    """{"name", "arguments"} if value is a call of an offered tool with an object of arguments."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": value["name"], "arguments": arguments}


def _loads(text: str) -> Any:
    fenced = _FENCE.match(text.strip())
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None


def call_markup(call: Mapping[str, Any]) -> str:
    """A tool call ({"name", "arguments"}) as the model is asked to write it: a turn the caller sends
    back (OpenAI's assistant tool_calls) reads as the model's own."""
    payload = json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{payload}{TOOL_CALL_CLOSE}"


def without_call_markup(text: str) -> str:
    """The text with its <tool_call> blocks (and one left open at the end) taken out."""
    return _TAGGED.sub("", text)


def parse_tool_calls(text: str, tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """The tool calls in a model's reply; [] when there are none or any of them is malformed."""
    if not tools:
        return []
    names = {tool.name for tool in tools}
    if TOOL_CALL_OPEN in text:
        candidates = [_loads(body) for body in _TAGGED.findall(text)]
    else:  # a reply that is only a JSON call (or a list of them), as small models often answer
        parsed = _loads(text)
        candidates = parsed if isinstance(parsed, list) else [parsed]
    calls = [_as_call(candidate, names) for candidate in candidates]
    valid = [call for call in calls if call is not None]
    return valid if calls and len(valid) == len(calls) else []
