"""The Python client of genqueue's native HTTP API: jobs and batches, used by the CLI, the benchmarks
and the tests.

    from genqueue import Client
    client = Client("http://127.0.0.1:8000", api_key=None)
    job = client.wait(client.submit({"prompt": "Hi", "temperature": 0}).id)
    job = client.submit({"prompt": "Hi"}, wait_s=30)  # submit and wait in one request (ended, or not yet)
    print(job.result.response, job.result.usage.completion_tokens)
    for text in client.stream({"prompt": "Hi"}).texts():  # submit with stream: true, text as it comes
        print(text, end="")
    for job in client.jobs(status="succeeded"):  # every page of GET /v1/jobs
        print(job.id, job.finished_at)

Standard library only (http.client, one keep-alive connection per Client: use one per thread), so
the client needs nothing the server does not. Answers are typed (Job, Batch, Page), each keeping the
whole JSON in `raw`. Errors are ApiClientError with the API's code, message and fields.
"""

from __future__ import annotations

import http.client
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Generic, TypeVar
from urllib.parse import quote, urlencode, urlsplit

STREAM_IDLE_TIMEOUT_S = 120  # the server sends a keep-alive every 15 s: a longer silence is a fault
ENDED_JOB_STATES = ("succeeded", "failed", "cancelled")
ENDED_BATCH_STATES = ("completed", "completed_with_errors", "failed", "cancelled")

T = TypeVar("T")


class ApiClientError(Exception):
    """Raised when the API cannot be reached (status 0) or answers with an error."""

    def __init__(self, status: int, code: str, message: str, fields: dict | None = None):
        self.status, self.code, self.message, self.fields = status, code, message, fields or {}
        details = "; ".join(f"{name}: {_problems(problems)}" for name, problems in self.fields.items())
        prefix = f"HTTP {status} {code}: " if status else ""
        super().__init__(prefix + message + (f" ({details})" if details else ""))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage:
        data = data or {}
        return cls(*(int(data.get(name) or 0) for name in ("prompt_tokens", "completion_tokens", "total_tokens")))


@dataclass(frozen=True)
class Result:
    """A job's result: the text, any tool calls, the usage, and why it ended (stop, length, cancelled)."""

    response: str
    tool_calls: list[dict[str, Any]]
    usage: Usage
    finish_reason: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        return cls(
            response=data.get("response") or "",
            tool_calls=list(data.get("tool_calls") or []),
            usage=Usage.from_dict(data.get("usage")),
            finish_reason=data.get("finish_reason") or "",
        )


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    result: Result | None = None
    error: dict[str, Any] | None = None  # {"code", "message"}
    metadata: dict[str, str] = field(default_factory=dict)  # the labels given at submit
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the whole answer

    @property
    def ended(self) -> bool:
        return self.status in ENDED_JOB_STATES

    @property
    def text(self) -> str:
        return self.result.response if self.result else ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        result = data.get("result")
        return cls(
            id=data["id"],
            status=data["status"],
            **{name: data.get(name) for name in ("created_at", "started_at", "finished_at", "error")},
            result=Result.from_dict(result) if result is not None else None,
            metadata=dict(data.get("metadata") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def ended(self) -> int:
        return self.completed + self.failed + self.cancelled


@dataclass(frozen=True)
class Batch:
    id: str
    status: str
    request_counts: RequestCounts
    usage: Usage
    metadata: dict[str, str]
    created_at: str | None = None
    error: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the whole answer, timestamps too

    @property
    def ended(self) -> bool:
        return self.status in ENDED_BATCH_STATES

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        counts = data.get("request_counts") or {}
        return cls(
            id=data["id"],
            status=data["status"],
            request_counts=RequestCounts(
                **{name: int(counts.get(name) or 0) for name in ("total", "completed", "failed", "cancelled")}
            ),
            usage=Usage.from_dict(data.get("usage")),
            metadata=dict(data.get("metadata") or {}),
            created_at=data.get("created_at"),
            error=data.get("error"),
            raw=data,
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: its items (newest first), and whether more follow after last_id."""

    data: list[T]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def from_dict(cls, body: dict[str, Any], item: Callable[[dict[str, Any]], T]) -> Page[T]:
        return cls([item(entry) for entry in body["data"]], body.get("first_id"), body.get("last_id"), body["has_more"])


@dataclass(frozen=True)
class StreamEvent:
    """One Server-Sent Event of a job's stream: a chunk ({"response"}), the last event (usage and
    finish_reason), or an error (event "error")."""

    id: int | None
    event: str
    data: dict[str, Any]

    @property
    def text(self) -> str:
        return self.data.get("response") or ""


@dataclass
class JobStream:
    """A job's id and its stream of events (iterate over it; it ends after the last event)."""

    job_id: str
    events: Iterator[StreamEvent]
    last: StreamEvent | None = None  # the last event read: after the stream, the end (usage, finish_reason)

    def __iter__(self) -> Iterator[StreamEvent]:
        for event in self.events:
            self.last = event
            yield event

    def texts(self) -> Iterator[str]:
        """The text chunks as they come; ApiClientError if the job fails (or is refused) meanwhile."""
        for event in self:
            if event.event == "error":
                error = event.data.get("error") or {}
                raise ApiClientError(200, error.get("code") or "job_failed", error.get("message") or "the job failed")
            if event.text:
                yield event.text


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60):
        parts = urlsplit(base_url.rstrip("/"))
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port
        self._prefix = parts.path
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    # -- jobs -------------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None, wait_s: float = 0) -> Job:
        """Queue a job (the body of POST /v1/jobs, without stream); with wait_s (whole seconds up to the
        server's GENQUEUE_MAX_WAIT_S), in the same request wait for it to end: the ended job, or the job
        as it is after wait_s."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if wait_s <= 0:
            return Job.from_dict(self.json("POST", "/v1/jobs", body, headers=headers, expect=(202,)))
        path = f"/v1/jobs?wait={math.ceil(wait_s)}"  # the API takes whole seconds
        return Job.from_dict(self.json("POST", path, body, headers=headers, timeout_s=wait_s + 30))

    def get(self, job_id: str, wait_s: float = 0) -> Job:
        """The job; with wait_s, as soon as it ends or after wait_s seconds."""
        query = f"?wait={math.ceil(wait_s)}" if wait_s > 0 else ""  # the API takes whole seconds
        return Job.from_dict(self.json("GET", f"/v1/jobs/{quote(job_id, safe='')}{query}", timeout_s=wait_s + 30))

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 60) -> Job:
        """The job once it has ended (or as it is when timeout_s runs out), asking with ?wait=."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            job = self.get(job_id, left)
            if job.ended or (deadline is not None and time.monotonic() >= deadline):
                return job

    def cancel(self, job_id: str) -> Job:
        return Job.from_dict(self.json("DELETE", f"/v1/jobs/{quote(job_id, safe='')}"))

    def list_jobs(
        self, limit: int = 20, after: str | None = None, status: str | None = None, batch_id: str | None = None
    ) -> Page[Job]:
        """A page of your jobs, newest first (a batch's, with batch_id); `after`: the last_id of the page before."""
        query = {"limit": limit, "after": after, "status": status, "batch_id": batch_id}
        path = "/v1/jobs?" + urlencode({name: value for name, value in query.items() if value is not None})
        return Page.from_dict(self.json("GET", path), Job.from_dict)

    def jobs(self, status: str | None = None, batch_id: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every one of your jobs (or a batch's), newest first, a page at a time."""
        after = None
        while True:
            page = self.list_jobs(page_size, after, status, batch_id)
            yield from page.data
            if not page.has_more:
                return
            after = page.last_id

    def stream(self, body: dict[str, Any]) -> JobStream:
        """Submit with stream: true: the job's id, and its events as they come."""
        response = self._send("POST", "/v1/jobs", {**body, "stream": True}, timeout_s=STREAM_IDLE_TIMEOUT_S)
        return JobStream(response.getheader("X-Job-Id") or "", self._events(response))

    def follow(self, job_id: str, last_event_id: int = 0) -> JobStream:
        """An existing job's events, from after last_event_id (0: from the start)."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        path = f"/v1/jobs/{quote(job_id, safe='')}/stream"
        response = self._send("GET", path, headers=headers, timeout_s=STREAM_IDLE_TIMEOUT_S)
        return JobStream(job_id, self._events(response))

    # -- batches ------------------------------------------------------------------------------------

    def create_batch(
        self, jsonl: IO[bytes], size: int, metadata: dict[str, str] | None = None, webhook: str | None = None
    ) -> Batch:
        """Upload a JSONL batch from a file object of `size` bytes (streamed, never read whole)."""
        params = {"metadata": json.dumps(metadata) if metadata else None, "webhook": webhook}
        query = urlencode({name: value for name, value in params.items() if value is not None})
        headers = {"Content-Type": "application/jsonl", "Content-Length": str(size)}
        path = "/v1/batches" + (f"?{query}" if query else "")
        return Batch.from_dict(self.json("POST", path, jsonl, headers=headers, timeout_s=600, expect=(201,)))

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_dict(self.json("GET", f"/v1/batches/{quote(batch_id, safe='')}"))

    def list_batches(self, limit: int = 20, after: str | None = None) -> Page[Batch]:
        query = urlencode({"limit": limit, **({"after": after} if after else {})})
        return Page.from_dict(self.json("GET", f"/v1/batches?{query}"), Batch.from_dict)

    def cancel_batch(self, batch_id: str) -> Batch:
        return Batch.from_dict(self.json("POST", f"/v1/batches/{quote(batch_id, safe='')}/cancel"))

    def batch_results(self, batch_id: str) -> http.client.HTTPResponse:
        """The results response (JSONL; headers X-Batch-Status, X-Batch-Ended): read it to the end."""
        return self._send("GET", f"/v1/batches/{quote(batch_id, safe='')}/results", timeout_s=600)

    def wait_batch(
        self,
        batch_id: str,
        poll_s: float = 1.0,
        progress: Callable[[Batch], None] | None = None,
        timeout_s: float | None = None,
    ) -> Batch:
        """The batch once it has ended (or as it is when timeout_s runs out), calling progress(batch)
        at each poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            batch = self.get_batch(batch_id)
            if progress is not None:
                progress(batch)
            if batch.ended or (deadline is not None and time.monotonic() >= deadline):
                return batch
            time.sleep(poll_s)

    # -- HTTP ---------------------------------------------------------------------------------------

    def json(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        expect: tuple[int, ...] = (200, 202),
    ) -> dict[str, Any]:
        """A JSON answer; an answer of another status than `expect` (or an error) raises."""
        status, data = self.request(method, path, body, headers, timeout_s)
        if status not in expect:
            raise ApiClientError(status, "unexpected_status", f"{method} {path} answered {status}: {data}")
        return data

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON) of a request that succeeded (2xx); ApiClientError otherwise."""
        response = self._send(method, path, body, headers, timeout_s)
        raw = response.read()
        return response.status, json.loads(raw) if raw else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> http.client.HTTPResponse:
        headers = {"Accept": "application/json, text/event-stream", **(headers or {})}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            conn = self._connection(timeout_s)
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                response = conn.getresponse()
                break
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest) as exc:
                self.close()  # a keep-alive connection the server closed: reconnect once (bodies are not streams)
                if attempt or not (body is None or isinstance(body, bytes)):
                    raise self._unreachable(exc) from exc
            except OSError as exc:
                self.close()
                raise self._unreachable(exc) from exc
        if response.status >= 400:
            raise _error(response)
        return response

    def _unreachable(self, exc: BaseException) -> ApiClientError:
        return ApiClientError(0, "unreachable", f"cannot reach the genqueue API at {self.base_url}: {exc}")

    def _connection(self, timeout_s: float | None) -> http.client.HTTPConnection:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = kind(self._host, self._port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _events(self, response: http.client.HTTPResponse) -> Iterator[StreamEvent]:
        """Server-Sent Events until [DONE] (the connection stays usable after it)."""
        event_id, name, data = None, "message", []
        try:
            while True:
                raw = response.readline()
                if not raw:
                    return
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("id:"):
                    event_id = int(line.partition(":")[2].strip())
                elif line.startswith("event:"):
                    name = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    data.append(line.partition(":")[2].removeprefix(" "))
                elif not line and data:
                    payload = "\n".join(data)
                    if payload == "[DONE]":
                        return
                    yield StreamEvent(event_id, name, json.loads(payload))
                    event_id, name, data = None, "message", []
        finally:
            response.read()  # drain, so the keep-alive connection can serve the next request
            if not response.isclosed():
                self.close()


def _error(response: http.client.HTTPResponse) -> ApiClientError:
    """The API's JSON error, whatever its envelope (native, OpenAI's, Cloudflare's)."""
    raw = response.read()
    try:
        body = json.loads(raw)
        error = body["error"] if "error" in body else body["errors"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return ApiClientError(response.status, "http_error", f"{response.reason}: {raw[:200]!r}")
    return ApiClientError(response.status, error.get("code") or "error", error.get("message", ""), error.get("fields"))


def _problems(problems: Any) -> str:
    if isinstance(problems, list) and all(isinstance(p, str) for p in problems):
        return " ".join(problems)
    return json.dumps(problems)
