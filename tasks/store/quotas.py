"""The limits a new job or batch is checked against, in the same atomic step that stores and queues it.

Per queue: a live worker must have served it lately (the no-worker grace), and its broker list may hold
so many messages. Per owner (an API key's name): so many queued jobs, running jobs and queued batch
items. The owner's counts come from two sets of ids that may not have ended (keys.owner_live_jobs,
keys.owner_live_batches), read as the step counts: what has ended is dropped there, so the workers'
scripts need not know about quotas. A limit of 0 is no limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.store import keys


@dataclass(frozen=True)
class Limits:
    worker_seen_since: float = 0.0  # a worker of the queue must have beaten after this (Unix time); 0: no check
    queue_depth: int = 0  # messages waiting in the queue's broker list
    owner_queued: int = 0  # the owner's queued jobs
    owner_running: int = 0  # the owner's running jobs
    owner_batch_items: int = 0  # the owner's queued batch items


@dataclass(frozen=True)
class Refusal:
    """A limit that refused the job or batch: its name (a Limits field), the count it found (for
    worker_seen_since: when a worker last beat, 0 for never) and the limit."""

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
          owner_batch_items = tonumber(ARGV[first + 4])}}
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
