"""The limits on new jobs and batches, from the settings, and the error each refusal answers.

The store checks them in the step that stores and queues the work (tasks/store/quotas.py), so two
concurrent submissions cannot both slip under a limit. Per API key (its owner name; everyone shares
the open API's): queued jobs, running jobs, queued batch items (429 each). Per queue: waiting jobs
and waiting batch items (429), a live worker (503 `no_worker` once none has served the queue for
NO_WORKER_GRACE_S, instead of piling up jobs nothing will run). Per server, for a job: Redis's memory
(503 `store_full` past REDIS_HIGH_WATER of its maxmemory, api/service/capacity.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from api.errors import ApiError
from api.service.capacity import store_full
from tasks.store.quotas import Limits, Refusal
from tasks.store.registry import HEARTBEAT_TTL_S

RETRY_AFTER_S = 5  # a full queue or quota frees up as jobs start and end
NO_WORKER_RETRY_AFTER_S = 15
# Per key: the setting, the error code and what is counted, by tasks/store/quotas.py Limits field.
OWNER_LIMITS = {
    "owner_queued": ("MAX_QUEUED_JOBS_PER_KEY", "too_many_queued_jobs", "queued jobs"),
    "owner_running": ("MAX_RUNNING_JOBS_PER_KEY", "too_many_running_jobs", "running jobs"),
    "owner_batch_items": ("MAX_QUEUED_BATCH_ITEMS_PER_KEY", "too_many_queued_batch_items", "queued batch items"),
}


class Quotas:
    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings

    def _seen_since(self) -> float:
        """A live worker beats every few seconds: one whose last beat is older than the grace (never
        shorter than a heartbeat's life) is gone. 0 turns the check off."""
        grace = float(self.settings["NO_WORKER_GRACE_S"])
        return time.time() - max(grace, HEARTBEAT_TTL_S) if grace > 0 else 0.0

    def job_limits(self, queue: str) -> Limits:
        return Limits(
            worker_seen_since=self._seen_since(),
            queue_depth=int(self.settings["MAX_QUEUED_JOBS"]),
            owner_queued=int(self.settings["MAX_QUEUED_JOBS_PER_KEY"]),
            owner_running=int(self.settings["MAX_RUNNING_JOBS_PER_KEY"]),
            memory_high_water=float(self.settings["REDIS_HIGH_WATER"]),
        )

    def batch_limits(self, queue: str) -> Limits:
        return Limits(
            worker_seen_since=self._seen_since(),
            queue_depth=int(self.settings["MAX_QUEUED_BATCH_ITEMS"]),
            owner_batch_items=int(self.settings["MAX_QUEUED_BATCH_ITEMS_PER_KEY"]),
        )

    def refused(self, refusal: Refusal, queue: str, batch_items: int = 0) -> ApiError:
        """The error of a refusal; `batch_items`: the size of the refused batch (0 for a job)."""
        count, maximum = int(refusal.count), int(refusal.maximum)
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if refusal.limit == "memory_high_water":
            return store_full(refusal, float(self.settings["REDIS_HIGH_WATER"]))
        adding = f"; this batch's {batch_items} would pass it" if batch_items else ""
        if refusal.limit == "worker_seen_since":
            grace = self.settings["NO_WORKER_GRACE_S"]
            return ApiError(
                503,
                "no_worker",
                f"no live worker serves the {queue!r} queue (none has for {grace} s, GENQUEUE_NO_WORKER_GRACE_S); "
                "new jobs are refused until one starts",
                headers={"Retry-After": str(NO_WORKER_RETRY_AFTER_S)},
            )
        if refusal.limit == "queue_depth" and batch_items:
            return ApiError(
                429,
                "batch_queue_full",
                f"the {queue!r} queue's batches hold {count} waiting requests, of a limit of {maximum} "
                f"(GENQUEUE_MAX_QUEUED_BATCH_ITEMS){adding}; retry later",
                headers=retry,
            )
        if refusal.limit == "queue_depth":
            return ApiError(
                429,
                "queue_full",
                f"the {queue!r} queue holds {count} waiting jobs, its limit (GENQUEUE_MAX_QUEUED_JOBS); retry later",
                headers=retry,
            )
        setting, code, what = OWNER_LIMITS[refusal.limit]
        return ApiError(
            429,
            code,
            f"this API key has {count} {what}, of a limit of {maximum} (GENQUEUE_{setting}){adding}; "
            "retry once some have ended",
            headers=retry,
        )
