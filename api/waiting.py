"""Clients that wait: SSE streams and waits (`?wait`, the synchronous OpenAI and Workers AI answers).

Under the cooperative server (genqueue/server.py) a waiting client costs a socket and a greenlet, not
a thread, and its follower shares the process's one subscription (tasks/store/followers.py). What
bounds a waiting client is here:
- how many one client may hold at once on this process: MAX_STREAMS_PER_CLIENT streams and
  MAX_WAITS_PER_CLIENT waits (a client is its API key, or its address when keys are off); beyond
  them, 429 with Retry-After;
- how long: a stream MAX_STREAM_S (then an error event and [DONE]; the job goes on), a wait its own;
- whether its client is still there, looked at every SSE_KEEPALIVE_S: a gone client's follower is let
  go, and with CANCEL_ON_DISCONNECT the job its request submitted is cancelled.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from flask import Flask, Response, current_app, request
from gevent.monkey import get_original

from api.errors import ApiError
from api.generation import Submission
from api.http import SSE_HEADERS, owner, submit
from api.service import job_service
from tasks.store.jobs import END, JobRecord

log = logging.getLogger("api")

STREAMS, WAITS = "streams", "waits"
LIMIT_SETTINGS = {STREAMS: "MAX_STREAMS_PER_CLIENT", WAITS: "MAX_WAITS_PER_CLIENT"}
RETRY_AFTER_S = 5
CLIENT_GONE = 499  # the status logged for a request whose client left before its answer (nginx's)
INTERRUPTED = "interrupted"  # a stream's last event when it ends before its job: {"type", "error"}

# The real poll(), even under gevent's monkey patching: a zero timeout never blocks, and unlike
# select() it takes descriptors past 1024.
_poll = get_original("select", "poll")
_HANG_UP = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)

Event = dict[str, Any]
Render = Callable[[Iterable[Event | None]], Iterator[str]]


class HeldClients:
    """The streams and waits each client holds on this process."""

    def __init__(self) -> None:
        self._held: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def take(self, kind: str, client: str, limit: int) -> bool:
        with self._lock:
            if self._held[kind, client] >= limit:
                return False
            self._held[kind, client] += 1
            return True

    def give_back(self, kind: str, client: str) -> None:
        with self._lock:
            self._held[kind, client] -= 1
            if self._held[kind, client] <= 0:
                del self._held[kind, client]

    def total(self, kind: str) -> int:
        with self._lock:
            return sum(count for (held_kind, _client), count in self._held.items() if held_kind == kind)


def init_app(app: Flask) -> None:
    app.extensions["genqueue.held"] = HeldClients()


def client() -> str:
    """Who a limit counts against: the API key's owner, or the address when keys are off."""
    return owner() or f"address {request.remote_addr}"


class Hold:
    """A stream's or a wait's place in its client's limit: taken here (or a 429), given back once."""

    def __init__(self, kind: str):
        self.kind, self.client = kind, client()
        self._clients: HeldClients = current_app.extensions["genqueue.held"]
        limit = int(current_app.config[LIMIT_SETTINGS[kind]])
        if not self._clients.take(kind, self.client, limit):
            raise ApiError(
                429,
                f"too_many_{kind}",
                f"this client already holds {limit} {kind}, its limit (GENQUEUE_{LIMIT_SETTINGS[kind]}); "
                "retry when one has ended",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._clients.give_back(self.kind, self.client)


def submit_held(submission: Submission, kind: str) -> tuple[JobRecord, Hold]:
    """Take the client's place first (a 429 queues nothing), then submit the job."""
    hold = Hold(kind)
    try:
        return submit(submission), hold
    except BaseException:
        hold.release()
        raise


class Watch:
    """A waiting request's client, looked at between events: is it still there?"""

    def __init__(self, limit_s: float | None = None):
        environ = request.environ
        self.socket: socket.socket | None = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        self.limit_s = limit_s
        self.until = None if limit_s is None else time.monotonic() + limit_s
        self.left = False  # the client was seen gone
        self.complete = False  # the stream sent its job's end, or was cut at its time limit

    def gone(self) -> bool:
        if not self.left and self.socket is not None:
            self.left = client_gone(self.socket)
        return self.left

    def events(self, events: Iterable[Event | None]) -> Iterator[Event | None]:
        """The followed events up to the end, or to a last INTERRUPTED event when the stream stops
        first (its time limit; the job expired); nothing more once the client is gone."""
        for event in events:
            if event is None and self.gone():
                return
            yield event
            if event is not None and event["type"] == END:
                self.complete = True
                return
        self.complete = True
        if self.until is not None and time.monotonic() >= self.until:
            yield interrupted(
                "stream_time_limit",
                f"the stream reached its time limit ({self.limit_s:g} s, GENQUEUE_MAX_STREAM_S); the job goes "
                "on: resume with Last-Event-ID, or read /v1/jobs/<id>",
            )
        else:
            yield interrupted("job_not_found", "the job expired")


def interrupted(code: str, message: str) -> Event:
    return {"type": INTERRUPTED, "error": {"code": code, "message": message}}


def client_gone(sock: socket.socket) -> bool:
    """Whether the peer has closed (or reset) the connection, without reading what it sent."""
    try:
        poller = _poll()
        poller.register(sock.fileno(), select.POLLIN | getattr(select, "POLLRDHUP", 0))
        ready = poller.poll(0)
        if not ready:
            return False
        if ready[0][1] & _HANG_UP:
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""  # readable: its end, or bytes it sent (still there)
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # closed under us
        return True


def stream(job_id: str, render: Render, after_seq: int = 0, hold: Hold | None = None, submitted: bool = False):
    """The job's SSE stream, rendered by `render`, within the client's limit (hold, or one taken now)
    and MAX_STREAM_S. Let go when its client leaves; a job this request submitted is then cancelled
    (CANCEL_ON_DISCONNECT). Ownership is checked before the response starts."""
    config = current_app.config
    hold = hold or Hold(STREAMS)
    service = job_service()
    try:
        watch = Watch(float(config["MAX_STREAM_S"]))
        events = service.follow(job_id, owner(), after_seq, float(config["SSE_KEEPALIVE_S"]), watch.until)
    except BaseException:
        hold.release()
        raise
    cancel = submitted and bool(config["CANCEL_ON_DISCONNECT"])

    def close() -> None:  # the server closes every response, whether it was sent whole or not
        hold.release()
        events.close()
        if cancel and not watch.complete:
            try:
                service.cancel_abandoned(job_id)
            except redis.RedisError as exc:
                log.warning("job %s: its client went away, and cancelling it failed: %s", job_id, exc)

    response = Response(
        render(watch.events(events)), mimetype="text/event-stream", headers={**SSE_HEADERS, "X-Job-Id": job_id}
    )
    response.call_on_close(close)
    return response


def wait(record: JobRecord, wait_s: float, hold: Hold, submitted: bool = False) -> JobRecord | None:
    """The job once it has ended, or after wait_s (JobService.wait), giving `hold` back after. None
    when its client went away meanwhile (a job this request submitted is then cancelled, with
    CANCEL_ON_DISCONNECT)."""
    config = current_app.config
    service = job_service()
    watch = Watch()
    try:
        ended = service.wait(record, wait_s, float(config["SSE_KEEPALIVE_S"]), watch.gone)
    finally:
        hold.release()
    if not watch.left:
        return ended
    if submitted and config["CANCEL_ON_DISCONNECT"] and not ended.status.terminal:
        service.cancel_abandoned(record.id)
    return None


def gone_response() -> Response:
    """What a request whose client left answers (nobody reads it; the access log shows 499)."""
    return Response(status=CLIENT_GONE)
