"""Queued jobs whose broker message was lost between its queue and the unacked hash.

kombu's Redis transport takes a message off its queue's list with BRPOP and only then records it in
the unacked hash (keys.BROKER_UNACKED): two steps. A worker killed between them, or a Redis that
goes away between them, loses the message, and its job would stay `queued` with nothing left to
run it. So every queued job is indexed (keys.QUEUED, added in the step that pushes its message,
removed when it is claimed or ends), and the recovery sweep (tasks/runtime/recovery.py) looks for
the jobs queued longer than a while whose message is in no queue list and not unacknowledged. The
lists and the hash are read in one MULTI, a snapshot; what it cannot see is a message in a worker's
hands between the two steps, for a moment, so a job is pushed a new message only when it was
missing in two passes in a row. Should a copy turn up after all, only one claim runs the job.

The search reads the candidates' whole queue lists, so it runs only while they hold at most
SCAN_LIMIT messages: a message lost behind a long backlog is found once the backlog drains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import redis

from tasks.store import keys
from tasks.store.lua import script
from tasks.store.states import JobState

SCAN_LIMIT = 1000  # candidates read per pass, and messages in their lists past which a pass waits

# KEYS: the job's hash, the broker list. ARGV: job id, the message, now, the cutoff it was found by.
# Pushes the message (to be taken next, as kombu's restore does) only if the job is still queued and
# was queued before the cutoff (another worker's sweep may have pushed one meanwhile). Returns 1 if
# it did, else 0.
_REQUEUE = script("""
if redis.call('HGET', KEYS[1], 'status') ~= QUEUED then
  redis.call('ZREM', QUEUED_JOBS, ARGV[1])
  return 0
end
local queued_at = redis.call('ZSCORE', QUEUED_JOBS, ARGV[1])
if queued_at and tonumber(queued_at) > tonumber(ARGV[4]) then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('ZADD', QUEUED_JOBS, ARGV[3], ARGV[1])
return 1
""")


class Queued(NamedTuple):
    """A job queued before the cutoff: its id, its queue, and whether it is a batch's item."""

    job_id: str
    queue: str
    batch_item: bool


class LostMessages:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._requeue = client.register_script(_REQUEUE)

    def queued_before(self, cutoff: float) -> list[Queued]:
        """The jobs still queued that were queued before `cutoff` (Unix time), oldest first; index
        entries of jobs that are no longer queued (or gone) are removed on the way."""
        ids = self.redis.zrangebyscore(keys.QUEUED, "-inf", cutoff, start=0, num=SCAN_LIMIT)
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(keys.job(job_id), "status", "queue", "batch_key")
            found = pipe.execute()
        queued, stale = [], []
        for job_id, (status, queue, batch_key) in zip(ids, found, strict=True):
            if status == JobState.QUEUED.value and queue:
                queued.append(Queued(job_id, queue, batch_key is not None))
            else:
                stale.append(job_id)
        if stale:
            self.redis.zrem(keys.QUEUED, *stale)
        return queued

    def missing(
        self,
        cutoff: float,
        lists_of: Callable[[str], Iterable[str]],
        job_of: Callable[[dict[str, Any]], str | None],
    ) -> list[Queued]:
        """The jobs queued before `cutoff` (Unix time) whose message is in none of their queues' broker
        lists (`lists_of(queue)`) and not unacknowledged; [] when those lists are too long to read now.
        `job_of` names a message's job (None: not a job's message)."""
        queued = self.queued_before(cutoff)
        if not queued:
            return []
        lists = sorted({name for entry in queued for name in lists_of(entry.queue)})
        present = self._jobs_with_a_message(lists, job_of)
        if present is None:
            return []
        return [entry for entry in queued if entry.job_id not in present]

    def requeue(self, job_id: str, broker_list: str, message: str, cutoff: float) -> bool:
        """Push a new message for the job onto `broker_list`, if it is still queued and was queued
        before `cutoff` (the one it was found missing by)."""
        args = [job_id, message, repr(time.time()), repr(cutoff)]
        return bool(self._requeue(keys=[keys.job(job_id), broker_list], args=args))

    def _jobs_with_a_message(self, lists: list[str], job_of: Callable[[dict[str, Any]], str | None]) -> set[str] | None:
        """The jobs named by a message in `lists` or in the unacked hash, read in one snapshot; None when
        they hold more than SCAN_LIMIT messages (counted first, so a long list is never read)."""
        if self._messages_in(lists) > SCAN_LIMIT:
            return None
        with self.redis.pipeline(transaction=True) as pipe:
            for name in lists:
                pipe.llen(name)
            for name in lists:
                pipe.lrange(name, 0, SCAN_LIMIT - 1)
            pipe.hvals(keys.BROKER_UNACKED)
            replies = pipe.execute()
        sizes, listed, unacked = replies[: len(lists)], replies[len(lists) : -1], replies[-1]
        if sum(sizes) > SCAN_LIMIT:  # grew since it was counted: some of it was not read
            return None
        messages = [_message(raw) for content in listed for raw in content]
        messages += [_message(raw, unacked=True) for raw in unacked]
        return {job_id for job_id in (job_of(message) for message in messages if message) if job_id}

    def _messages_in(self, lists: list[str]) -> int:
        with self.redis.pipeline(transaction=False) as pipe:
            for name in lists:
                pipe.llen(name)
            pipe.hlen(keys.BROKER_UNACKED)
            return sum(pipe.execute())


def _message(raw: str, unacked: bool = False) -> dict[str, Any] | None:
    """A message as kombu stores it: the message itself on a list; [message, exchange, routing key]
    in the unacked hash. None for anything else."""
    try:
        decoded = json.loads(raw)
        message = decoded[0] if unacked else decoded
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    return message if isinstance(message, dict) else None
