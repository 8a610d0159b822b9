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
from collections.abc import Callable, Sequence

import redis

from tasks.runtime.app import job_of_message
from tasks.store.deliveries import Deliveries
from tasks.store.jobs import JobStore
from tasks.store.lost import LostMessages
from tasks.store.registry import WorkerRegistry

log = logging.getLogger(__name__)

# take_over(job id, holder seen) -> True taken, False lost the race (or it ended), None: no room here now.
TakeOver = Callable[[str, str], "bool | None"]
# message_for(job id, broker list) -> the message that queues the job there (tasks/runtime/app.py).
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
        broker_lists: Sequence[str],
        message_for: MessageFor,
    ):
        self.store, self.registry, self.worker_id = store, registry, worker_id
        self.deliveries = Deliveries(store.redis)
        self.unclaimed_after_s = unclaimed_after_s  # a delivered job still queued this long: its worker died
        self.lost = LostMessages(store.redis)
        self.broker_lists = tuple(broker_lists)  # the lists this worker consumes: where it looks for lost messages
        self.message_for = message_for
        self._missing: set[tuple[str, str]] = set()  # (list, job) the last search for lost messages missed
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
        try:
            self._requeue_lost()
        except redis.RedisError as exc:  # its own failure never holds the takeovers back
            log.warning("search for lost messages failed: %s", exc)
        return taken

    def _requeue_lost(self) -> None:
        """Every unclaimed_after_s: a new message for each job queued that long whose message was
        missing in this search and in the last (a message in a worker's hands is missing for a moment)."""
        if time.monotonic() < self._next_lost_search:
            return
        self._next_lost_search = time.monotonic() + self.unclaimed_after_s
        cutoff = self.lost.now() - self.unclaimed_after_s
        missing = {(name, job) for name in self.broker_lists for job in self.lost.missing(name, cutoff, job_of_message)}
        missed_before, self._missing = self._missing, missing
        for broker_list, job_id in sorted(missing & missed_before):
            if self.lost.requeue(job_id, broker_list, self.message_for(job_id, broker_list), cutoff):
                log.warning("job %s: its message was lost on its way to a worker; queued again", job_id)
                self._missing.discard((broker_list, job_id))

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
