"""The limits a new job or batch is checked against, in the same atomic step that stores and queues it.

Per queue: a live worker must have served it lately (the no-worker grace), and its broker list may hold
so many messages. Per server: Redis may use so much of its maxmemory (the high-water mark), so the work
already accepted keeps room to write its chunks and ends. Per owner (an API key's name): so many queued
jobs, running jobs and queued batch items. The owner's counts come from two sets of ids that may not
have ended (keys.owner_live_jobs, keys.owner_live_batches), read as the step counts: what has ended is
dropped there, so the workers' scripts need not know about quotas. A limit of 0 is no limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from tasks.store import keys
from tasks.store.lua import script


@dataclass(frozen=True)
class Limits:
    worker_seen_since: float = 0.0  # a worker of the queue must have beaten after this (Unix time); 0: no check
    queue_depth: int = 0  # messages waiting in the queue's broker list
    owner_queued: int = 0  # the owner's queued jobs
    owner_running: int = 0  # the owner's running jobs
    owner_batch_items: int = 0  # the owner's queued batch items
    memory_high_water: float = 0.0  # the share of Redis's maxmemory in use that refuses new work; 0: no check


@dataclass(frozen=True)
class Refusal:
    """A limit that refused the job or batch: its name (a Limits field), the count it found (for
    worker_seen_since: when a worker last beat, 0 for never; for memory_high_water: the bytes in
    use, and maxmemory) and the limit."""

    limit: str
    count: float
    maximum: float

    @classmethod
    def from_reply(cls, reply: list) -> Refusal:
        return cls(str(reply[1]), float(reply[2]), float(reply[3]))


def limit_args(limits: Limits) -> list[str]:
    """The ARGV the Lua below reads, in QUOTA_ARGS order."""
    return [
        repr(limits.worker_seen_since),
        str(limits.queue_depth),
        str(limits.owner_queued),
        str(limits.owner_running),
        str(limits.owner_batch_items),
        repr(limits.memory_high_water),
    ]


NO_LIMITS = Limits()
QUOTA_ARGS = len(limit_args(NO_LIMITS))

# Shared by the scripts that admit new work. Each check returns nil, or the refusal to return:
# {'refused', limit, count, maximum}.
LUA = f"""
local BATCH_PREFIX = '{keys.batch("")}'

local function read_limits(first)
  return {{seen_since = tonumber(ARGV[first]), queue_depth = tonumber(ARGV[first + 1]),
          owner_queued = tonumber(ARGV[first + 2]), owner_running = tonumber(ARGV[first + 3]),
          owner_batch_items = tonumber(ARGV[first + 4]), memory_high_water = tonumber(ARGV[first + 5])}}
end

local function refused(limit, count, maximum)
  return {{'refused', limit, tostring(count), tostring(maximum)}}
end

-- Adding `adding` to `count` must stay within `maximum` (0: no limit).
local function within(limit, count, adding, maximum)
  if maximum > 0 and count + adding > maximum then return refused(limit, count, maximum) end
end

local function worker_seen(seen_key, since)
  if since <= 0 then return nil end
  local seen = tonumber(redis.call('GET', seen_key) or '0')
  if seen < since then return refused('worker_seen_since', seen, since) end
end

-- Redis must use less than high_water of its maxmemory (none set: no check). INFO is read in the step
-- itself, so a burst of submissions cannot slip past a reading taken before it.
local function memory_room(high_water)
  if high_water <= 0 then return nil end
  local info = redis.call('INFO', 'memory')
  local limit = tonumber(string.match(info, '\\nmaxmemory:(%d+)') or '0')
  local used = tonumber(string.match(info, '\\nused_memory:(%d+)') or '0')
  if limit > 0 and used >= high_water * limit then return refused('memory_high_water', used, limit) end
end

-- The owner's queued and running jobs; ended (or expired) ones leave the set here.
local function live_jobs(set_key)
  local queued, running = 0, 0
  for _, id in ipairs(redis.call('SMEMBERS', set_key)) do
    local status = redis.call('HGET', JOB_PREFIX .. id, 'status')
    if status == QUEUED then queued = queued + 1
    elseif status == RUNNING then running = running + 1
    else redis.call('SREM', set_key, id) end
  end
  return queued, running
end

-- The owner's batch items not yet taken by a worker: those of batches being submitted or in progress
-- (every item written, less those started); other batches leave the set here. An item cancelled
-- alone while queued still counts until its batch has ended.
local function live_batch_items(set_key)
  local items = 0
  for _, id in ipairs(redis.call('SMEMBERS', set_key)) do
    local b = redis.call('HMGET', BATCH_PREFIX .. id, 'status', 'total', 'written', 'started')
    if b[1] == B_VALIDATING or b[1] == B_IN_PROGRESS then
      items = items + math.max(0, tonumber(b[2] or b[3] or 0) - tonumber(b[4] or 0))
    else redis.call('SREM', set_key, id) end
  end
  return items
end
"""


class MemoryRoom:
    """The high-water check alone, for work admitted without a script of its own (an upload, read
    before it is written)."""

    def __init__(self, client: redis.Redis):
        self._check = client.register_script(script(LUA + "\nreturn memory_room(tonumber(ARGV[1])) or {'room'}\n"))

    def refusal(self, high_water: float) -> Refusal | None:
        reply = self._check(args=[repr(float(high_water))])
        return Refusal.from_reply(reply) if reply[0] == "refused" else None
