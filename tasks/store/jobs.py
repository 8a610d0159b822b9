"""The job store: the only code that writes a job's state, its event log and its pub/sub events.

A job's events (text chunks, then one end event) are numbered from 1. Each is appended to the job's
stream under the id "<seq>-0" and published on its channel in one atomic script, so a reader that
subscribes first and then replays the stream misses nothing and can drop duplicates by seq (see
tasks/store/followers.py). An event whose seq is already logged is skipped (a redelivered job does
not log its chunks twice), and nothing is appended to a job that has already ended.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from config import DEFAULTS
from tasks.store import keys, quotas
from tasks.store.lua import script
from tasks.store.metrics import JOBS, counter_field
from tasks.store.quotas import NO_LIMITS, Limits, Refusal, limit_args
from tasks.store.states import JobState

CHUNK = "chunk"
END = "end"

LIST_CHUNK = 100  # records read per round trip while listing
LISTED_TTL_FACTOR = 2  # an owner's list is kept this many TTLs (a record lives a TTL after its last change)
# What a listed job's view needs (tasks/store/views.py), not its request: a page stays small.
LISTED_FIELDS = (
    "id",
    "status",
    "queue",
    "created_at",
    "started_at",
    "finished_at",
    "result",
    "error",
    "owner",
    "metadata",
)

# KEYS: job hash, log stream, channel, token ids. ARGV: ttl_s, seq (0: no event, -1: the next one),
# event json (starting {"seq": -1, for the next seq), the
# writing worker and its attempt ('' for an unfenced write), the token ids the event adds
# (comma-separated, each followed by a comma), then field/value pairs for the job hash. Returns 1 if
# applied, 0 for an already-logged seq, -1 if the job has ended (or expired), -2 if another attempt
# holds the job now; nothing is written unless 1.
_APPLY = script("""
local status = redis.call('HGET', KEYS[1], 'status')
if not status or TERMINAL[status] then return -1 end
if not holds(KEYS[1], ARGV[4], ARGV[5]) then return -2 end
local seq, event = tonumber(ARGV[2]), ARGV[3]
if seq < 0 then  -- the next seq, whatever the log holds (an end written after a failure)
  seq = last_seq(KEYS[2]) + 1
  event = string.gsub(event, '^{"seq": %-1,', '{"seq": ' .. seq .. ',', 1)
end
if seq > 0 and last_seq(KEYS[2]) >= seq then return 0 end
if ARGV[6] ~= '' then
  redis.call('APPEND', KEYS[4], ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[1])
end
local fields = {unpack(ARGV, 7)}
local new_status = status
for i = 1, #fields, 2 do
  if fields[i] == 'status' then new_status = fields[i + 1] end
end
if TERMINAL[new_status] then
  end_job(KEYS[1], KEYS[2], KEYS[3], ARGV[1], seq, fields, event)
  return 1
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if status == QUEUED and new_status == RUNNING then
  unindex_queued(KEYS[1], redis.call('HGET', KEYS[1], 'id'))
  batch_item_started(KEYS[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if seq > 0 then append_event(KEYS[2], KEYS[3], ARGV[1], seq, event) end
return 1
""")

# KEYS: job hash, log stream, job channel. ARGV: ttl_s, now, cancel channel, job id.
# A queued job ends cancelled here and now (seq 1: it has no chunks); a running one is flagged and
# announced, and its worker stops it within a few tokens. Returns the job's status after the call,
# or nothing for an unknown job.
_CANCEL = script("""
local status = redis.call('HGET', KEYS[1], 'status')
if not status or TERMINAL[status] then return status end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
if status ~= QUEUED then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return status
end
local event = cjson.encode({seq = 1, type = 'end', status = CANCELLED})
end_job(KEYS[1], KEYS[2], KEYS[3], ARGV[1], 1, {'status', CANCELLED, 'finished_at', ARGV[2]}, event)
return CANCELLED
""")

# KEYS: job hash, log stream, job channel. ARGV: ttl_s, now, this worker's id, the heartbeat key
# prefix, max attempts, the exhausted error json, and for a takeover the holder it saw (nil: any).
# Claims a job for this worker: delivered by the broker, or taken over by the recovery sweep. A job
# running on another worker whose heartbeat is alive is a duplicate delivery ('busy'); one whose
# worker is gone (or that was handed back) is taken over. Each claim adds an attempt, the fencing
# token of every later write (`holds`); past max attempts (hand-backs not counted) the job fails
# instead ('exhausted'). Returns {'claimed', attempt}, or {'busy' | 'exhausted' | the ended status}.
_CLAIM = script("""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {} end
if TERMINAL[status] then return {status} end
local holder = redis.call('HGET', KEYS[1], 'worker')
if ARGV[7] and (status ~= RUNNING or (holder or '') ~= ARGV[7]) then return {'busy'} end
if status == RUNNING and holder and holder ~= '' and holder ~= ARGV[3]
   and redis.call('EXISTS', ARGV[4] .. holder) == 1 then return {'busy'} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
local handed_back = tonumber(redis.call('HGET', KEYS[1], 'handed_back') or 0)
if attempts - handed_back > tonumber(ARGV[5]) then
  local seq = last_seq(KEYS[2]) + 1
  local event = cjson.encode({seq = seq, type = 'end', status = FAILED, error = cjson.decode(ARGV[6])})
  end_job(KEYS[1], KEYS[2], KEYS[3], ARGV[1], seq, {'status', FAILED, 'finished_at', ARGV[2], 'error', ARGV[6]}, event)
  return {'exhausted'}
end
redis.call('HSET', KEYS[1], 'status', RUNNING, 'worker', ARGV[3])
redis.call('HSET', RUNNING_JOBS, redis.call('HGET', KEYS[1], 'id'), ARGV[3])
if status == QUEUED then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
  unindex_queued(KEYS[1], redis.call('HGET', KEYS[1], 'id'))
  batch_item_started(KEYS[1])
end
return {'claimed', attempts}
""")

# KEYS: job hash. ARGV: the holder, its attempt. A worker that stops hands a running job back: no
# holder, so the recovery sweep of a live worker takes it over at once and goes on from its logged
# tokens; the hand-back does not count as a lost attempt. Returns 1, or 0 if it was not the holder's.
_RELEASE = script("""
if redis.call('HGET', KEYS[1], 'status') ~= RUNNING or not holds(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'worker', '')
redis.call('HINCRBY', KEYS[1], 'handed_back', 1)
redis.call('HSET', RUNNING_JOBS, redis.call('HGET', KEYS[1], 'id'), '')
return 1
""")

# KEYS: job hash, the queue's broker list, the owner's listing, the owner's live jobs, the
# Idempotency-Key's binding (the job hash again when there is none), the queue's last-seen time.
# ARGV: ttl_s, now, listing kept_s, job id, broker message, binding json ('' for none), the limits
# (tasks/store/quotas.py limit_args), then the job hash's field/value pairs.
# An Idempotency-Key bound to a job that still exists returns {'bound', binding}; a limit passed,
# {'refused', ...}; else the job is written, listed, counted live, bound and queued: {'created'}.
_SUBMIT = script(
    quotas.LUA
    + f"""
local ttl, created_at, kept_s, job_id = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if ARGV[6] ~= '' then
  local bound = redis.call('GET', KEYS[5])
  if bound and redis.call('EXISTS', JOB_PREFIX .. cjson.decode(bound).job_id) == 1 then return {{'bound', bound}} end
end
local limits = read_limits(7)
local refusal = memory_room(limits.memory_high_water) or worker_seen(KEYS[6], limits.seen_since)
  or within('queue_depth', redis.call('LLEN', KEYS[2]), 1, limits.queue_depth)
if refusal then return refusal end
if limits.owner_queued > 0 or limits.owner_running > 0 then
  local queued, running = live_jobs(KEYS[4])
  refusal = within('owner_queued', queued, 1, limits.owner_queued)
    or within('owner_running', running, 1, limits.owner_running)
  if refusal then return refusal end
end
redis.call('HSET', KEYS[1], unpack(ARGV, {7 + quotas.QUOTA_ARGS}))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('LPUSH', KEYS[2], ARGV[5])
index_queued(job_id, KEYS[2])
redis.call('SADD', KEYS[4], job_id)
redis.call('EXPIRE', KEYS[4], ttl)
redis.call('ZADD', KEYS[3], created_at, job_id)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', created_at - tonumber(kept_s))
redis.call('EXPIRE', KEYS[3], kept_s)
if ARGV[6] ~= '' then redis.call('SET', KEYS[5], ARGV[6], 'EX', ttl) end
redis.call('HINCRBYFLOAT', KEYS[7], '{counter_field(JOBS, JobState.QUEUED.value)}', 1)
return {{'created'}}
"""
)


def now() -> float:
    return time.time()


class Chunk(NamedTuple):
    """A text chunk to log: its job and seq, the token ids it adds, and who writes it (its holder and
    attempt: a fenced write; '' writes unfenced)."""

    job_id: str
    seq: int
    text: str
    ids: Sequence[int] = ()
    holder: str = ""
    attempt: int = 0


class Progress(NamedTuple):
    """What a job's log holds: its last seq, its text, and the token ids that text came from."""

    seq: int
    text: str
    ids: list[int]


def _apply_keys(job_id: str) -> list[str]:
    """The keys _APPLY writes: the job's hash, log, channel and token ids."""
    return [keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id), keys.job_tokens(job_id)]


def _ids_field(ids: Sequence[int]) -> str:
    return "".join(f"{i}," for i in ids)


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
    metadata: dict[str, str] = field(default_factory=dict)  # the caller's labels, returned with the job

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
            metadata=document("metadata") or {},
        )


class Submitted(NamedTuple):
    """What JobStore.submit did: created `record`, or found the job an Idempotency-Key is `bound` to
    ({"job_id", "body"}), or was refused by a limit."""

    record: JobRecord | None = None
    bound: dict[str, str] | None = None
    refusal: Refusal | None = None


def _new_record(
    job_id: str,
    request: dict[str, Any],
    queue: str,
    owner: str | None,
    extra: dict[str, str] | None,
    webhook: str | None,
    metadata: Mapping[str, str] | None,
) -> tuple[JobRecord, list[str]]:
    """A new queued job and its hash's fields, as a flat name/value list. A job with a `webhook` has
    its end delivered there; `metadata` (the caller's labels) is kept with it."""
    record = JobRecord(
        id=job_id,
        status=JobState.QUEUED,
        queue=queue,
        request=request,
        created_at=now(),
        owner=owner or "",
        metadata=dict(metadata or {}),
    )
    fields = {
        "id": job_id,
        "status": record.status.value,
        "queue": queue,
        "request": json.dumps(request),
        "created_at": repr(record.created_at),
        "attempts": "0",
        "owner": record.owner,
        **(extra or {}),
        **({"webhook": webhook} if webhook else {}),
        **({"metadata": json.dumps(record.metadata)} if record.metadata else {}),
    }
    return record, [item for pair in fields.items() for item in pair]


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULTS["JOB_TTL_S"]):
        self.redis = client
        self.ttl_s = int(ttl_s)
        self._apply = client.register_script(_APPLY)
        self._cancel = client.register_script(_CANCEL)
        self._claim = client.register_script(_CLAIM)
        self._submit = client.register_script(_SUBMIT)
        self._release = client.register_script(_RELEASE)

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
        webhook: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> JobRecord:
        """Write a queued job's record without queueing it: a batch item, queued with its batch
        (tasks/store/batches.py). `extra` adds fields (the item's batch keys and index), `ttl_s`
        overrides the store's TTL, and with `pipe` the writes join that pipeline."""
        record, fields = _new_record(job_id, request, queue, owner, extra, webhook, metadata)
        own_pipe = pipe is None
        pipe = self.redis.pipeline() if own_pipe else pipe
        pipe.hset(keys.job(job_id), mapping=dict(zip(fields[::2], fields[1::2], strict=True)))
        pipe.expire(keys.job(job_id), self.ttl_s if ttl_s is None else int(ttl_s))
        if own_pipe:
            with pipe:
                pipe.execute()
        return record

    def submit(
        self,
        job_id: str,
        request: dict[str, Any],
        queue: str,
        owner: str,
        message: str,
        *,
        limits: Limits = NO_LIMITS,
        idempotency: tuple[str, str] | None = None,
        webhook: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Submitted:
        """Check the limits, then write the job, list it under its owner, bind its Idempotency-Key
        (`idempotency`: the key's digest and the request's, see api/service/jobs.py) and push its
        broker `message` (tasks/runtime/app.py task_message) onto the queue's list, and count it in the
        jobs metric, in one atomic step: a job is stored if and only if it is queued, and a bound key
        always names a job that exists.
        Returns the new job, or the binding its key already had, or the limit that refused it."""
        record, fields = _new_record(job_id, request, queue, owner, None, webhook, metadata)
        key_digest, body_digest = idempotency or ("", "")
        binding = json.dumps({"job_id": job_id, "body": body_digest}) if idempotency else ""
        reply = self._submit(
            keys=[
                keys.job(job_id),
                keys.broker_queue(queue),
                keys.owner_jobs(record.owner),
                keys.owner_live_jobs(record.owner),
                keys.idempotency(record.owner, key_digest) if idempotency else keys.job(job_id),
                keys.queue_seen(queue),
                keys.METRICS_COUNTERS,
            ],
            args=[
                self.ttl_s,
                repr(record.created_at),
                LISTED_TTL_FACTOR * self.ttl_s,
                job_id,
                message,
                binding,
                *limit_args(limits),
                *fields,
            ],
        )
        if reply[0] == "bound":
            return Submitted(bound=json.loads(reply[1]))
        if reply[0] == "refused":
            return Submitted(refusal=Refusal.from_reply(reply))
        return Submitted(record=record)

    def delete(self, job_id: str, pipe: redis.client.Pipeline | None = None) -> None:
        """Remove a job that was never enqueued (its enqueue failed, or its batch was refused)."""
        (pipe or self.redis).delete(keys.job(job_id), keys.job_log(job_id), keys.job_tokens(job_id))

    def claim(self, job_id: str, worker_id: str, max_attempts: int) -> str | None:
        """Take a delivered job for worker_id: 'claimed' (run it), 'busy' (a live worker runs it),
        'exhausted' (it failed: too many attempts), an ended job's status, or None if unknown."""
        return self.take(job_id, worker_id, max_attempts)[0]

    def take(self, job_id: str, worker_id: str, max_attempts: int, holder: str | None = None) -> tuple[str | None, int]:
        """claim(), and the attempt claimed (0 unless 'claimed'): the fencing token of the job's
        writes. With `holder`, a takeover: only a running job still held by that (lost) holder."""
        error = {
            "code": "attempts_exhausted",
            "message": f"the job was started {max_attempts} times and its worker was lost each time",
        }
        args = [
            self.ttl_s,
            repr(now()),
            worker_id,
            keys.worker(""),
            max_attempts,
            json.dumps(error),
            *([] if holder is None else [holder]),
        ]
        answer = self._claim(keys=[keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id)], args=args)
        outcome = answer[0] if answer else None
        return outcome, int(answer[1]) if len(answer) > 1 else 0

    def release(self, job_id: str, holder: str, attempt: int) -> bool:
        """Hand a running job back (its worker stops): a live worker's recovery sweep takes it over
        and goes on from its logged tokens. False if holder no longer held it."""
        return bool(self._release(keys=[keys.job(job_id)], args=[holder, attempt]))

    def running(self) -> dict[str, str]:
        """The running jobs and their holders ('' for a job handed back)."""
        return self.redis.hgetall(keys.RUNNING)

    def queue_of(self, job_id: str) -> str | None:
        """The queue the job was sent to (None for an unknown job)."""
        return self.redis.hget(keys.job(job_id), "queue")

    def forget_running(self, job_id: str) -> None:
        """Drop an entry of the running jobs whose record has expired."""
        self.redis.hdel(keys.RUNNING, job_id)

    def progress(self, job_id: str) -> Progress:
        """The job's logged chunks: the seq to go on after, their text, and their token ids."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(keys.job_log(job_id))
            pipe.get(keys.job_tokens(job_id))
            entries, ids = pipe.execute()
        events = _decoded(entries)
        text = "".join(event.get("text", "") for event in events if event.get("type") == CHUNK)
        seq = events[-1]["seq"] if events else 0
        return Progress(seq, text, [int(i) for i in (ids or "").split(",") if i])

    def append_chunks(self, chunks: Sequence[Chunk | tuple[str, int, str]]) -> list[int]:
        """Log and publish several chunks (Chunk, or (job id, seq, text)) in one round trip and in order.

        Each answer is 1 logged, 0 logged already, -1 the job has ended, -2 another attempt holds it
        (nothing written unless 1)."""
        if not chunks:
            return []
        for attempt in range(2):
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, seq, text, ids, holder, held in (Chunk(*c) for c in chunks):
                    event = json.dumps({"seq": seq, "type": CHUNK, "text": text})
                    job_keys = _apply_keys(job_id)
                    args = (self.ttl_s, seq, event, holder, held, _ids_field(ids))
                    pipe.evalsha(self._apply.sha, len(job_keys), *job_keys, *args)
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
        seq: int | None,
        status: JobState,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        holder: str = "",
        attempt: int = 0,
    ) -> bool:
        """End the job with its last event (seq None: after whatever its log holds); False if it had
        already ended (the first end wins), or if `holder` (with its `attempt`) no longer holds it."""
        seq = -1 if seq is None else seq
        assert status.terminal
        fields = {"status": status.value, "finished_at": repr(now())}
        if result is not None:
            fields["result"] = json.dumps(result)
        if error is not None:
            fields["error"] = json.dumps(error)
        event = {"seq": seq, "type": END, "status": status.value, "result": result, "error": error}
        return self._run(job_id, seq, event, fields, holder, attempt) == 1

    def cancel(self, job_id: str) -> JobState | None:
        """Cancel a job: a queued one ends now, a running one is flagged and announced to workers.

        Returns the job's state after the call (an ended job keeps its state), None if unknown."""
        status = self._cancel(
            keys=[keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id)],
            args=[self.ttl_s, repr(now()), keys.CANCEL_CHANNEL, job_id],
        )
        return JobState(status) if status else None

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel each job as cancel() does, in one pipelined round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                self._cancel(
                    keys=[keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id)],
                    args=[self.ttl_s, repr(now()), keys.CANCEL_CHANNEL, job_id],
                    client=pipe,
                )
            pipe.execute()

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(keys.job(job_id), "cancel_requested") == "1"

    def _run(
        self, job_id: str, seq: int, event: dict | None, fields: dict[str, Any], holder: str = "", attempt: int = 0
    ) -> int:
        args: list[Any] = [self.ttl_s, seq, json.dumps(event) if event else "", holder, attempt, ""]
        for name, value in fields.items():
            args += [name, value]
        return int(self._apply(keys=_apply_keys(job_id), args=args))

    def queue_depth(self, queue: str) -> int:
        """Jobs waiting in a queue (not yet taken by a worker)."""
        return int(self.redis.llen(keys.broker_queue(queue)))

    # -- readers -------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        data = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(data) if data else None

    def list(
        self, owner: str, limit: int, after: str | None = None, status: JobState | None = None
    ) -> tuple[list[JobRecord], bool]:
        """The jobs owner submitted (batch items are listed by list_batch_items), newest first: up to
        `limit` after the job `after`, with `status` if given, and whether more follow. Raises
        KeyError for an `after` that is not in the owner's list."""
        listing = keys.owner_jobs(owner)
        bound = "+inf"
        if after:
            score = self.redis.zscore(listing, after)
            if score is None:
                raise KeyError(after)
            bound = f"({score!r}"  # older than `after`: new jobs at the top do not shift the pages

        def chunks() -> Iterator[list[str]]:
            nonlocal bound
            while True:
                entries = self.redis.zrevrangebyscore(listing, bound, "-inf", start=0, num=LIST_CHUNK, withscores=True)
                if not entries:
                    return
                yield [job_id for job_id, _score in entries]
                bound = f"({entries[-1][1]!r}"

        found, has_more, expired = self._collect(chunks(), limit, status)
        if expired:
            self.redis.zrem(listing, *expired)
        return found, has_more

    def list_batch_items(
        self, batch_id: str, total: int, limit: int, after: str | None = None, status: JobState | None = None
    ) -> tuple[list[JobRecord], bool]:
        """A batch's items as list() gives jobs: newest (highest index) first. Raises KeyError for an
        `after` that is not one of the batch's items."""
        end = total
        if after:
            prefix, _, index = after.rpartition("-")
            if prefix != batch_id or not index.isdigit() or int(index) >= total:
                raise KeyError(after)
            end = int(index)

        def chunks() -> Iterator[list[str]]:
            for high in range(end, 0, -LIST_CHUNK):
                yield [keys.batch_item(batch_id, i) for i in range(high - 1, max(0, high - LIST_CHUNK) - 1, -1)]

        found, has_more, _expired = self._collect(chunks(), limit, status)
        return found, has_more

    def _collect(
        self, chunks: Iterable[list[str]], limit: int, status: JobState | None
    ) -> tuple[list[JobRecord], bool, list[str]]:
        """Read the records of ids, a chunk per round trip, until limit + 1 match status: (the first
        `limit`, whether more match, the ids whose records have expired)."""
        found: list[JobRecord] = []
        expired: list[str] = []
        for ids in chunks:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(keys.job(job_id), LISTED_FIELDS)
                replies = pipe.execute()
            for job_id, values in zip(ids, replies, strict=True):
                if values[0] is None:
                    expired.append(job_id)
                    continue
                fields = {name: value for name, value in zip(LISTED_FIELDS, values, strict=True) if value is not None}
                record = JobRecord.from_hash(fields)
                if status is None or record.status is status:
                    found.append(record)
                    if len(found) > limit:
                        return found[:limit], True, expired
        return found, False, expired

    def events(self, job_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """The logged events with seq > after_seq, in order."""
        return _decoded(self.redis.xrange(keys.job_log(job_id), min=f"({after_seq}-0" if after_seq else "-"))

    def status(self, job_id: str) -> JobState | None:
        """The job's state; None for an unknown or expired job."""
        status = self.redis.hget(keys.job(job_id), "status")
        return JobState(status) if status else None

    def replay(self, job_id: str, after_seq: int = 0) -> Replay:
        """In one round trip: the logged events with seq > after_seq, the job's state and its last logged
        event (what a follower needs to resume; tasks/store/followers.py)."""
        log = keys.job_log(job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(log, min=f"({after_seq}-0" if after_seq else "-")
            pipe.hget(keys.job(job_id), "status")
            pipe.xrevrange(log, count=1)
            entries, status, last = pipe.execute()
        tail = _decoded(last)
        return Replay(_decoded(entries), JobState(status) if status else None, tail[0] if tail else None)


class Replay(NamedTuple):
    events: list[dict[str, Any]]
    status: JobState | None  # None: unknown or expired
    last: dict[str, Any] | None  # the last logged event, whatever after_seq was


def _decoded(entries: list) -> list[dict[str, Any]]:
    return [json.loads(fields["event"]) for _id, fields in entries]
