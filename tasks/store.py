"""The job store: the only code that writes a job's state, its event log and its pub/sub events.

A job's events (text chunks, then one end event) are numbered from 1. Each is appended to the job's
stream under the id "<seq>-0" and published on its channel in one atomic script, so a reader that
subscribes first and then replays the stream misses nothing and can drop duplicates by seq. An
event whose seq is already logged is skipped (a redelivered job does not log its chunks twice), and
nothing is appended to a job that has already ended.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from genqueue.config import DEFAULTS
from tasks import keys
from tasks.states import JobState

CHUNK = "chunk"
END = "end"
TERMINAL_STATES = [s.value for s in JobState if s.terminal]

# Lua shared by the scripts below: the batch side of a batch item's state changes (tasks/batches.py).
# An item's job hash names its batch's keys (batch_key, batch_results_key), so every path that starts
# or ends a job keeps its batch's counts in the same atomic step, and a job that cannot end twice
# cannot be counted twice. Nothing happens for a job outside a batch, or whose batch has expired.
_BATCH_HOOKS = """
local function batch_item_started(job_key)
  local batch_key = redis.call('HGET', job_key, 'batch_key')
  if not batch_key or redis.call('EXISTS', batch_key) == 0 then return end
  local started = redis.call('HINCRBY', batch_key, 'started', 1)
  local b = redis.call('HMGET', batch_key, 'total', 'status')
  if b[2] == 'in_progress' and b[1] and started >= tonumber(b[1]) then
    redis.call('HSET', batch_key, 'status', 'finalizing', 'finalizing_at', redis.call('HGET', job_key, 'started_at'))
  end
end

local function batch_item_ended(job_key, status, event)
  local item = redis.call('HMGET', job_key, 'batch_key', 'batch_results_key', 'batch_index', 'batch_custom_id',
                          'finished_at')
  if not item[1] or redis.call('EXISTS', item[1]) == 0 then return end
  if event == '' then event = cjson.encode({type = 'end', status = status}) end
  local line = '{"custom_id":' .. item[4] .. ',"index":' .. item[3] .. ',"end":' .. event .. '}'
  redis.call('HSET', item[2], item[3], line)
  local counter = 'failed'
  if status == 'succeeded' then counter = 'completed' elseif status == 'cancelled' then counter = 'cancelled' end
  redis.call('HINCRBY', item[1], counter, 1)
  local ok, ended = pcall(cjson.decode, event)
  if ok and type(ended.result) == 'table' and type(ended.result.usage) == 'table' then
    redis.call('HINCRBY', item[1], 'prompt_tokens', tonumber(ended.result.usage.prompt_tokens) or 0)
    redis.call('HINCRBY', item[1], 'completion_tokens', tonumber(ended.result.usage.completion_tokens) or 0)
  end
  local b = redis.call('HMGET', item[1], 'total', 'completed', 'failed', 'cancelled', 'status', 'ttl_s')
  if b[1] and tonumber(b[2] or 0) + tonumber(b[3] or 0) + tonumber(b[4] or 0) >= tonumber(b[1]) then
    if b[5] == 'validating' or b[5] == 'in_progress' or b[5] == 'finalizing' then
      redis.call('HSET', item[1], 'status', 'completed', 'completed_at', item[5])
    elseif b[5] == 'cancelling' then
      redis.call('HSET', item[1], 'status', 'cancelled', 'cancelled_at', item[5])
    end
  end
  if b[6] then
    redis.call('EXPIRE', item[1], b[6])
    redis.call('EXPIRE', item[2], b[6])
  end
end
"""

# KEYS: job hash, log stream, channel. ARGV: ttl_s, seq (0: no event), event json, then field/value
# pairs for the job hash. Returns 1 if applied, 0 for an already-logged seq, -1 if the job has ended
# (or expired), in which case nothing is written.
_APPLY = (
    _BATCH_HOOKS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
for _, ended in ipairs(cjson.decode(ARGV[4])) do
  if status == ended then return -1 end
end
local seq = tonumber(ARGV[2])
if seq > 0 then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last > 0 and tonumber(string.match(last[1][1], '^(%d+)-')) >= seq then return 0 end
end
if #ARGV > 4 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
  local new_status = redis.call('HGET', KEYS[1], 'status')
  if new_status ~= status then
    if status == 'queued' and new_status == 'running' then batch_item_started(KEYS[1]) end
    for _, ended in ipairs(cjson.decode(ARGV[4])) do
      if new_status == ended then batch_item_ended(KEYS[1], new_status, ARGV[3]) end
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if seq > 0 then
  redis.call('XADD', KEYS[2], seq .. '-0', 'event', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[3])
end
return 1
"""
)


# KEYS: job hash, log stream, job channel. ARGV: ttl_s, now, cancel channel, terminal states json, job id.
# A queued job ends cancelled here and now (seq 1: it has no chunks); a running one is flagged and
# announced, and its worker stops it within a few tokens. Returns the job's status after the call,
# or nothing for an unknown job.
_CANCEL = (
    _BATCH_HOOKS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
for _, ended in ipairs(cjson.decode(ARGV[4])) do
  if status == ended then return status end
end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if status == 'queued' then
  local event = cjson.encode({seq = 1, type = 'end', status = 'cancelled'})
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
  redis.call('XADD', KEYS[2], '1-0', 'event', event)
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('PUBLISH', KEYS[3], event)
  batch_item_ended(KEYS[1], 'cancelled', event)
  status = 'cancelled'
else
  redis.call('PUBLISH', ARGV[3], ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return status
"""
)


# KEYS: job hash, log stream, job channel. ARGV: ttl_s, now, terminal states json, this worker's id,
# the heartbeat key prefix, max attempts, the exhausted error json.
# Claims a delivered job for this worker. A job running on another worker whose heartbeat is alive is
# a duplicate delivery ('busy'); one whose worker is gone is taken over. Past max attempts the job
# fails instead ('exhausted'). Returns 'claimed', 'busy', 'exhausted', the ended status, or nil.
_CLAIM = (
    _BATCH_HOOKS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
for _, ended in ipairs(cjson.decode(ARGV[3])) do
  if status == ended then return status end
end
if status == 'running' then
  local holder = redis.call('HGET', KEYS[1], 'worker')
  if holder and holder ~= ARGV[4] and redis.call('EXISTS', ARGV[5] .. holder) == 1 then return 'busy' end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
if attempts > tonumber(ARGV[6]) then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local seq = 1
  if #last > 0 then seq = tonumber(string.match(last[1][1], '^(%d+)-')) + 1 end
  local event = cjson.encode({seq = seq, type = 'end', status = 'failed', error = cjson.decode(ARGV[7])})
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[2], 'error', ARGV[7])
  redis.call('XADD', KEYS[2], seq .. '-0', 'event', event)
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('PUBLISH', KEYS[3], event)
  batch_item_ended(KEYS[1], 'failed', event)
  return 'exhausted'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[4])
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
  batch_item_started(KEYS[1])
end
return 'claimed'
"""
)


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class JobRecord:
    id: str
    status: JobState
    queue: str
    request: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    cancel_requested: bool = False
    owner: str = ""  # the API key's owner name; empty for an open API

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> JobRecord:
        def number(name: str) -> float | None:
            return float(data[name]) if data.get(name) else None

        def document(name: str) -> Any:
            return json.loads(data[name]) if data.get(name) else None

        return cls(
            id=data["id"],
            status=JobState(data["status"]),
            queue=data.get("queue", ""),
            request=document("request") or {},
            created_at=float(data["created_at"]),
            started_at=number("started_at"),
            finished_at=number("finished_at"),
            result=document("result"),
            error=document("error"),
            attempts=int(data.get("attempts", 0)),
            cancel_requested=data.get("cancel_requested") == "1",
            owner=data.get("owner", ""),
        )


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULTS["JOB_TTL_S"]):
        self.redis = client
        self.ttl_s = int(ttl_s)
        self._apply = client.register_script(_APPLY)
        self._cancel = client.register_script(_CANCEL)
        self._claim = client.register_script(_CLAIM)
        # Subscriptions draw from a pool of their own: redis-py disconnects a pubsub's connection when
        # it closes, and the next command that drew it from the shared pool would pay a reconnect
        # (about 1 ms here, on the path from a job's end to its waiting reader).
        pool = client.connection_pool
        self._subscriber = redis.Redis(
            connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs)
        )

    @classmethod
    def from_url(cls, url: str, ttl_s: int = DEFAULTS["JOB_TTL_S"]) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30), ttl_s)

    # -- writers -------------------------------------------------------------------------------

    def create(
        self,
        job_id: str,
        request: dict[str, Any],
        queue: str,
        owner: str | None = None,
        *,
        extra: dict[str, str] | None = None,
        ttl_s: int | None = None,
        pipe: redis.client.Pipeline | None = None,
    ) -> JobRecord:
        """Write a queued job's record. `extra` adds fields (a batch item's batch keys and index),
        `ttl_s` overrides the store's TTL, and with `pipe` the writes join that pipeline."""
        record = JobRecord(
            id=job_id, status=JobState.QUEUED, queue=queue, request=request, created_at=now(), owner=owner or ""
        )
        fields = {
            "id": job_id,
            "status": record.status.value,
            "queue": queue,
            "request": json.dumps(request),
            "created_at": repr(record.created_at),
            "attempts": 0,
            "owner": record.owner,
            **(extra or {}),
        }
        own_pipe = pipe is None
        pipe = self.redis.pipeline() if own_pipe else pipe
        pipe.hset(keys.job(job_id), mapping=fields)
        pipe.expire(keys.job(job_id), self.ttl_s if ttl_s is None else int(ttl_s))
        if own_pipe:
            with pipe:
                pipe.execute()
        return record

    def delete(self, job_id: str, pipe: redis.client.Pipeline | None = None) -> None:
        """Remove a job that was never enqueued (its enqueue failed, or its batch was refused)."""
        (pipe or self.redis).delete(keys.job(job_id), keys.job_log(job_id))

    def claim(self, job_id: str, worker_id: str, max_attempts: int) -> str | None:
        """Take a delivered job for worker_id: 'claimed' (run it), 'busy' (a live worker runs it),
        'exhausted' (it failed: too many attempts), an ended job's status, or None if unknown."""
        error = {
            "code": "attempts_exhausted",
            "message": f"the job was started {max_attempts} times and its worker was lost each time",
        }
        args = [
            self.ttl_s,
            repr(now()),
            json.dumps(TERMINAL_STATES),
            worker_id,
            keys.worker(""),
            max_attempts,
            json.dumps(error),
        ]
        return self._claim(keys=[keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id)], args=args)

    def append_chunk(self, job_id: str, seq: int, text: str) -> bool:
        """Log and publish the seq-th chunk; False if it was logged already or the job has ended."""
        return self._run(job_id, seq, {"seq": seq, "type": CHUNK, "text": text}, {}) == 1

    def append_chunks(self, chunks: Sequence[tuple[str, int, str]]) -> list[int]:
        """Log and publish several chunks, (job id, seq, text) each, in one round trip and in order.

        Each answer is append_chunk's script's: 1 logged, 0 logged already, -1 the job has ended."""
        if not chunks:
            return []
        terminal = json.dumps(TERMINAL_STATES)
        for attempt in range(2):
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, seq, text in chunks:
                    event = json.dumps({"seq": seq, "type": CHUNK, "text": text})
                    job_keys = (keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id))
                    pipe.evalsha(self._apply.sha, len(job_keys), *job_keys, self.ttl_s, seq, event, terminal)
                answers = pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(a, redis.exceptions.NoScriptError) for a in answers):
                # A restarted Redis forgot the script: load it and send again (a logged seq is skipped).
                self.redis.script_load(_APPLY)
                continue
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
            return [int(answer) for answer in answers]
        raise AssertionError("unreachable")

    def finish(
        self,
        job_id: str,
        seq: int,
        status: JobState,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """End the job with its last event; False if it had already ended (the first end wins)."""
        assert status.terminal
        fields = {"status": status.value, "finished_at": repr(now())}
        if result is not None:
            fields["result"] = json.dumps(result)
        if error is not None:
            fields["error"] = json.dumps(error)
        event = {"seq": seq, "type": END, "status": status.value, "result": result, "error": error}
        return self._run(job_id, seq, event, fields) == 1

    def cancel(self, job_id: str) -> JobState | None:
        """Cancel a job: a queued one ends now, a running one is flagged and announced to workers.

        Returns the job's state after the call (an ended job keeps its state), None if unknown."""
        status = self._cancel(
            keys=[keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id)],
            args=[self.ttl_s, repr(now()), keys.CANCEL_CHANNEL, json.dumps(TERMINAL_STATES), job_id],
        )
        return JobState(status) if status else None

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel each job as cancel() does, in one pipelined round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                self._cancel(
                    keys=[keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id)],
                    args=[self.ttl_s, repr(now()), keys.CANCEL_CHANNEL, json.dumps(TERMINAL_STATES), job_id],
                    client=pipe,
                )
            pipe.execute()

    def queue_served(self, queue: str) -> bool:
        """Whether a live worker (one whose heartbeat has not expired) consumes the queue."""
        return bool(self.redis.exists(keys.queue_served(queue)))

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(keys.job(job_id), "cancel_requested") == "1"

    def _run(self, job_id: str, seq: int, event: dict | None, fields: dict[str, Any]) -> int:
        args: list[Any] = [self.ttl_s, seq, json.dumps(event) if event else "", json.dumps(TERMINAL_STATES)]
        for name, value in fields.items():
            args += [name, value]
        return int(self._apply(keys=[keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id)], args=args))

    def claim_idempotency_key(self, owner: str, key_digest: str, body_digest: str, job_id: str) -> dict | None:
        """Bind an Idempotency-Key to job_id, unless it is bound already: then return that binding
        ({"job_id", "body"}). Kept as long as the job."""
        binding = json.dumps({"job_id": job_id, "body": body_digest})
        name = keys.idempotency(owner, key_digest)
        if self.redis.set(name, binding, nx=True, ex=self.ttl_s):
            return None
        existing = self.redis.get(name)
        return json.loads(existing) if existing else None

    def release_idempotency_key(self, owner: str, key_digest: str) -> None:
        self.redis.delete(keys.idempotency(owner, key_digest))

    def queue_depth(self, queue: str) -> int:
        """Jobs waiting in a queue (not yet taken by a worker)."""
        return int(self.redis.llen(keys.broker_queue(queue)))

    # -- readers -------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        data = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(data) if data else None

    def events(self, job_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """The logged events with seq > after_seq, in order."""
        entries = self.redis.xrange(keys.job_log(job_id), min=f"({after_seq}-0" if after_seq else "-")
        return [json.loads(fields["event"]) for _id, fields in entries]

    def follow(self, job_id: str, after_seq: int = 0, poll_s: float = 1.0) -> Iterator[dict[str, Any] | None]:
        """Every event with seq > after_seq: first those logged, then live ones, until the end event.

        Yields None every poll_s seconds with nothing new, so a caller can send keep-alives or give
        up. Subscribing before replaying the log means no event falls between the two.
        """
        pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.job_channel(job_id))
            last = after_seq
            for event in self.events(job_id, after_seq):
                last = event["seq"]
                yield event
                if event["type"] == END:
                    return
            quiet_since = time.monotonic()
            while True:
                message = pubsub.get_message(timeout=poll_s)
                if message is None:
                    if time.monotonic() - quiet_since < poll_s:
                        continue  # a subscribe confirmation, not a quiet period
                    if self.get(job_id) is None:  # expired while we waited: nothing more will come
                        return
                    quiet_since = time.monotonic()
                    yield None
                    continue
                quiet_since = time.monotonic()
                event = json.loads(message["data"])
                if event["seq"] <= last:
                    continue
                if event["seq"] > last + 1:  # missed something (cannot happen while subscribed): replay
                    for missed in self.events(job_id, last):
                        last = missed["seq"]
                        yield missed
                        if missed["type"] == END:
                            return
                    continue
                last = event["seq"]
                yield event
                if event["type"] == END:
                    return
        finally:
            pubsub.close()
