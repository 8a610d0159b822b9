"""Writes jobs' text chunks to Redis from one thread, so that generation never waits for Redis.

The engine's callback hands each chunk over (an append under a lock) and goes on with the next
token; the writer sends whatever was handed over since its last round trip as one pipeline, in
order, so each job's chunks are logged in seq order. A chunk keeps the seq its job gave it and the
store logs a seq once, so sending a pipeline again after a lost connection logs nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from tasks.store import JobStore

log = logging.getLogger(__name__)

RETRY_FOR_S = 30  # how long the writer keeps trying to reach Redis before it gives up on the chunks
MAX_PER_ROUND_TRIP = 1024


class WriteFailedError(RuntimeError):
    """Raised when the chunks of a job could not be written to Redis."""


class ChunkWriter:
    def __init__(self, store: JobStore, retry_for_s: float = RETRY_FOR_S):
        self._store = store
        self._retry_for_s = retry_for_s
        self._pending: list[tuple[str, int, str]] = []  # (job id, seq, text), in the order handed over
        self._cond = threading.Condition()
        self._handed: dict[str, int] = {}  # per job: the last seq handed over
        self._written: dict[str, int] = {}  # per job: the last seq Redis answered for
        self._ended: set[str] = set()  # jobs whose chunks the store refused: ended or expired
        self._failed: dict[str, BaseException] = {}  # jobs the writer gave up on, and why
        threading.Thread(target=self._loop, name="genqueue-writer", daemon=True).start()

    def append(self, job_id: str, seq: int, text: str) -> None:
        """Hand over the job's seq-th chunk; returns at once."""
        with self._cond:
            self._pending.append((job_id, seq, text))
            self._handed[job_id] = seq
            self._cond.notify_all()

    def stopped(self, job_id: str) -> bool:
        """Whether generating more for the job is pointless: it has ended elsewhere, or Redis is lost."""
        return job_id in self._ended or job_id in self._failed

    def flush(self, job_id: str) -> None:
        """Wait until every chunk handed over for the job is written (or refused: the job ended).

        Raises WriteFailedError if the writer gave up on them."""
        with self._cond:
            target = self._handed.get(job_id, 0)
            done = self._cond.wait_for(
                lambda: self._written.get(job_id, 0) >= target or job_id in self._failed,
                timeout=self._retry_for_s + 30,
            )
            if job_id in self._failed:
                raise WriteFailedError(f"chunks of job {job_id} were not written: {self._failed[job_id]}")
            if not done:
                raise WriteFailedError(f"chunks of job {job_id} still unwritten after {self._retry_for_s + 30}s")

    def forget(self, job_id: str) -> None:
        """Drop what is known of a job that has ended."""
        with self._cond:
            for known in (self._handed, self._written, self._failed):
                known.pop(job_id, None)
            self._ended.discard(job_id)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                # A job the writer gave up on gets nothing more: a later chunk would leave a hole.
                batch = [c for c in self._pending[:MAX_PER_ROUND_TRIP] if c[0] not in self._failed]
                del self._pending[:MAX_PER_ROUND_TRIP]
            try:
                answers = self._send(batch)
            except Exception as exc:  # noqa: BLE001 - whatever it was, those jobs' chunks are lost
                log.error("gave up writing %d chunks: %s", len(batch), exc)
                with self._cond:
                    for job_id, _seq, _text in batch:
                        self._failed[job_id] = exc
                    self._cond.notify_all()
                continue
            with self._cond:
                for (job_id, seq, _text), answer in zip(batch, answers, strict=True):
                    if answer == -1:
                        self._ended.add(job_id)
                    self._written[job_id] = max(self._written.get(job_id, 0), seq)
                self._cond.notify_all()

    def _send(self, batch: list[tuple[str, int, str]]) -> list[int]:
        deadline = time.monotonic() + self._retry_for_s
        delay = 0.05
        while True:
            try:
                return self._store.append_chunks(batch)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("writing chunks failed (%s); trying again", exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
