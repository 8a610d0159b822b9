"""Room left in Redis: new work is refused (503) past a high-water mark of Redis's maxmemory, so the
jobs already accepted keep room to write their chunks and ends. With `maxmemory-policy noeviction`
(the compose stack's), a Redis that is full refuses writes rather than evicting queued jobs; this
keeps the API from ever getting there on new work."""

from __future__ import annotations

import redis

from api.errors import ApiError

RETRY_AFTER_S = 30


def store_full(detail: str) -> ApiError:
    return ApiError(
        503,
        "store_full",
        f"the job store (Redis) is full ({detail}); new jobs are refused until accepted ones end and expire",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class Capacity:
    def __init__(self, client: redis.Redis, high_water: float):
        self.redis = client
        self.high_water = float(high_water)

    def check(self) -> None:
        """Raise a 503 when Redis uses more than high_water of its maxmemory (none set: never). One
        INFO round trip per submission: a burst must not slip past a cached answer."""
        memory = self.redis.info("memory")
        limit, used = int(memory.get("maxmemory", 0)), int(memory.get("used_memory", 0))
        if limit and used >= self.high_water * limit:
            raise store_full(f"{used} of its {limit} bytes of maxmemory in use, over {self.high_water:.0%}")
