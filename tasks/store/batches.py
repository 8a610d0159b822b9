"""Batches: many generation requests, run as jobs on a device's lower-priority queue and counted as they end.

Item i of a batch is the job keys.batch_item(batch_id, i): an ordinary job record with four more fields
(its batch's two keys, its index, its custom_id), run by the same task as any job, but from the batch
queue (tasks/runtime/app.py batch_queue), which workers read only when their interactive queue is
empty. The job store's scripts count each item's start and end into the batch in the same atomic step as the
job's own change (tasks/store/lua.py), and keep each ended item's result line in
keys.batch_results, so counts never drift and results outlive the item's record.

Lifecycle: validating (the API writes items while it checks them; nothing is queued yet; then, once
every item is written and the limits admit them, it queues them a chunk per atomic step), in_progress
(every item queued), finalizing (every item taken by a worker), completed; cancelling, cancelled;
failed when the items could not be queued. A refused batch is discarded with all it wrote. A batch
whose API process died while submitting it is finished by a sweeper: queued to the end if every item
was written, else failed (`submission_interrupted`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tasks.store import keys, quotas
from tasks.store.jobs import JobStore, now
from tasks.store.listing import newest_first
from tasks.store.lua import script
from tasks.store.quotas import Limits, Refusal, limit_args
from tasks.store.states import BatchState

WRITE_CHUNK = 1000  # items per pipelined round trip (writes, reads, cancels, queueing)
SWEPT_AT_ONCE = 10  # stalled batches one sweep takes

# KEYS: batch hash, SUBMITTING. ARGV: now, batch id. The items are queued: validating becomes
# in_progress (finalizing if workers took them all meanwhile); a batch cancelled while validating whose
# items have all ended becomes cancelled (no item end is left to do it). Its submission is over.
# Returns the status after the call.
_START = script("""
redis.call('ZREM', KEYS[2], ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'status', 'started', 'total', 'completed', 'failed', 'cancelled')
local total = tonumber(b[3])
if b[1] == B_VALIDATING then
  redis.call('HSET', KEYS[1], 'status', B_IN_PROGRESS, 'in_progress_at', ARGV[1])
  b[1] = B_IN_PROGRESS
  if tonumber(b[2] or 0) >= total then
    redis.call('HSET', KEYS[1], 'status', B_FINALIZING, 'finalizing_at', ARGV[1])
    b[1] = B_FINALIZING
  end
elseif b[1] == B_CANCELLING and tonumber(b[4] or 0) + tonumber(b[5] or 0) + tonumber(b[6] or 0) >= total then
  redis.call('HSET', KEYS[1], 'status', B_CANCELLED, 'cancelled_at', ARGV[1])
  batch_ended(KEYS[1], B_CANCELLED)
  b[1] = B_CANCELLED
end
return b[1]
""")

# KEYS: batch hash. ARGV: now. A live batch becomes cancelling; its items are cancelled next, and the
# last item to end makes it cancelled. Returns the status after the call, nothing for an unknown batch.
_CANCEL = script("""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
if BATCH_LIVE[status] then
  redis.call('HSET', KEYS[1], 'status', B_CANCELLING, 'cancelling_at', ARGV[1])
  status = B_CANCELLING
end
return status
""")

# KEYS: batch hash, SUBMITTING. ARGV: now, error json, batch id. A batch whose items could not all be
# queued ends failed.
_FAIL = script("""
redis.call('ZREM', KEYS[2], ARGV[3])
local status = redis.call('HGET', KEYS[1], 'status')
if BATCH_LIVE[status] or status == B_CANCELLING then
  redis.call('HSET', KEYS[1], 'status', B_FAILED, 'failed_at', ARGV[1], 'error', ARGV[2])
  batch_ended(KEYS[1], B_FAILED)
end
""")

# KEYS: batch hash, the batch queue's broker list, the owner's live batches, the queue's last-seen time.
# ARGV: total, batch id, then the limits (tasks/store/quotas.py limit_args). Every item is written:
# unless a limit refuses the `total` items, record the total, which lets them be queued. Returns
# {'admitted'}, a refusal, or {'status', status} for a batch no longer validating (cancelled).
_ADMIT = script(
    quotas.LUA
    + """
local status, total, limits = redis.call('HGET', KEYS[1], 'status'), tonumber(ARGV[1]), read_limits(3)
if status ~= B_VALIDATING then  -- cancelled meanwhile: the total lets start() end it
  if status then redis.call('HSET', KEYS[1], 'total', total) end
  return {'status', status or ''}
end
local refusal = worker_seen(KEYS[4], limits.seen_since)
  or within('queue_depth', redis.call('LLEN', KEYS[2]), total, limits.queue_depth)
if refusal then return refusal end
if limits.owner_batch_items > 0 then
  redis.call('SREM', KEYS[3], ARGV[2])  -- counted as the `total` added, not as a live batch
  refusal = within('owner_batch_items', live_batch_items(KEYS[3]), total, limits.owner_batch_items)
  redis.call('SADD', KEYS[3], ARGV[2])
  if refusal then return refusal end
end
redis.call('HSET', KEYS[1], 'total', total)
return {'admitted'}
"""
)

# KEYS: batch hash, the batch queue's broker list, SUBMITTING. ARGV: when it is stalled if no chunk
# follows (a time), batch id, the index of the
# first item, then the items' broker messages in order. Pushes them if the batch's items before
# `first` are queued and no others (whoever queues a chunk first, the API or a sweeper, queues it
# once), and the batch is still being submitted. Returns the number of items queued after the call,
# or -1 for a batch no longer validating.
_PUSH = script("""
if redis.call('HGET', KEYS[1], 'status') ~= B_VALIDATING then return -1 end
local queued = tonumber(redis.call('HGET', KEYS[1], 'queued') or '0')
if queued ~= tonumber(ARGV[3]) then return queued end
redis.call('LPUSH', KEYS[2], unpack(ARGV, 4))
-- the items' job ids, as keys.batch_item derives them
for index = queued, queued + #ARGV - 4 do index_queued(ARGV[2] .. '-' .. index, KEYS[2]) end
queued = queued + #ARGV - 3
redis.call('HSET', KEYS[1], 'queued', queued)
redis.call('ZADD', KEYS[3], 'XX', ARGV[1], ARGV[2])
return queued
""")

# KEYS: SUBMITTING. ARGV: now, most, retry_s. Takes up to `most` batches whose submission stalled (due
# before now) and marks them due again retry_s later, so one sweeper takes each; returns their ids.
_STALLED = script("""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), id) end
return ids
""")


@dataclass(frozen=True)
class BatchRequest:
    """One request of a batch, as validated: its caller's id and the job's stored request."""

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
    # Made through OpenAI's Batch API: its endpoint, input_file_id, completion_window and model
    # (tasks/store/views.py shows such a batch in OpenAI's shape). None for a native batch.
    openai: dict[str, str] | None = None

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
            openai=json.loads(data["openai"]) if data.get("openai") else None,
        )


class BatchStore:
    """Writes and reads batches; item jobs are written through the JobStore, like any job.

    A batch being submitted is in keys.SUBMITTING, scored by when it counts as stalled: `stale_s`
    after its last chunk was queued, or `reading_s` after its last item was written while the API
    still reads and checks its requests (a client may pause between lines up to the body timeout).
    A stalled batch is finished by a sweeper (tasks/runtime/submission.py)."""

    def __init__(self, jobs: JobStore, ttl_s: int, stale_s: float = 10.0, reading_s: float = 40.0):
        self.jobs = jobs
        self.redis = jobs.redis
        self.ttl_s = int(ttl_s)
        self.stale_s, self.reading_s = float(stale_s), float(reading_s)
        self._start = self.redis.register_script(_START)
        self._cancel = self.redis.register_script(_CANCEL)
        self._fail = self.redis.register_script(_FAIL)
        self._admit = self.redis.register_script(_ADMIT)
        self._push = self.redis.register_script(_PUSH)
        self._stalled = self.redis.register_script(_STALLED)

    # -- writers -------------------------------------------------------------------------------

    def create(
        self,
        batch_id: str,
        owner: str | None,
        queue: str,
        metadata: dict[str, str],
        webhook: str | None = None,
        openai: dict[str, str] | None = None,
    ) -> None:
        """A new batch in `validating`, listed under its owner; its items come next. With a webhook,
        the batch's end is delivered there (tasks/store/lua.py queue_webhook); `openai` records a batch
        made through OpenAI's Batch API (BatchRecord.openai)."""
        created_at = now()
        fields = {
            "id": batch_id,
            "status": BatchState.VALIDATING.value,
            "owner": owner or "",
            "queue": queue,
            "created_at": repr(created_at),
            "metadata": json.dumps(metadata),
            "ttl_s": self.ttl_s,
            **({"webhook": webhook} if webhook else {}),
            **({"openai": json.dumps(openai)} if openai else {}),
        }
        listing, live = keys.owner_batches(owner or ""), keys.owner_live_batches(owner or "")
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.batch(batch_id), mapping=fields)
            pipe.expire(keys.batch(batch_id), self.ttl_s)
            pipe.zadd(listing, {batch_id: created_at})
            pipe.expire(listing, self.ttl_s)
            pipe.sadd(live, batch_id)
            pipe.expire(live, self.ttl_s)
            pipe.zadd(keys.SUBMITTING, {batch_id: created_at + self.reading_s})
            pipe.execute()

    def add_items(
        self, batch_id: str, owner: str | None, queue: str, first_index: int, items: list[BatchRequest]
    ) -> None:
        """Write item records (queued, not yet in the broker) in one round trip; they live as long as the batch."""
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
            pipe.zadd(keys.SUBMITTING, {batch_id: now() + self.reading_s}, xx=True)
            pipe.execute()

    def touch(self, batch_id: str) -> None:
        """The API is still reading the batch's requests: it has not stalled."""
        self.redis.zadd(keys.SUBMITTING, {batch_id: now() + self.reading_s}, xx=True)

    def admit(
        self, batch_id: str, owner: str | None, queue: str, broker_queue: str, total: int, limits: Limits
    ) -> Refusal | None:
        """Every one of the `total` items is written: check the limits on adding them to `broker_queue`
        (the batch queue of `queue`) for owner, and record the total. Returns the limit that refused
        them, or None (admitted, or cancelled meanwhile: start() then ends it)."""
        reply = self._admit(
            keys=[
                keys.batch(batch_id),
                keys.broker_queue(broker_queue),
                keys.owner_live_batches(owner or ""),
                keys.queue_seen(queue),
            ],
            args=[total, batch_id, *limit_args(limits)],
        )
        return Refusal.from_reply(reply) if reply[0] == "refused" else None

    def queued(self, batch_id: str) -> int:
        """How many of the batch's items (the first ones) are in the broker."""
        return int(self.redis.hget(keys.batch(batch_id), "queued") or 0)

    def push(self, batch_id: str, broker_queue: str, first: int, messages: list[str]) -> int:
        """Push the broker messages of items first, first + 1, ... onto `broker_queue`'s list in one atomic step,
        if they come next. Returns how many items are queued now, or -1 if the batch is no longer
        being submitted (cancelled, failed)."""
        return int(
            self._push(
                keys=[keys.batch(batch_id), keys.broker_queue(broker_queue), keys.SUBMITTING],
                args=[repr(now() + self.stale_s), batch_id, first, *messages],
            )
        )

    def start(self, batch_id: str, total: int) -> BatchState:
        """The items are queued: start the batch. A batch cancelled meanwhile has the items it had
        cancelled; those written since are cancelled here."""
        status = BatchState(self._start(keys=[keys.batch(batch_id), keys.SUBMITTING], args=[repr(now()), batch_id]))
        if status is BatchState.CANCELLING:
            self.cancel_items(batch_id, total)
        return status

    def fail(self, batch_id: str, total: int, error: dict[str, Any]) -> None:
        """The items could not all be queued: the batch ends failed and none of its items runs."""
        self._fail(keys=[keys.batch(batch_id), keys.SUBMITTING], args=[repr(now()), json.dumps(error), batch_id])
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
            pipe.srem(keys.owner_live_batches(owner or ""), batch_id)
            pipe.zrem(keys.SUBMITTING, batch_id)
            pipe.execute()

    def stalled(self) -> list[str]:
        """Batches whose submission stalled (their API process died, or stopped), each taken by one
        caller for a while: finish them (tasks/runtime/submission.py)."""
        return list(self._stalled(keys=[keys.SUBMITTING], args=[repr(now()), SWEPT_AT_ONCE, self.stale_s]))

    def cancel(self, batch_id: str) -> BatchState | None:
        """Cancel a live batch: queued items end now and never run, running ones stop within a few
        tokens. Returns the status after the call (an ended batch keeps its own), None if unknown."""
        status = self._cancel(keys=[keys.batch(batch_id)], args=[repr(now())])
        if status is None:
            return None
        if status == BatchState.CANCELLING.value:
            total, written = self.redis.hmget(keys.batch(batch_id), "total", "written")
            # While validating, total is not known yet: cancel what is written; start() does the rest.
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
        return newest_first(
            self.redis, keys.owner_batches(owner or ""), limit, after, keys.batch, BatchRecord.from_hash
        )

    def results(self, batch_id: str, total: int) -> Iterator[dict[str, Any]]:
        """Each ended item's entry ({custom_id, index, end}: its end event) in input order, reading
        WRITE_CHUNK at a time; items still queued or running are skipped."""
        for start in range(0, total, WRITE_CHUNK):
            fields = [str(i) for i in range(start, min(total, start + WRITE_CHUNK))]
            for line in self.redis.hmget(keys.batch_results(batch_id), fields):
                if line is not None:
                    yield json.loads(line)
