"""Room left in Redis: new work is refused (503) past a high-water mark of Redis's maxmemory, so the
jobs already accepted keep room to write their chunks and ends. With `maxmemory-policy noeviction`
(the compose stack's), a Redis that is full refuses writes rather than evicting queued jobs; this
keeps the API from ever getting there on new work.

A job is checked in the step that stores and queues it (its Limits' memory_high_water); a batch and
an upload, before their lines are written, here."""

from __future__ import annotations

import redis

from api.errors import ApiError
from tasks.store.quotas import MemoryRoom, Refusal

RETRY_AFTER_S = 30


def store_full(refusal: Refusal, high_water: float) -> ApiError:
    """The 503 of a memory_high_water refusal (tasks/store/quotas.py)."""
    used, limit = int(refusal.count), int(refusal.maximum)
    return ApiError(
        503,
        "store_full",
        f"the job store (Redis) is full ({used} of its {limit} bytes of maxmemory in use, over {high_water:.0%}); "
        "new work is refused until accepted jobs end and expire",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class Capacity:
    def __init__(self, client: redis.Redis, high_water: float):
        self.room = MemoryRoom(client)
        self.high_water = float(high_water)

    def check(self) -> None:
        """Raise a 503 when Redis uses more than high_water of its maxmemory (none set: never)."""
        refusal = self.room.refusal(self.high_water)
        if refusal is not None:
            raise store_full(refusal, self.high_water)
