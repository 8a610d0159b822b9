"""Queueing a batch's items, by the API that wrote them or, if it died, by a sweeper in the workers.

A job is stored and queued in one atomic step (tasks/store/jobs.py submit). A batch's items are
written while the API checks them, so they are queued afterwards, a chunk per atomic step that pushes
the chunk's broker messages and counts them (tasks/store/batches.py push). An API process that dies
part way leaves the batch in keys.SUBMITTING; once it has stalled there (STALE_SUBMISSION_S after its
last progress), the sweeper of any worker takes it: a batch whose items were all written is queued
from where its API stopped, one whose items were still being read ends failed with
`submission_interrupted` (its client never got an answer, and the rest of its requests are lost).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery

from tasks.runtime.app import batch_queue, create_celery, task_message
from tasks.store import keys
from tasks.store.batches import WRITE_CHUNK, BatchStore
from tasks.store.jobs import JobStore
from tasks.store.states import BatchState

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 2.0


def queue_items(app: Celery, store: BatchStore, batch_id: str, queue: str, total: int) -> BatchState:
    """Queue an admitted batch's items that are not queued yet, on `queue`'s batch queue, then start it.
    Returns its state after the start (cancelling or cancelled if it was cancelled meanwhile)."""
    broker = batch_queue(queue)
    queued = store.queued(batch_id)
    while 0 <= queued < total:
        ids = (keys.batch_item(batch_id, index) for index in range(queued, min(total, queued + WRITE_CHUNK)))
        queued = store.push(batch_id, broker, queued, [task_message(app, job_id, broker) for job_id in ids])
    return store.start(batch_id, total)


def finish_stalled(app: Celery, store: BatchStore, batch_id: str) -> None:
    """Finish the submission of a batch whose API stopped part way (see the module's docstring)."""
    record = store.get(batch_id)
    if record is None:  # expired or discarded: nothing to finish
        return
    written = int(store.redis.hget(keys.batch(batch_id), "written") or 0)
    if not record.total:  # (a batch cancelled meanwhile has had its written items cancelled)
        error = {"code": "submission_interrupted", "message": "the API stopped while reading this batch's requests"}
        store.fail(batch_id, written, error)
        log.warning("batch %s: its submission stopped while its requests were read; failed", batch_id)
        return
    status = queue_items(app, store, batch_id, record.queue, record.total or written)
    log.warning("batch %s: its submission stopped part way; queued the rest (%s)", batch_id, status.value)


class SubmissionSweeper:
    """A worker's thread that finishes stalled batch submissions every SWEEP_INTERVAL_S."""

    def __init__(self, settings: Mapping[str, Any], jobs: JobStore, interval_s: float = SWEEP_INTERVAL_S):
        self.app = create_celery(settings)  # builds messages only: it never connects
        self.store = batch_store(jobs, settings)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SubmissionSweeper:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="genqueue-submission-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)

    def sweep(self) -> int:
        """Finish the stalled submissions found now; how many."""
        stalled = self.store.stalled()
        for batch_id in stalled:
            finish_stalled(self.app, self.store, batch_id)
        return len(stalled)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except redis.RedisError as exc:  # a batch taken now is due again after STALE_SUBMISSION_S
                log.warning("submission sweep failed: %s", exc)


def batch_store(jobs: JobStore, settings: Mapping[str, Any]) -> BatchStore:
    """The batch store with the stall thresholds of the settings: STALE_SUBMISSION_S after the last
    chunk queued, plus the body timeout while the API may still be waiting for the client's lines."""
    stale = float(settings["STALE_SUBMISSION_S"])
    return BatchStore(jobs, settings["BATCH_TTL_S"], stale_s=stale, reading_s=stale + float(settings["BODY_TIMEOUT_S"]))
