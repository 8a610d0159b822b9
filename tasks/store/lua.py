"""The Lua every store script shares, with the state names of tasks/store/states.py filled in.

Each script that changes a job or a batch is one atomic step. They share a prelude: the state names
(from the Python enums, so the two never part), the job log's helpers, ending a job with its last
event, and the batch side of a batch item's changes. An item's job hash names its batch's keys
(batch_key, batch_results_key), so every path that starts or ends a job keeps its batch's counts in
the same step, and a job that cannot end twice cannot be counted twice. The same step queues the
webhook of a job or batch that ends and asked for one (`queue_webhook`), so no end can go unnoticed.
"""

from __future__ import annotations

from tasks.store import keys
from tasks.store.states import BatchState, JobState

# How long a webhook event waits in the outbox for its first attempt (a later attempt sets its own).
WEBHOOK_OUTBOX_TTL_S = 7 * 24 * 3600


def _lua_set(values) -> str:
    return "{" + ", ".join(f"[{str(v)!r}] = true" for v in values) + "}"


PRELUDE = f"""
local TERMINAL = {_lua_set(s for s in JobState if s.terminal)}
local BATCH_LIVE = {_lua_set(s for s in BatchState if not s.terminal and s is not BatchState.CANCELLING)}
local QUEUED, RUNNING = '{JobState.QUEUED}', '{JobState.RUNNING}'
local RUNNING_JOBS = '{keys.RUNNING}'
local JOB_PREFIX, QUEUED_PREFIX = '{keys.job("")}', '{keys.queued("")}'
local SUCCEEDED, FAILED, CANCELLED = '{JobState.SUCCEEDED}', '{JobState.FAILED}', '{JobState.CANCELLED}'
local B_VALIDATING, B_IN_PROGRESS = '{BatchState.VALIDATING}', '{BatchState.IN_PROGRESS}'
local B_FINALIZING = '{BatchState.FINALIZING}'
local B_COMPLETED, B_FAILED = '{BatchState.COMPLETED}', '{BatchState.FAILED}'
local B_COMPLETED_WITH_ERRORS = '{BatchState.COMPLETED_WITH_ERRORS}'
local B_CANCELLING, B_CANCELLED = '{BatchState.CANCELLING}', '{BatchState.CANCELLED}'

-- Whether a write comes from the job's current holder: its worker id and the attempt it claimed (the
-- fencing token; '' writes unfenced). A worker that was only slow finds its job taken and writes nothing.
local function holds(job_key, holder, attempt)
  if holder == '' then return true end
  local found = redis.call('HMGET', job_key, 'worker', 'attempts')
  return found[1] == holder and found[2] == attempt
end

-- The seq of the last event in a job's log (0 if none): entry ids are "<seq>-0".
local function last_seq(log_key)
  local last = redis.call('XREVRANGE', log_key, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  return tonumber(string.match(last[1][1], '^(%d+)-'))
end

-- Redis's clock, as a Unix time: the one clock of the queued jobs' index (keys.queued).
local function redis_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end

-- Index a job as queued on the broker list its message was pushed onto, or drop it from there.
local function index_queued(job_id, broker_list)
  if redis.call('EXISTS', JOB_PREFIX .. job_id) == 0 then return end  -- never leave a hash without its TTL
  redis.call('HSET', JOB_PREFIX .. job_id, 'broker_list', broker_list)
  redis.call('ZADD', QUEUED_PREFIX .. broker_list, redis_now(), job_id)
end

local function unindex_queued(job_key, job_id)
  local broker_list = redis.call('HGET', job_key, 'broker_list')
  if broker_list then redis.call('ZREM', QUEUED_PREFIX .. broker_list, job_id) end
end

-- Log an event under its seq and publish it to the job's followers.
local function append_event(log_key, channel, ttl, seq, event)
  redis.call('XADD', log_key, seq .. '-0', 'event', event)
  redis.call('EXPIRE', log_key, ttl)
  redis.call('PUBLISH', channel, event)
end

-- Queue the webhook of a job or batch that has just ended, if it asked for one: an outbox entry,
-- due now, that the webhook workers deliver (tasks/runtime/webhooks.py). Each job and batch ends
-- once, so its message id, 'msg_' and its id, is the event's own and stays the same on every retry.
local function queue_webhook(key, kind, event_type)
  local found = redis.call('HMGET', key, 'webhook', 'id')
  if not found[1] then return end
  local message_id = 'msg_' .. found[2]
  local entry = '{keys.webhook("")}' .. message_id
  local now = redis_now()
  redis.call('HSET', entry, 'id', message_id, 'url', found[1], 'kind', kind, 'subject', found[2],
             'type', event_type, 'timestamp', string.format('%.6f', now), 'attempts', 0, 'dispatch', 0)
  redis.call('EXPIRE', entry, {WEBHOOK_OUTBOX_TTL_S})
  redis.call('ZADD', '{keys.WEBHOOKS_DUE}', now, message_id)
end

-- A batch has reached an end state: its webhook, if it has one.
local function batch_ended(batch_key, status)
  queue_webhook(batch_key, 'batch', 'batch.' .. status)
end

local function batch_item_started(job_key)
  local batch_key = redis.call('HGET', job_key, 'batch_key')
  if not batch_key or redis.call('EXISTS', batch_key) == 0 then return end
  local started = redis.call('HINCRBY', batch_key, 'started', 1)
  local b = redis.call('HMGET', batch_key, 'total', 'status')
  if b[2] == B_IN_PROGRESS and b[1] and started >= tonumber(b[1]) then
    redis.call('HSET', batch_key, 'status', B_FINALIZING, 'finalizing_at', redis.call('HGET', job_key, 'started_at'))
  end
end

local function batch_item_ended(job_key, status, event)
  local item = redis.call('HMGET', job_key, 'batch_key', 'batch_results_key', 'batch_index', 'batch_custom_id',
                          'finished_at')
  if not item[1] or redis.call('EXISTS', item[1]) == 0 then return end
  local line = '{{"custom_id":' .. item[4] .. ',"index":' .. item[3] .. ',"end":' .. event .. '}}'
  redis.call('HSET', item[2], item[3], line)
  local counter = 'failed'
  if status == SUCCEEDED then counter = 'completed' elseif status == CANCELLED then counter = 'cancelled' end
  redis.call('HINCRBY', item[1], counter, 1)
  local ok, ended = pcall(cjson.decode, event)
  if ok and type(ended.result) == 'table' and type(ended.result.usage) == 'table' then
    redis.call('HINCRBY', item[1], 'prompt_tokens', tonumber(ended.result.usage.prompt_tokens) or 0)
    redis.call('HINCRBY', item[1], 'completion_tokens', tonumber(ended.result.usage.completion_tokens) or 0)
  end
  local b = redis.call('HMGET', item[1], 'total', 'completed', 'failed', 'cancelled', 'status', 'ttl_s')
  if b[1] and tonumber(b[2] or 0) + tonumber(b[3] or 0) + tonumber(b[4] or 0) >= tonumber(b[1]) then
    if BATCH_LIVE[b[5]] then  -- completed; with errors when any request did not succeed
      local ended = B_COMPLETED
      if tonumber(b[3] or 0) + tonumber(b[4] or 0) > 0 then ended = B_COMPLETED_WITH_ERRORS end
      redis.call('HSET', item[1], 'status', ended, 'completed_at', item[5])
      batch_ended(item[1], ended)
    elseif b[5] == B_CANCELLING then
      redis.call('HSET', item[1], 'status', B_CANCELLED, 'cancelled_at', item[5])
      batch_ended(item[1], B_CANCELLED)
    end
  end
  if b[6] then
    redis.call('EXPIRE', item[1], b[6])
    redis.call('EXPIRE', item[2], b[6])
  end
end

-- End a job: its fields (status, finished_at, ...: a flat list of names and values), its last event
-- under seq, its batch's counts and its webhook, in this one step.
local function end_job(job_key, log_key, channel, ttl, seq, fields, event)
  local id = redis.call('HGET', job_key, 'id')
  if id then
    redis.call('HDEL', RUNNING_JOBS, id)
    unindex_queued(job_key, id)
  end
  redis.call('HSET', job_key, unpack(fields))
  redis.call('EXPIRE', job_key, ttl)
  append_event(log_key, channel, ttl, seq, event)
  local status = redis.call('HGET', job_key, 'status')
  batch_item_ended(job_key, status, event)
  queue_webhook(job_key, 'job', 'job.' .. status)
end
"""


def script(body: str) -> str:
    """A script: the prelude, then its own body."""
    return PRELUDE + body
