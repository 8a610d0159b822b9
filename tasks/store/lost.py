"""Queued jobs whose broker message was lost between its queue's list and the unacked hash.

kombu's Redis transport takes a message off its queue's list with BRPOP and only then records it in
the unacked hash (keys.BROKER_UNACKED): two steps. A worker killed between them, or a Redis that
goes away between them, loses the message, and its job would stay `queued` with nothing left to
run it. So every queued job is indexed under the list its message went on (keys.queued: added in
the step that pushes the message, removed when the job is claimed or ends), and the recovery sweep
(tasks/runtime/recovery.py) looks, list by list, for the jobs queued longer than a while whose
message is neither on that list nor unacknowledged. The list and the hash are read in one MULTI, a
snapshot; what it cannot see is a message in a worker's hands between the two steps, for a moment,
so a job is pushed a new message only when it was missing in two searches in a row. Should a copy
turn up after all, only one claim runs the job.

The search reads the whole list, so it skips a list (and the unacked hash) holding more than
SCAN_LIMIT messages: a message lost behind a long backlog is found once that backlog drains, and a
backlog on one list (a large batch) delays nothing on another.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from tasks.store import keys
from tasks.store.lua import script
from tasks.store.states import JobState

SCAN_LIMIT = 1000  # messages a search reads from a list and from the unacked hash, and jobs it checks

JobOf = Callable[[dict[str, Any]], "str | None"]  # the job a message queues (None: not a job's message)

# KEYS: the job's hash, the broker list. ARGV: job id, the message, the cutoff it was found missing by.
# Pushes the message (to be taken next, as kombu's restore does) and indexes the job afresh, only if
# it is still queued and was indexed before the cutoff (another worker's sweep may have pushed one
# meanwhile). Returns 1 if it did, else 0.
_REQUEUE = script("""
local index = QUEUED_PREFIX .. KEYS[2]
if redis.call('HGET', KEYS[1], 'status') ~= QUEUED then
  redis.call('ZREM', index, ARGV[1])
  return 0
end
local queued_at = redis.call('ZSCORE', index, ARGV[1])
if queued_at and tonumber(queued_at) > tonumber(ARGV[3]) then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
index_queued(ARGV[1], KEYS[2])
return 1
""")


class LostMessages:
    def __init__(self, client: redis.Redis):
        self.redis = client  # decode_responses=True, as the job store's
        self._requeue = client.register_script(_REQUEUE)

    def now(self) -> float:
        """Redis's clock: the one the index is kept in, whatever the clocks of API and workers."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1_000_000

    def missing(self, broker_list: str, cutoff: float, job_of: JobOf) -> list[str]:
        """The jobs indexed on `broker_list` before `cutoff` (Redis time), still queued, whose message is
        neither on the list nor unacknowledged; [] while the list or the hash is too long to read."""
        if self._too_long(broker_list):
            return []
        queued = self.queued_before(broker_list, cutoff)
        if not queued:
            return []
        with self.redis.pipeline(transaction=True) as pipe:  # one snapshot of both
            pipe.llen(broker_list)
            pipe.lrange(broker_list, 0, SCAN_LIMIT - 1)
            pipe.hvals(keys.BROKER_UNACKED)
            size, listed, unacked = pipe.execute()
        if size > SCAN_LIMIT:  # it grew since it was counted: not all of it was read
            return []
        messages = [_message(raw) for raw in listed] + [_message(raw, unacked=True) for raw in unacked]
        present = {job_of(message) for message in messages if message is not None}
        return [job_id for job_id in queued if job_id not in present]

    def queued_before(self, broker_list: str, cutoff: float) -> list[str]:
        """The oldest jobs indexed on `broker_list` before `cutoff` that are still queued; the entries
        of those that are not (claimed or ended meanwhile, or expired) are removed on the way."""
        index = keys.queued(broker_list)
        ids = self.redis.zrangebyscore(index, "-inf", cutoff, start=0, num=SCAN_LIMIT)
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.job(job_id), "status")
            statuses = pipe.execute()
        queued = [job_id for job_id, status in zip(ids, statuses, strict=True) if status == JobState.QUEUED.value]
        if len(queued) < len(ids):
            self.redis.zrem(index, *(set(ids) - set(queued)))
        return queued

    def requeue(self, job_id: str, broker_list: str, message: str, cutoff: float) -> bool:
        """Push a new message for the job onto `broker_list`, if it is still queued and was indexed
        before `cutoff` (the one it was found missing by)."""
        return bool(self._requeue(keys=[keys.job(job_id), broker_list], args=[job_id, message, repr(cutoff)]))

    def _too_long(self, broker_list: str) -> bool:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(broker_list)
            pipe.hlen(keys.BROKER_UNACKED)
            return max(pipe.execute()) > SCAN_LIMIT


def _message(raw: str, unacked: bool = False) -> dict[str, Any] | None:
    """A message as kombu stores it: the message itself on a list; [message, exchange, routing key]
    in the unacked hash. None for anything else."""
    try:
        decoded = json.loads(raw)
        message = decoded[0] if unacked else decoded
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    return message if isinstance(message, dict) else None
