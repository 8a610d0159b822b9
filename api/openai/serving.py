"""Serving OpenAI requests on the queue: a validated request becomes a native job (one
`to_generation_request`), and the job's events and end become OpenAI's answers."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from flask import Response, current_app, jsonify

from api import waiting
from api.errors import ApiError, job_failure, openai_body
from api.generation import Submission, Surface, generation_request
from api.openai.protocol import Shape
from engine.tools import TOOL_CALL_OPEN, call_markup, without_call_markup
from tasks.store.jobs import CHUNK, END, JobRecord
from tasks.store.states import JobState

DONE = "data: [DONE]\n\n"
ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


def to_submission(data: dict, chat: bool, lora: str | None) -> Submission:
    """The native job for a validated OpenAI request: chat messages through the chat template (with
    the tools offered unless tool_choice is none), or a completion's prompt as is (raw)."""
    top_k = data.get("top_k")
    options = {
        "max_tokens": data.get("max_tokens") or data.get("max_completion_tokens"),
        "temperature": data.get("temperature"),
        "top_p": data.get("top_p"),
        "top_k": top_k if top_k and top_k > 0 else None,  # -1 and 0: no limit
        "repetition_penalty": data.get("repetition_penalty"),
        "stop": data.get("stop"),
        "lora": lora,
    }
    if chat:
        messages = [{"role": ROLES.get(m["role"], m["role"]), "content": turn_text(m)} for m in data["messages"]]
        tools = data.get("tools", []) if data.get("tool_choice") != "none" else []
        request = generation_request(Surface.OPENAI_CHAT, messages=messages, tools=tools, **options)
    else:
        request = generation_request(Surface.OPENAI_COMPLETION, prompt=data["prompt"], raw=True, **options)
    return Submission(request=request, webhook=data.get("webhook"), metadata=data.get("metadata"))


def turn_text(message: dict) -> str:
    """A turn's text for the chat template: an assistant turn's tool calls follow its content, written
    as the model was asked to write them (engine/tools.py), so the model reads them as its own."""
    calls = [
        call_markup({"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])})
        for call in message.get("tool_calls") or ()
    ]
    return "\n".join(([message["content"]] if message.get("content") else []) + calls)


class ContentFilter:
    """A stream's content as the answer's: once a <tool_call> block starts, the rest is held back;
    at the end it is sent less its call blocks if the reply made calls, or whole if it made none.
    Text that may begin the opening tag is held back until it cannot."""

    def __init__(self, active: bool):
        self.active = active
        self.pending = ""  # may begin the opening tag
        self.held: str | None = None  # from the first opening tag on

    def feed(self, text: str) -> str:
        """The part of text that can be sent now."""
        if not self.active:
            return text
        if self.held is not None:
            self.held += text
            return ""
        text = self.pending + text
        start = text.find(TOOL_CALL_OPEN)
        if start >= 0:
            self.pending, self.held = "", text[start:]
            return text[:start]
        keep = next(
            (n for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1) if TOOL_CALL_OPEN.startswith(text[-n:])),
            0,
        )
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self, made_calls: bool) -> str:
        """What is left to send once the reply has ended."""
        rest = self.pending + (self.held or "")
        return without_call_markup(rest) if made_calls else rest


def answer_sync(record: JobRecord, shape: Shape, hold: waiting.Hold) -> Response:
    """Wait for the job (up to SYNC_TIMEOUT_S) and answer its completion, or the error it ended with."""
    timeout_s = float(current_app.config["SYNC_TIMEOUT_S"])
    ended = waiting.wait(record, timeout_s, hold, submitted=True)
    if ended is None:
        return waiting.gone_response()
    if not ended.status.terminal:
        message = f"job {record.id} did not finish within {timeout_s:g}s; it goes on: GET /v1/jobs/{record.id}"
        raise ApiError(504, "timeout", message, headers={"X-Job-Id": record.id})
    if ended.status is not JobState.SUCCEEDED:
        raise job_failure(record.id, ended.status.value, ended.error)
    response = jsonify(shape.completion(ended.result or {}))
    response.headers["X-Job-Id"] = record.id
    return response


def answer_stream(
    record: JobRecord, shape: Shape, include_usage: bool, hold: waiting.Hold, tools_offered: bool = False
) -> Response:
    def render(events: Iterable[dict | None]) -> Iterator[str]:
        return _stream(events, record.id, shape, include_usage, ContentFilter(tools_offered))

    return waiting.stream(record.id, render, hold=hold, submitted=True)


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _stream(
    events: Iterable[dict | None], job_id: str, shape: Shape, include_usage: bool, content: ContentFilter
) -> Iterator[str]:
    def with_usage(chunk: dict) -> dict:
        return {**chunk, "usage": None} if include_usage else chunk

    if shape.chat:
        yield _data(with_usage(shape.chunk(None, first=True)))
    for event in events:
        if event is None:
            yield ": keep-alive\n\n"
        elif event["type"] == CHUNK:
            text = content.feed(event["text"])
            if text:
                yield _data(with_usage(shape.chunk(text)))
        elif event["type"] != END:  # the stream stopped first (api/waiting.py INTERRUPTED)
            yield _data(openai_body(ApiError(504, event["error"]["code"], event["error"]["message"])))
            break
        elif event["status"] == JobState.SUCCEEDED.value:
            result = event["result"] or {}
            calls = shape.tool_calls(result) if shape.chat else []
            rest = content.finish(bool(calls))
            if rest:
                yield _data(with_usage(shape.chunk(rest)))
            if calls:
                yield _data(with_usage(shape.tool_calls_chunk(calls)))
            yield _data(with_usage(shape.chunk(None, finish_reason=shape.finish_reason(result))))
            if include_usage:
                yield _data(shape.usage_chunk(result.get("usage")))
            break
        else:  # the OpenAI clients raise on an error object in the stream
            yield _data(openai_body(job_failure(job_id, event["status"], event.get("error"))))
            break
    yield DONE
