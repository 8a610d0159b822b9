"""The recovery sweep: a live worker takes over the running jobs of workers that stopped beating.

Every few seconds it reads the running jobs (tasks/store/keys.py RUNNING) and, for each one whose
holder's heartbeat has expired (or that was handed back by a worker that stopped), takes it over in
one Lua step (JobStore.take, with the holder it saw: of several sweeping workers one wins) and runs
it here at once, going on from its logged tokens. The takeover adds an attempt, the fencing token of
every write: the old holder, if it was only slow, finds its writes refused and lets the job go.

It also puts back on their queues the broker messages a dead worker had reserved but not claimed
(tasks/store/deliveries.py): their jobs are still queued, and run within seconds, not after the
visibility timeout. A message never acknowledged (its worker died, or lost its channel in a Redis
outage) whose job has ended is dropped. A job whose message was lost on its way from its queue to a
worker (tasks/store/lost.py) is pushed a new one.

It also hands back, once Redis answers again, the jobs this worker could not end because Redis was
unreachable for WRITE_RETRY_S, so that a takeover ends them from what was logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from tasks.runtime.app import batch_queue, job_of_message
from tasks.store import keys
from tasks.store.deliveries import Deliveries
from tasks.store.jobs import JobStore
from tasks.store.lost import LostMessages
from tasks.store.registry import WorkerRegistry

log = logging.getLogger(__name__)

# take_over(job id, holder seen) -> True taken, False lost the race (or it ended), None: no room here now.
TakeOver = Callable[[str, str], "bool | None"]
# message_for(job id, queue) -> the broker message that queues the job there (tasks/runtime/app.py).
MessageFor = Callable[[str, str], str]


class Recovery:
    def __init__(
        self,
        store: JobStore,
        registry: WorkerRegistry,
        worker_id: str,
        take_over: TakeOver,
        interval_s: float,
        unclaimed_after_s: float,
        message_for: MessageFor,
    ):
        self.store, self.registry, self.worker_id = store, registry, worker_id
        self.deliveries = Deliveries(store.redis)
        self.unclaimed_after_s = unclaimed_after_s  # a delivered job still queued this long: its worker died
        self.lost = LostMessages(store.redis)
        self.message_for = message_for
        self._missing: set[str] = set()  # jobs whose message the last search for lost ones did not find
        self._next_lost_search = 0.0  # time.monotonic() of the next one: every unclaimed_after_s
        self.take_over = take_over
        self.interval_s = interval_s
        self._releases: dict[str, int] = {}  # job id -> attempt, to hand back once Redis answers
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._taking = True
        self._thread: threading.Thread | None = None

    def start(self) -> Recovery:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="genqueue-recovery", daemon=True)
        self._thread.start()
        return self

    def stop_taking(self) -> None:
        """A stopping worker takes no job over (it still hands back what it must)."""
        self._taking = False

    def stop(self) -> None:
        self._taking = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)
        self._release_pending()

    def release_later(self, job_id: str, attempt: int) -> None:
        """Hand the job back as soon as Redis answers (its end could not be written)."""
        with self._lock:
            self._releases[job_id] = attempt

    def sweep(self) -> int:
        """One pass: hand back what waits for it, put back the unclaimed messages of dead workers, then
        take over lost jobs while there is room here. Returns how many were taken over."""
        self._release_pending()
        swept = self.deliveries.sweep(self.unclaimed_after_s, job_of_message)
        for job_id in swept.requeued:
            log.info("job %s: its message was delivered to a worker that never claimed it; queued again", job_id)
        for job_id in swept.dropped:
            log.info("job %s: ended; a message for it that was never acknowledged is dropped", job_id)
        self._requeue_lost()
        if not self._taking:
            return 0
        running = {job: holder for job, holder in self.store.running().items() if holder != self.worker_id}
        alive = self.registry.alive(sorted({holder for holder in running.values() if holder}))
        taken = 0
        for job_id, holder in running.items():
            if holder in alive:
                continue
            outcome = self.take_over(job_id, holder)
            if outcome is None:
                break
            if outcome:
                log.info("job %s: taken over from %s", job_id, holder or "a worker that handed it back")
                taken += 1
        return taken

    def _requeue_lost(self) -> None:
        """Every unclaimed_after_s: a new message for each job queued that long whose message was
        missing in this search and in the last (a message in a worker's hands is missing for a moment)."""
        if time.monotonic() < self._next_lost_search:
            return
        self._next_lost_search = time.monotonic() + self.unclaimed_after_s
        cutoff = time.time() - self.unclaimed_after_s
        missing = self.lost.missing(cutoff, broker_lists, job_of_message)
        missed_before, self._missing = self._missing, {entry.job_id for entry in missing}
        for entry in (entry for entry in missing if entry.job_id in missed_before):
            queue = batch_queue(entry.queue) if entry.batch_item else entry.queue
            if self.lost.requeue(entry.job_id, keys.broker_queue(queue), self.message_for(entry.job_id, queue), cutoff):
                log.warning("job %s: its message was lost on its way to a worker; queued again", entry.job_id)
                self._missing.discard(entry.job_id)

    def _release_pending(self) -> None:
        with self._lock:
            pending = dict(self._releases)
        for job_id, attempt in pending.items():
            try:
                released = self.store.release(job_id, self.worker_id, attempt)
            except redis.RedisError:
                return  # still unreachable: next sweep
            log.info("job %s: %s", job_id, "handed back" if released else "no longer ours to hand back")
            with self._lock:
                self._releases.pop(job_id, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except redis.RedisError as exc:
                log.warning("recovery sweep failed: %s", exc)
            except Exception:  # a sweep must never end the thread
                log.exception("recovery sweep failed")


def broker_lists(queue: str) -> tuple[str, str]:
    """The broker lists that hold a job's messages: its queue's, and its queue's batch queue's."""
    return keys.broker_queue(queue), keys.broker_queue(batch_queue(queue))
