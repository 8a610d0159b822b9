"""From a surface's validated fields to the engine's one request type, with that surface's defaults.

Every API surface (native jobs, Workers AI, batches, OpenAI chat and completions) validates its own
wire format, then calls `generation_request` once: the request that is stored, queued and run is
this frozen `GenerationRequest`, and nothing validates it again. Where surfaces differ in their
defaults, they differ here and nowhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.request import GenerationRequest, Message, SamplingOptions
from engine.tools import Tool


class Surface(enum.StrEnum):
    NATIVE = "native"  # POST /v1/jobs, /ai/run/... (Workers AI) and batch items: Workers AI's input
    OPENAI_CHAT = "openai_chat"
    OPENAI_COMPLETION = "openai_completion"


# Each surface's defaults where they are not the engine's own (SamplingOptions: max_tokens 256,
# temperature 0.6, as Workers AI's llama-2-7b-chat-int8). OpenAI documents temperature 1 and, for
# completions, max_tokens 16; its chat default ("until the context is full") is bounded here as the
# native one, since genqueue bounds every job.
SURFACE_DEFAULTS: dict[Surface, dict[str, Any]] = {
    Surface.NATIVE: {},
    Surface.OPENAI_CHAT: {"temperature": 1.0},
    Surface.OPENAI_COMPLETION: {"temperature": 1.0, "max_tokens": 16},
}


def default_of(surface: Surface, option: str) -> Any:
    """The value a surface uses for an option its request leaves out (for documentation, too)."""
    return SURFACE_DEFAULTS[surface].get(option, getattr(SamplingOptions(), option))


def generation_request(
    surface: Surface,
    *,
    prompt: str | None = None,
    messages: Iterable[Mapping[str, str]] | None = None,
    raw: bool = False,
    tools: Iterable[Tool] = (),
    **options: Any,
) -> GenerationRequest:
    """The engine's request for validated fields; options (SamplingOptions' names) left out or None
    take the surface's defaults."""
    given = {name: value for name, value in options.items() if value is not None}
    return GenerationRequest(
        prompt=prompt,
        messages=None if messages is None else tuple(Message(m["role"], m["content"]) for m in messages),
        raw=raw,
        options=SamplingOptions(**{**SURFACE_DEFAULTS[surface], **given}),
        tools=tuple(tools),
    )


@dataclass(frozen=True)
class Submission:
    """What a surface asks the service to run: the request, and where and how to run it."""

    request: GenerationRequest
    queue: str | None = None  # None: routed by the service (tasks/runtime/app.py queues)
    webhook: str | None = None  # an http(s) URL told of the job's end (checked by the service)
    metadata: Mapping[str, str] | None = None  # the caller's labels, returned with the job
