"""A job's events as Server-Sent Events in Workers AI's format (the native and Workers AI streams).

Each chunk is `id: <seq>` and `data: {"response": "<text>"}`; a successful end adds one last event
with an empty response, the usage and the finish reason; a failure sends `event: error`; then
`data: [DONE]`. The ids are the chunks' sequence numbers, so Last-Event-ID resumes exactly. A stream
that stops before its job ends (its time limit) sends `event: error` without an id, then [DONE].
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from tasks.store.jobs import CHUNK, END
from tasks.store.states import JobState

DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"


def _event(seq: int | None, payload: dict, name: str | None = None) -> str:
    head = (f"id: {seq}\n" if seq is not None else "") + (f"event: {name}\n" if name else "")
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def job_event_stream(events: Iterable[dict | None]) -> Iterator[str]:
    """The SSE text of a job's events (None: a quiet interval, sent as a keep-alive comment)."""
    for event in events:
        if event is None:
            yield KEEPALIVE
        elif event["type"] == CHUNK:
            yield _event(event["seq"], {"response": event["text"]})
        elif event["type"] != END:  # the stream stopped first (api/waiting.py INTERRUPTED)
            yield _event(None, {"error": event["error"]}, name="error")
            yield DONE
        elif event["status"] == JobState.FAILED.value:
            yield _event(event["seq"], {"error": event.get("error")}, name="error")
            yield DONE
        else:
            result = event.get("result") or {}
            yield _event(
                event["seq"],
                {
                    "response": "",
                    "tool_calls": result.get("tool_calls", []),
                    "usage": result.get("usage"),
                    "finish_reason": result.get("finish_reason"),
                },
            )
            yield DONE
