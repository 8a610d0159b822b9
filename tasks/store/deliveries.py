"""Broker messages delivered to a worker that died before it claimed their jobs.

A worker reserves messages ahead of its free job slots (Celery's prefetch): kombu's Redis transport
moves each one from its queue's list into the unacked hash (keys.BROKER_UNACKED, its delivery time in
keys.BROKER_UNACKED_INDEX) and removes it when the worker acknowledges it, once the job ends. If the
worker dies first, kombu puts the message back only after the visibility timeout (30 minutes). A job
that was claimed is running, and the recovery sweep takes it over by heartbeat; a message whose job
is still `queued` long after its delivery (HEARTBEAT_TIMEOUT_S: a live worker claims a job it takes
at once, save for one waiting for a slot) is put back on its queue here, in one Lua step, as kombu's
restore does, with a new delivery tag. A worker that still holds the message (it was only waiting)
may run it too: only one claim succeeds, the others find the job running or ended and let it go.

A message whose job has ended (or expired) by then is dropped instead: its holder died mid-job and the
job was taken over and finished elsewhere, or its worker's channel closed in a Redis outage before the
acknowledgement; kombu would only deliver it again after the visibility timeout, for nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import redis

from tasks.store import keys
from tasks.store.lua import script
from tasks.store.states import JobState

# KEYS: the unacked hash, its index, the job's hash, the queue's broker list. ARGV: the delivery tag,
# the message as it was read, the latest delivery time to put back, the message to push.
# Puts the message back only if it is still unacknowledged, as read, delivered before the cutoff,
# and its job still queued. Returns 1 if it did, else 0.
_REQUEUE = script("""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local delivered = redis.call('ZSCORE', KEYS[2], ARGV[1])
if delivered and tonumber(delivered) > tonumber(ARGV[3]) then return 0 end
if redis.call('HGET', KEYS[3], 'status') ~= QUEUED then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[4])
return 1
""")

# KEYS: the unacked hash, its index, the job's hash. ARGV: the delivery tag, the message as it was read.
# Drops the message only if it is still unacknowledged, as read, and its job ended or is gone.
_DROP = script("""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local status = redis.call('HGET', KEYS[3], 'status')
if status and not TERMINAL[status] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
""")

SCAN_LIMIT = 1000  # unacknowledged messages read per sweep: workers x prefetch, and a dead one's few


class Stale(NamedTuple):
    """An unacknowledged message delivered before the cutoff: its tag, as stored, and its parts."""

    tag: str
    raw: str
    message: dict[str, Any]
    routing_key: str


class Swept(NamedTuple):
    """What one pass over the stale messages did, by job id."""

    requeued: list[str]
    dropped: list[str]


class Deliveries:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._requeue = client.register_script(_REQUEUE)
        self._drop = client.register_script(_DROP)

    def stale(self, cutoff: float) -> list[Stale]:
        """The unacknowledged messages delivered before `cutoff` (Unix time), oldest first."""
        tags = self.redis.zrangebyscore(keys.BROKER_UNACKED_INDEX, "-inf", cutoff, start=0, num=SCAN_LIMIT)
        if not tags:
            return []
        found = []
        for tag, raw in zip(tags, self.redis.hmget(keys.BROKER_UNACKED, tags), strict=True):
            if raw is None:  # acknowledged meanwhile
                continue
            try:
                message, _exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue  # not kombu's: not ours to touch
            found.append(Stale(tag, raw, message, routing_key))
        return found

    def sweep(self, older_than_s: float, job_of: Callable[[dict[str, Any]], str | None]) -> Swept:
        """For the messages delivered more than `older_than_s` ago: put back on their queues those whose
        jobs are still queued, drop those whose jobs ended. `job_of` names a message's job (None: not
        a job's message, left alone)."""
        cutoff = time.time() - older_than_s
        stale = [(entry, job_of(entry.message)) for entry in self.stale(cutoff)]
        stale = [(entry, job_id) for entry, job_id in stale if job_id]
        swept = Swept([], [])
        if not stale:
            return swept
        with self.redis.pipeline(transaction=False) as pipe:
            for _entry, job_id in stale:
                pipe.hget(keys.job(job_id), "status")
            statuses = pipe.execute()
        for (entry, job_id), status in zip(stale, statuses, strict=True):
            unacked = [keys.BROKER_UNACKED, keys.BROKER_UNACKED_INDEX, keys.job(job_id)]
            if status == JobState.QUEUED.value:
                message = json.dumps(redelivered(entry.message))
                queue = keys.broker_queue(entry.routing_key)
                if self._requeue(keys=[*unacked, queue], args=[entry.tag, entry.raw, cutoff, message]):
                    swept.requeued.append(job_id)
            elif status is None or JobState(status).terminal:
                if self._drop(keys=unacked, args=[entry.tag, entry.raw]):
                    swept.dropped.append(job_id)
        return swept


def redelivered(message: dict[str, Any]) -> dict[str, Any]:
    """The message as kombu's restore puts it back (marked redelivered), with a delivery tag of its
    own: the dead worker's tag may still be acknowledged by a worker that was only slow, and kombu
    would then drop the new delivery's entry from the unacked hash."""
    message = json.loads(json.dumps(message))
    message.setdefault("headers", {})["redelivered"] = True
    properties = message.setdefault("properties", {})
    properties.setdefault("delivery_info", {})["redelivered"] = True
    properties["delivery_tag"] = str(uuid.uuid4())
    return message
