"""The worker registry: which workers are alive, what each serves, and how busy it is.

A worker announces itself every few seconds (tasks/runtime/heartbeat.py calls `beat`); its entry
expires when it stops beating. Every reader (readiness, metrics, the model list, queue routing, the
takeover of a dead worker's jobs) asks this module, never the keys themselves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from tasks.store import keys

HEARTBEAT_INTERVAL_S = 5  # at most; a third of the heartbeat timeout when that is shorter
HEARTBEAT_TTL_S = 10  # a worker that has not beaten for this long is dead (HEARTBEAT_TIMEOUT_S's default)
SEEN_KEPT_S = 7 * 24 * 3600  # how long a queue's last heartbeat time is remembered


def beat_interval(timeout_s: float) -> float:
    """How often a worker beats for a heartbeat timeout: three beats may be lost before it is thought dead."""
    return min(HEARTBEAT_INTERVAL_S, timeout_s / 3)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker announces: its queues and model, the LoRA variants it serves, its load."""

    id: str
    queues: tuple[str, ...]
    model: str
    device: str
    compute_type: str
    loras: tuple[str, ...] = ()
    max_context: int | None = None
    created: int = 0  # when the model was prepared (Unix time), as OpenAI's model list shows it
    tokenizer: str | None = None  # the digest of its published tokenizer files (tasks/store/tokenizers.py)
    running: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth showing (e.g. thread choices)

    def serves(self, queue: str) -> bool:
        return queue in self.queues

    def to_view(self) -> dict[str, Any]:
        view = asdict(self)
        view["queues"], view["loras"] = list(self.queues), list(self.loras)
        return view

    def to_hash(self) -> dict[str, str]:
        return {name: json.dumps(value) for name, value in self.to_view().items()}

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> WorkerInfo:
        values = {name: json.loads(value) for name, value in data.items() if name in cls.__dataclass_fields__}
        values["queues"] = tuple(values.get("queues", ()))
        values["loras"] = tuple(values.get("loras", ()))
        return cls(**values)


# The live workers' heartbeat hashes: those whose entry in keys.WORKERS expires after ARGV[1] (now).
_LIVE = """
local beats = {}
for i, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do
  beats[i] = redis.call('HGETALL', ARGV[2] .. id)
end
return beats
"""


class WorkerRegistry:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._live = client.register_script(_LIVE)

    def beat(self, info: WorkerInfo, ttl_s: float = HEARTBEAT_TTL_S) -> None:
        """Announce the worker (alive for ttl_s more seconds), and forget workers that stopped beating."""
        now = time.time()
        ttl = int(max(1, ttl_s))
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.worker(info.id), mapping=info.to_hash())
            pipe.expire(keys.worker(info.id), ttl)
            pipe.zadd(keys.WORKERS, {info.id: now + ttl})
            pipe.zremrangebyscore(keys.WORKERS, "-inf", now)
            for queue in info.queues:
                pipe.set(keys.queue_seen(queue), repr(now), ex=SEEN_KEPT_S)
            pipe.execute()

    def remove(self, worker_id: str) -> None:
        """A worker that stops says so, rather than waiting for its entry to expire."""
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.worker(worker_id))
            pipe.zrem(keys.WORKERS, worker_id)
            pipe.execute()

    def live(self) -> list[WorkerInfo]:
        """Every live worker (one beats once its models are loaded), in id order: one round trip."""
        workers = []
        for beat in self._live(keys=[keys.WORKERS], args=[repr(time.time()), keys.worker("")]):
            try:
                workers.append(WorkerInfo.from_hash(dict(zip(beat[::2], beat[1::2], strict=True))))
            except (TypeError, ValueError):  # expired since, or an entry this version cannot read (another's)
                continue
        return sorted(workers, key=lambda w: w.id)

    def serving(self, queue: str) -> list[WorkerInfo]:
        return [worker for worker in self.live() if worker.serves(queue)]

    def is_alive(self, worker_id: str) -> bool:
        return bool(self.redis.exists(keys.worker(worker_id)))

    def alive(self, worker_ids: list[str]) -> set[str]:
        """Those of worker_ids whose heartbeat has not expired, in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in worker_ids:
                pipe.exists(keys.worker(worker_id))
            found = pipe.execute()
        return {worker_id for worker_id, exists in zip(worker_ids, found, strict=True) if exists}
