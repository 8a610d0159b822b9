"""Batches: many generation requests, run as jobs on a device's lower-priority queue and counted as they end.

Item i of a batch is the job keys.batch_item(batch_id, i): an ordinary job record with four more fields
(its batch's two keys, its index, its custom_id), run by the same task as any job, but from the batch
queue (tasks/app.py batch_queue), which workers read only when their interactive queue is empty. The
job store's scripts count each item's start and end into the batch in the same atomic step as the
job's own change (tasks/store.py _BATCH_HOOKS), and keep each ended item's result line in
keys.batch_results, so counts never drift and results outlive the item's record.

Lifecycle: validating (the API writes items while it checks them; nothing is queued yet), in_progress
(every item queued), finalizing (every item taken by a worker), completed; cancelling, cancelled;
failed when the items could not be queued. A refused batch is discarded with all it wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from tasks import keys
from tasks.app import batch_queue, enqueue_many
from tasks.states import BatchState
from tasks.store import JobStore, now

WRITE_CHUNK = 1000  # items per pipelined round trip (writes, reads, cancels)

# KEYS: batch hash. ARGV: now. The items are queued: validating becomes in_progress (finalizing if
# workers took them all meanwhile); a batch cancelled while validating whose items have all ended
# becomes cancelled (no item end is left to do it). Returns the status after the call.
_START = """
local b = redis.call('HMGET', KEYS[1], 'status', 'started', 'total', 'completed', 'failed', 'cancelled')
local total = tonumber(b[3])
if b[1] == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[1])
  b[1] = 'in_progress'
  if tonumber(b[2] or 0) >= total then
    redis.call('HSET', KEYS[1], 'status', 'finalizing', 'finalizing_at', ARGV[1])
    b[1] = 'finalizing'
  end
elseif b[1] == 'cancelling' and tonumber(b[4] or 0) + tonumber(b[5] or 0) + tonumber(b[6] or 0) >= total then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1])
  b[1] = 'cancelled'
end
return b[1]
"""

# KEYS: batch hash. ARGV: now. A live batch becomes cancelling; its items are cancelled next, and the
# last item to end makes it cancelled. Returns the status after the call, nothing for an unknown batch.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
if status == 'validating' or status == 'in_progress' or status == 'finalizing' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
  status = 'cancelling'
end
return status
"""

# KEYS: batch hash. ARGV: now, error json. A batch whose items could not all be queued ends failed.
_FAIL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' or status == 'in_progress' or status == 'finalizing' or status == 'cancelling' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[1], 'error', ARGV[2])
end
"""


@dataclass(frozen=True)
class BatchItem:
    custom_id: str | None
    request: dict[str, Any]


@dataclass(frozen=True)
class BatchRecord:
    id: str
    status: BatchState
    owner: str
    queue: str
    created_at: float
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    started: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    timestamps: dict[str, float] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    error: dict[str, Any] | None = None
    expires_at: float | None = None

    TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at", "cancelled_at")

    @property
    def ended(self) -> int:
        return self.completed + self.failed + self.cancelled

    @classmethod
    def from_hash(cls, data: dict[str, str], ttl_left_s: int | None = None) -> BatchRecord:
        def count(name: str) -> int:
            return int(data.get(name) or 0)

        return cls(
            id=data["id"],
            status=BatchState(data["status"]),
            owner=data.get("owner", ""),
            queue=data.get("queue", ""),
            created_at=float(data["created_at"]),
            total=count("total"),
            completed=count("completed"),
            failed=count("failed"),
            cancelled=count("cancelled"),
            started=count("started"),
            prompt_tokens=count("prompt_tokens"),
            completion_tokens=count("completion_tokens"),
            metadata=json.loads(data.get("metadata") or "{}"),
            timestamps={name: float(data[name]) for name in cls.TIMESTAMPS if data.get(name)},
            error=json.loads(data["error"]) if data.get("error") else None,
            expires_at=now() + ttl_left_s if ttl_left_s and ttl_left_s > 0 else None,
        )


class BatchStore:
    """Writes and reads batches; item jobs are written through the JobStore, like any job."""

    def __init__(self, jobs: JobStore, ttl_s: int):
        self.jobs = jobs
        self.redis = jobs.redis
        self.ttl_s = int(ttl_s)
        self._start = self.redis.register_script(_START)
        self._cancel = self.redis.register_script(_CANCEL)
        self._fail = self.redis.register_script(_FAIL)

    # -- writers -------------------------------------------------------------------------------

    def create(self, batch_id: str, owner: str | None, queue: str, metadata: dict[str, str]) -> None:
        """A new batch in `validating`, listed under its owner; its items come next."""
        created_at = now()
        fields = {
            "id": batch_id,
            "status": BatchState.VALIDATING.value,
            "owner": owner or "",
            "queue": queue,
            "created_at": repr(created_at),
            "metadata": json.dumps(metadata),
            "ttl_s": self.ttl_s,
        }
        listing = keys.owner_batches(owner or "")
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.batch(batch_id), mapping=fields)
            pipe.expire(keys.batch(batch_id), self.ttl_s)
            pipe.zadd(listing, {batch_id: created_at})
            pipe.expire(listing, self.ttl_s)
            pipe.execute()

    def add_items(self, batch_id: str, owner: str | None, queue: str, first_index: int, items: list[BatchItem]) -> None:
        """Write item records (queued, not yet enqueued) in one round trip; they live as long as the batch."""
        with self.redis.pipeline(transaction=False) as pipe:
            for offset, item in enumerate(items):
                index = first_index + offset
                extra = {
                    "batch_key": keys.batch(batch_id),
                    "batch_results_key": keys.batch_results(batch_id),
                    "batch_index": str(index),
                    "batch_custom_id": json.dumps(item.custom_id),
                }
                job_id = keys.batch_item(batch_id, index)
                self.jobs.create(job_id, item.request, queue, owner, extra=extra, ttl_s=self.ttl_s, pipe=pipe)
            pipe.hset(keys.batch(batch_id), "written", first_index + len(items))
            pipe.execute()

    def enqueue(self, celery: Celery, batch_id: str, queue: str, total: int) -> BatchState:
        """Queue every item on the batch queue, then start the batch. A batch cancelled meanwhile has
        the items it had cancelled; those written since are cancelled here."""
        self.redis.hset(keys.batch(batch_id), "total", total)
        enqueue_many(celery, (keys.batch_item(batch_id, i) for i in range(total)), batch_queue(queue))
        status = BatchState(self._start(keys=[keys.batch(batch_id)], args=[repr(now())]))
        if status is BatchState.CANCELLING:
            self.cancel_items(batch_id, total)
        return status

    def fail(self, batch_id: str, total: int, error: dict[str, Any]) -> None:
        """The items could not all be queued: the batch ends failed and none of its items runs."""
        self._fail(keys=[keys.batch(batch_id)], args=[repr(now()), json.dumps(error)])
        self.cancel_items(batch_id, total)

    def discard(self, batch_id: str, owner: str | None, written: int) -> None:
        """Remove a refused batch and the items it wrote (none of them was queued)."""
        for start in range(0, written, WRITE_CHUNK):
            with self.redis.pipeline(transaction=False) as pipe:
                for index in range(start, min(written, start + WRITE_CHUNK)):
                    self.jobs.delete(keys.batch_item(batch_id, index), pipe=pipe)
                pipe.execute()
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.batch(batch_id), keys.batch_results(batch_id))
            pipe.zrem(keys.owner_batches(owner or ""), batch_id)
            pipe.execute()

    def cancel(self, batch_id: str) -> BatchState | None:
        """Cancel a live batch: queued items end now and never run, running ones stop within a few
        tokens. Returns the status after the call (an ended batch keeps its own), None if unknown."""
        status = self._cancel(keys=[keys.batch(batch_id)], args=[repr(now())])
        if status is None:
            return None
        if status == BatchState.CANCELLING.value:
            total, written = self.redis.hmget(keys.batch(batch_id), "total", "written")
            # While validating, total is not known yet: cancel what is written; enqueue() does the rest.
            self.cancel_items(batch_id, int(total or written or 0))
            status = self.redis.hget(keys.batch(batch_id), "status") or status
        return BatchState(status)

    def cancel_items(self, batch_id: str, total: int) -> None:
        for start in range(0, total, WRITE_CHUNK):
            self.jobs.cancel_many(keys.batch_item(batch_id, i) for i in range(start, min(total, start + WRITE_CHUNK)))

    # -- readers -------------------------------------------------------------------------------

    def get(self, batch_id: str) -> BatchRecord | None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.batch(batch_id))
            pipe.ttl(keys.batch(batch_id))
            data, ttl_left = pipe.execute()
        return BatchRecord.from_hash(data, ttl_left) if data else None

    def list(self, owner: str | None, limit: int, after: str | None = None) -> tuple[list[BatchRecord], bool]:
        """The owner's batches newest first, up to `limit` after the batch `after`, and whether more
        follow. Raises KeyError for an `after` that is not one of the owner's batches."""
        listing = keys.owner_batches(owner or "")
        start = 0
        if after:
            rank = self.redis.zrevrank(listing, after)
            if rank is None:
                raise KeyError(after)
            start = rank + 1
        found: list[BatchRecord] = []
        while len(found) <= limit:
            ids = self.redis.zrevrange(listing, start, start + limit)
            if not ids:
                break
            start += len(ids)
            with self.redis.pipeline(transaction=False) as pipe:
                for batch_id in ids:
                    pipe.hgetall(keys.batch(batch_id))
                    pipe.ttl(keys.batch(batch_id))
                replies = pipe.execute()
            for batch_id, data, ttl_left in zip(ids, replies[::2], replies[1::2], strict=True):
                if data:
                    found.append(BatchRecord.from_hash(data, ttl_left))
                else:  # expired: forget it
                    self.redis.zrem(listing, batch_id)
                    start -= 1
        return found[:limit], len(found) > limit

    def results(self, batch_id: str, total: int) -> Iterator[dict[str, Any]]:
        """Each ended item's entry ({custom_id, index, end}: its end event) in input order, reading
        WRITE_CHUNK at a time; items still queued or running are skipped."""
        for start in range(0, total, WRITE_CHUNK):
            fields = [str(i) for i in range(start, min(total, start + WRITE_CHUNK))]
            for line in self.redis.hmget(keys.batch_results(batch_id), fields):
                if line is not None:
                    yield json.loads(line)
