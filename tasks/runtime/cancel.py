"""Hears job cancellations in a worker process, so a running job stops within a few tokens.

The API publishes a cancelled job's id on one channel; each worker keeps the ids of its own running
jobs that were cancelled. A poller also rereads the cancel flags of all running jobs every
CANCEL_POLL_S in one round trip, which covers a cancellation published while the listener was
reconnecting. Neither runs on the engine's thread: asking whether a job is cancelled is a set lookup.
"""

from __future__ import annotations

import logging
import threading

import redis

from tasks.store import keys

log = logging.getLogger(__name__)

CANCEL_POLL_S = 1.0
RECONNECT_DELAY_S = 1.0
LISTEN_TIMEOUT_S = 1.0  # how long the listener blocks before it looks whether it should stop


class CancelWatcher:
    def __init__(self, client: redis.Redis, poll_s: float = CANCEL_POLL_S):
        self._client = client
        self._poll_s = poll_s
        self._running: set[str] = set()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> CancelWatcher:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._listen, name="genqueue-cancel", daemon=True),
            threading.Thread(target=self._poll, name="genqueue-cancel-poll", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(LISTEN_TIMEOUT_S + RECONNECT_DELAY_S + 1)

    def watch(self, job_id: str, cancelled: bool = False) -> None:
        """Start watching a job; cancelled: its record already asks for it to stop."""
        with self._lock:
            self._running.add(job_id)
            if cancelled:
                self._cancelled.add(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._running.discard(job_id)
            self._cancelled.discard(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled

    def _mark(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._running:
                self._cancelled.add(job_id)

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=LISTEN_TIMEOUT_S)
                    if message is not None:
                        job_id = message["data"]
                        self._mark(job_id.decode() if isinstance(job_id, bytes) else job_id)
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                self._stop.wait(RECONNECT_DELAY_S)
            finally:
                pubsub.close()

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_s):
            with self._lock:
                running = sorted(self._running - self._cancelled)
            if not running:
                continue
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.hget(keys.job(job_id), "cancel_requested")
                    flags = pipe.execute()
            except redis.RedisError as exc:
                log.warning("cancel poll failed: %s", exc)
                continue
            for job_id, flag in zip(running, flags, strict=True):
                if flag in ("1", b"1"):
                    self._mark(job_id)
