"""Following jobs: one Redis subscription per process fans every job's events out to its followers.

A follower reads one job's events in this process: an SSE stream, a `?wait`, a synchronous OpenAI or
Workers AI answer. The process PSUBSCRIBEs once to every job's channel, and a dispatcher thread (a
greenlet under gevent) hands each event to its job's followers through a bounded queue each, so the
process holds one subscribing connection besides its pool, whatever the number of followers.

Nothing is lost and nothing is doubled: a follower registers before it replays the job's log, so
each event is in the replay, in its queue, or both (kept once, by seq). The dispatcher never waits
for a follower: one whose queue is full is marked lagging and re-reads what it missed from the log.
So does every follower when the subscription is (re)established, since what was published while it
was down reached the log but no subscriber.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis

from tasks.store import keys
from tasks.store.jobs import END, JobStore, Replay

log = logging.getLogger(__name__)

Event = dict[str, Any]

QUEUE_SIZE = 256  # live events a follower may leave unread before it is marked lagging
LISTEN_TIMEOUT_S = 1.0
RECONNECT_DELAY_S = 0.5
LAGGED = object()  # from Follower.take: what was missed must be re-read from the log
_WAKE = object()  # put in a queue only to wake its reader


class Follower:
    """One reader's end of the fan-out: a bounded queue of its job's live events."""

    def __init__(self, job_id: str, ends_only: bool):
        self.job_id = job_id
        self.ends_only = ends_only  # a wait needs the end event alone
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.lagged = False

    def offer(self, event: Event) -> None:
        """The dispatcher's hand-over: never blocks."""
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.lagged = True  # it reads its full queue, then the rest from the log

    def lag(self) -> None:
        self.lagged = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(_WAKE)

    def take(self, timeout_s: float) -> Any:
        """The next live event, LAGGED, or None when timeout_s passed with neither."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.lagged:
                self.lagged = False  # cleared before the re-read, so a later drop is seen again
                return LAGGED
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if item is not _WAKE:
                return item


class Fanout:
    """This process's one subscription to every job's channel on a Redis server, and its dispatcher."""

    _instances: dict[tuple, Fanout] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def of(cls, client: redis.Redis) -> Fanout:
        """The fan-out of client's server in this process (pub/sub channels span its databases)."""
        pool = client.connection_pool
        server = tuple(pool.connection_kwargs.get(name) for name in ("host", "port", "path", "username", "password"))
        key = (os.getpid(), pool.connection_class, *server)
        with cls._instances_lock:
            if key not in cls._instances:
                cls._instances[key] = cls(client)
            return cls._instances[key]

    def __init__(self, client: redis.Redis):
        pool = client.connection_pool
        # A connection of its own: the subscription holds it for good, outside the pool's bound.
        self._redis = redis.Redis(
            connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs)
        )
        self._followers: dict[str, set[Follower]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def follow(self, job_id: str, ends_only: bool = False) -> Iterator[Follower]:
        follower = Follower(job_id, ends_only)
        with self._lock:
            self._followers.setdefault(job_id, set()).add(follower)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="genqueue-fanout", daemon=True)
                self._thread.start()
        try:
            yield follower
        finally:
            with self._lock:
                followers = self._followers.get(job_id, set())
                followers.discard(follower)
                if not followers:
                    self._followers.pop(job_id, None)

    def count(self) -> int:
        """Followers registered now."""
        with self._lock:
            return sum(len(followers) for followers in self._followers.values())

    def _run(self) -> None:
        subscribed = False
        while True:
            pubsub = self._redis.pubsub()
            try:
                pubsub.psubscribe(keys.JOB_CHANNELS)
                while True:
                    message = pubsub.get_message(timeout=LISTEN_TIMEOUT_S)
                    if message is None:
                        continue
                    if message["type"] == "pmessage":
                        self._dispatch(_text(message["channel"]), message["data"])
                    elif message["type"] == "psubscribe":  # (re)subscribed: what came meanwhile is in the logs
                        subscribed = True
                        self._lag_all()
            except redis.RedisError as exc:
                if subscribed:  # once per outage
                    log.warning("job events subscription lost (%s); subscribing again", exc)
                subscribed = False
            except Exception:  # a bug must not end every follower's live events: log it, go on
                log.exception("job events dispatcher failed; subscribing again")
            finally:
                pubsub.close()
            time.sleep(RECONNECT_DELAY_S)

    def _dispatch(self, channel: str, data: str | bytes) -> None:
        with self._lock:
            followers = tuple(self._followers.get(keys.job_of_channel(channel), ()))
        if not followers:
            return
        event = json.loads(data)
        for follower in followers:
            if event["type"] == END or not follower.ends_only:
                follower.offer(event)

    def _lag_all(self) -> None:
        with self._lock:
            followers = [f for group in self._followers.values() for f in group]
        for follower in followers:
            follower.lag()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Followers:
    """A job's events as they come (streams), or its end (waits), through the process's fan-out.

    Each follower asks Redis after each quiet interval whether its job is still there (and what it
    missed), each first interval shortened at random so followers that started together do not ask all
    at once. A read that fails (Redis away, or its pool busy past its wait) is not the follower's end:
    it goes on with live events and keep-alive points, and reads again at its next quiet interval.
    """

    def __init__(self, store: JobStore):
        self.store = store
        self.fanout = Fanout.of(store.redis)

    def events(
        self, job_id: str, after_seq: int = 0, poll_s: float = 1.0, until: float | None = None
    ) -> Iterator[Event | None]:
        """Every event with seq > after_seq, replayed from the log then live, up to the end event; None
        after each poll_s without one (a keep-alive point). A job that has ended gives what is left and
        its end event (sent again when after_seq is at or past it). Also returns at `until`
        (time.monotonic()) and when the job is gone (expired)."""
        with self.fanout.follow(job_id) as follower:
            last = after_seq
            replay = self._replay(job_id, last)
            quiet_since, ticked = _first_quiet(poll_s), False
            while True:
                fresh: list[Event] = []
                if replay is not None:
                    if replay.status is None:
                        return
                    fresh = _fresh(replay, last)
                    for event in fresh:
                        last = event["seq"]
                        yield event
                        if event["type"] == END:
                            return
                    if replay.status.terminal:  # its log is complete (an end event lost only with the log)
                        return
                    replay = None
                if fresh or ticked:
                    if not fresh:
                        yield None
                    quiet_since, ticked = time.monotonic(), False
                if until is not None and time.monotonic() >= until:
                    return
                item = follower.take(_left(quiet_since, poll_s, until))
                if item is LAGGED or (item is not None and item["seq"] > last + 1):  # the log has what it missed
                    replay = self._replay(job_id, last)
                elif item is None:
                    if time.monotonic() - quiet_since >= poll_s:  # quiet: is it still there, was anything missed?
                        replay, ticked = self._replay(job_id, last), True
                elif item["seq"] == last + 1:
                    last, quiet_since = item["seq"], time.monotonic()
                    yield item
                    if item["type"] == END:
                        return

    def end(self, job_id: str, poll_s: float = 1.0, until: float | None = None) -> Iterator[None]:
        """None after each poll_s the job has not ended (a point to give up at); returns once it has
        ended or is gone, or at `until` (time.monotonic())."""
        with self.fanout.follow(job_id, ends_only=True) as follower:
            check = True
            quiet_since = _first_quiet(poll_s)
            while True:
                if check:
                    if self._ended(job_id):
                        return
                    check = False
                if until is not None and time.monotonic() >= until:
                    return
                item = follower.take(_left(quiet_since, poll_s, until))
                if item is LAGGED:
                    check = True
                elif item is not None:  # its end event
                    return
                elif time.monotonic() - quiet_since >= poll_s:
                    yield None
                    quiet_since, check = time.monotonic(), True

    def _replay(self, job_id: str, after_seq: int) -> Replay | None:
        """JobStore.replay, or None when Redis fails (read again at the next quiet interval)."""
        try:
            return self.store.replay(job_id, after_seq)
        except redis.RedisError as exc:
            log.debug("job %s: reading its log failed (%s); reading again later", job_id, exc)
            return None

    def _ended(self, job_id: str) -> bool:
        """Whether the job has ended or is gone; False when Redis fails (asked again later)."""
        try:
            status = self.store.status(job_id)
        except redis.RedisError as exc:
            log.debug("job %s: reading its state failed (%s); reading again later", job_id, exc)
            return False
        return status is None or status.terminal


def _fresh(replay: Replay, last: int) -> list[Event]:
    """What a read of the log adds after seq `last`: the events after it, or, for an ended job with
    nothing after it (a resume at or past its end), its end event again."""
    fresh = [event for event in replay.events if event["seq"] > last]
    if not fresh and replay.status is not None and replay.status.terminal and replay.last is not None:
        return [replay.last]
    return fresh


def _first_quiet(poll_s: float) -> float:
    """When a follower's first quiet interval counts from: up to half an interval early, at random."""
    return time.monotonic() - random.uniform(0, poll_s / 2)


def _left(quiet_since: float, poll_s: float, until: float | None) -> float:
    """Seconds to wait for a live event: up to the next keep-alive point or `until`."""
    now = time.monotonic()
    left = quiet_since + poll_s - now
    return max(0.0, left if until is None else min(left, until - now))
