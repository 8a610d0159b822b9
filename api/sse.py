"""A job's events as Server-Sent Events in Workers AI's format.

Each chunk is `id: <seq>` and `data: {"response": "<text>"}`; a successful end adds one last event
with an empty response, the usage and the finish reason; a failure sends `event: error`; then
`data: [DONE]`. The ids are the chunks' sequence numbers, so Last-Event-ID resumes exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from tasks.states import JobState
from tasks.store import CHUNK, JobStore

DONE = "data: [DONE]\n\n"


def _event(seq: int, payload: dict, name: str | None = None) -> str:
    head = f"id: {seq}\n" + (f"event: {name}\n" if name else "")
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def job_event_stream(store: JobStore, job_id: str, after_seq: int, keepalive_s: float) -> Iterator[str]:
    for event in store.follow(job_id, after_seq, poll_s=keepalive_s):
        if event is None:
            yield ": keep-alive\n\n"
        elif event["type"] == CHUNK:
            yield _event(event["seq"], {"response": event["text"]})
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
