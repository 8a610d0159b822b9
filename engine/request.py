"""The values that cross the engine's boundary: requests, options, usage and results.

Frozen dataclasses, so a request cannot change while it is queued or batched; each converts to and
from plain JSON-able dicts for the queue (`to_dict` / `from_dict`, and nothing else reads those
dicts). The limits below are the engine's: the API's schemas refuse what passes them, with the
field named, so a request that reaches the engine already fits.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.tools import Tool

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.6
DEFAULT_REPETITION_PENALTY = 1.0  # 1 leaves scores as they are
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_STOP_CHARS = 256  # per stop string; a longer one only delays streaming


class FinishReason(enum.StrEnum):
    STOP = "stop"  # the model emitted its end-of-turn token
    LENGTH = "length"  # max_tokens was reached
    CANCELLED = "cancelled"  # the caller stopped the generation


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are chosen, and by which model variant. temperature 0 (or top_k 1) means greedy."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k limit
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY  # CTranslate2's: > 1 penalizes tokens already generated
    lora: str | None = None  # a merged LoRA variant of the worker's model (see engine/lora.py); None: the base
    # Generation ends at the first of these strings, which the response leaves out. Applied per
    # prompt by the engine, so it does not split batches (batch_key leaves it out).
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str | list):  # one string, or a list from JSON: the tuple a frozen value needs
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1 or self.top_p == 0

    def batch_key(self) -> tuple:
        """Requests with equal keys may share one engine call: the call's settings and its model
        apply to all of its prompts. max_tokens is per prompt and so not part of it."""
        common = (self.lora, self.repetition_penalty)
        if self.greedy:
            return ("greedy", *common)
        return ("sample", self.temperature, self.top_p, self.top_k, *common)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: either a bare prompt or chat messages, and how to sample."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    raw: bool = False  # True: the prompt goes to the model as is, without the chat template
    options: SamplingOptions = field(default_factory=SamplingOptions)
    tools: tuple[Tool, ...] = ()  # rendered into the prompt; calls are parsed out of the reply

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a GenerationRequest needs exactly one of prompt or messages")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"raw": self.raw, "options": asdict(self.options)}
        data["options"]["stop"] = list(self.options.stop)
        if self.prompt is not None:
            data["prompt"] = self.prompt
        else:
            data["messages"] = [asdict(m) for m in self.messages or ()]
        if self.tools:
            data["tools"] = [tool.to_dict() for tool in self.tools]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """The request to_dict() described."""
        messages = data.get("messages")
        return cls(
            prompt=data.get("prompt"),
            messages=tuple(Message(m["role"], m["content"]) for m in messages) if messages is not None else None,
            raw=bool(data.get("raw", False)),
            options=SamplingOptions(**data.get("options", {})),
            tools=tuple(Tool.from_dict(tool) for tool in data.get("tools", ())),
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class GenerationResult:
    response: str
    usage: Usage
    finish_reason: FinishReason
    tool_calls: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "response": self.response,
            "tool_calls": list(self.tool_calls),
            "usage": self.usage.to_dict(),
            "finish_reason": self.finish_reason.value,
        }
