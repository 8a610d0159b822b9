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

from tasks.store.jobs import Chunk, JobStore

log = logging.getLogger(__name__)

RETRY_FOR_S = 30  # how long the writer keeps trying to reach Redis before it gives up on the chunks
MAX_PER_ROUND_TRIP = 1024


class WriteFailedError(RuntimeError):
    """Raised when the chunks of a job could not be written to Redis."""


class ChunkWriter:
    def __init__(self, store: JobStore, retry_for_s: float = RETRY_FOR_S):
        self._store = store
        self._retry_for_s = retry_for_s
        self._pending: list[Chunk] = []  # in the order handed over
        self._holds: dict[str, tuple[str, int]] = {}  # per job: the worker and attempt its chunks are written as
        self._cond = threading.Condition()
        self._handed: dict[str, int] = {}  # per job: the last seq handed over
        self._written: dict[str, int] = {}  # per job: the last seq Redis answered for
        self._ended: set[str] = set()  # jobs whose chunks the store refused: ended, expired or taken over
        self._taken: set[str] = set()  # of those, the jobs another attempt holds now
        self._failed: dict[str, BaseException] = {}  # jobs the writer gave up on, and why
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> ChunkWriter:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="genqueue-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = RETRY_FOR_S + 5) -> None:
        """Write what was handed over, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def hold(self, job_id: str, worker_id: str, attempt: int) -> None:
        """Write the job's chunks as this attempt of this worker (fenced: refused once it is taken over)."""
        with self._cond:
            self._holds[job_id] = (worker_id, attempt)

    def append(self, job_id: str, seq: int, text: str, ids: tuple[int, ...] = ()) -> None:
        """Hand over the job's seq-th chunk and the token ids it adds; returns at once."""
        with self._cond:
            holder, attempt = self._holds.get(job_id, ("", 0))
            self._pending.append(Chunk(job_id, seq, text, ids, holder, attempt))
            self._handed[job_id] = seq
            self._cond.notify_all()

    def stopped(self, job_id: str) -> bool:
        """Whether generating more for the job is pointless: it has ended elsewhere, or Redis is lost."""
        return job_id in self._ended or job_id in self._failed

    def taken(self, job_id: str) -> bool:
        """Whether the store refused the job's chunks because another attempt holds it now."""
        return job_id in self._taken

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
            for known in (self._handed, self._written, self._failed, self._holds):
                known.pop(job_id, None)
            self._ended.discard(job_id)
            self._taken.discard(job_id)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:  # stopping, with everything written
                    return
                # A job the writer gave up on gets nothing more: a later chunk would leave a hole.
                batch = [c for c in self._pending[:MAX_PER_ROUND_TRIP] if c[0] not in self._failed]
                del self._pending[:MAX_PER_ROUND_TRIP]
            try:
                answers = self._send(batch)
            except Exception as exc:  # noqa: BLE001 - whatever it was, those jobs' chunks are lost
                log.error("gave up writing %d chunks: %s", len(batch), exc)
                with self._cond:
                    for job_id, *_rest in batch:
                        self._failed[job_id] = exc
                    self._cond.notify_all()
                continue
            with self._cond:
                for (job_id, seq, *_rest), answer in zip(batch, answers, strict=True):
                    if answer < 0:
                        self._ended.add(job_id)
                    if answer == -2:
                        self._taken.add(job_id)
                    self._written[job_id] = max(self._written.get(job_id, 0), seq)
                self._cond.notify_all()

    def _send(self, batch: list[Chunk]) -> list[int]:
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
