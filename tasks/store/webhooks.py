"""The webhook outbox: the events waiting to be delivered, and their attempts.

The step that ends a job or a batch also writes its webhook event here, in the same Lua script
(tasks/store/lua.py `queue_webhook`): a hash per event (keys.webhook) and its id in keys.WEBHOOKS_DUE,
scored by when its next attempt is due. No end can be missed, whichever path ends it (a worker, a
cancel, a takeover, a batch's last item), and nothing is lost while no webhook worker runs: the event
waits, due, until one does.

A webhook worker's sweeper `claim`s due events: each is leased (its due time moved lease_s ahead) and
its `dispatch` number raised, then handed to a Celery task carrying that number. A task whose number
is no longer the event's (the lease ran out and the event was handed out again) does nothing, so a
slow task and its successor do not both send. An attempt ends in `delivered` (the event is removed),
or `failed` (due again after its backoff, or given up after the last attempt). A worker that dies
mid-attempt leaves the event leased: it is due again when the lease runs out. Delivery is therefore
at least once, each attempt with the event's same message id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from tasks.store import keys
from tasks.store.lua import WEBHOOK_OUTBOX_TTL_S, script

# KEYS: due set. ARGV: lease_s, most to claim, entry key prefix. Returns [id, dispatch, id, dispatch, ...].
_CLAIM = script("""
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(due) do
  local entry = ARGV[3] .. id
  if redis.call('EXISTS', entry) == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    table.insert(claimed, id)
    table.insert(claimed, redis.call('HINCRBY', entry, 'dispatch', 1))
  end
end
return claimed
""")

# KEYS: entry, due set. ARGV: id, dispatch, max attempts, delay_s, ttl_s.
# A failed attempt: counted, then due again after delay_s, or given up after the last attempt (the
# event is removed). Returns the attempts so far, negated once given up; 0 if the event was handed
# out again meanwhile (its new task decides).
_FAILED = script("""
if redis.call('HGET', KEYS[1], 'dispatch') ~= ARGV[2] then return 0 end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return -attempts
end
local time = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(time[1]) + tonumber(time[2]) / 1000000 + tonumber(ARGV[4]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return attempts
""")


@dataclass(frozen=True)
class WebhookEvent:
    id: str  # the webhook-id header: "msg_" and the job's or batch's id
    url: str
    kind: str  # "job" or "batch"
    subject: str  # the job's or batch's id
    type: str  # job.succeeded, job.failed, job.cancelled, batch.completed, batch.failed, batch.cancelled
    timestamp: float  # when it happened (Redis's clock)
    attempts: int  # attempts made so far
    dispatch: int  # how many times it was handed to a task
    body: bytes | None  # the request body, once built (every attempt sends the same)

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> WebhookEvent:
        return cls(
            id=data["id"],
            url=data["url"],
            kind=data["kind"],
            subject=data["subject"],
            type=data["type"],
            timestamp=float(data["timestamp"]),
            attempts=int(data.get("attempts") or 0),
            dispatch=int(data.get("dispatch") or 0),
            body=data["body"].encode() if data.get("body") else None,
        )


class WebhookOutbox:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._claim = client.register_script(_CLAIM)
        self._failed = client.register_script(_FAILED)

    def claim(self, most: int, lease_s: float) -> list[tuple[str, int]]:
        """Lease up to `most` due events: (id, dispatch number) each."""
        if most <= 0:
            return []
        answer = self._claim(keys=[keys.WEBHOOKS_DUE], args=[lease_s, most, keys.webhook("")])
        return [(str(answer[i]), int(answer[i + 1])) for i in range(0, len(answer), 2)]

    def get(self, message_id: str) -> WebhookEvent | None:
        data = self.redis.hgetall(keys.webhook(message_id))
        return WebhookEvent.from_hash(data) if data else None

    def set_body(self, message_id: str, body: bytes) -> bytes:
        """Keep the body built for the first attempt, so every retry sends the same; returns the kept one."""
        name = keys.webhook(message_id)
        self.redis.hsetnx(name, "body", body.decode())
        kept = self.redis.hget(name, "body")
        return kept.encode() if kept else body

    def delivered(self, message_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.webhook(message_id))
            pipe.zrem(keys.WEBHOOKS_DUE, message_id)
            pipe.execute()

    def failed(self, event: WebhookEvent, max_attempts: int, delay_s: float) -> int:
        """Count a failed attempt: the attempts so far (due again after delay_s), negated if that was
        the last one (the event is removed), 0 if the event was handed out again meanwhile."""
        ttl_s = int(delay_s) + WEBHOOK_OUTBOX_TTL_S
        args: list[Any] = [event.id, event.dispatch, max_attempts, delay_s, ttl_s]
        return int(self._failed(keys=[keys.webhook(event.id), keys.WEBHOOKS_DUE], args=args))

    def give_up(self, message_id: str) -> None:
        """Drop an event that can never be delivered (its address is refused, its subject expired)."""
        self.delivered(message_id)

    def pending(self) -> int:
        """Events waiting for delivery (due, leased or waiting for a retry)."""
        return int(self.redis.zcard(keys.WEBHOOKS_DUE))
