"""Newest-first pages of an owner's batches or files: a sorted set of ids scored by creation time,
each id naming a hash that expires (its TTL is part of the record)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis

Record = TypeVar("Record")


def newest_first(
    client: redis.Redis,
    listing: str,
    limit: int,
    after: str | None,
    key_of: Callable[[str], str],
    from_hash: Callable[[dict[str, Any], int], Record],
) -> tuple[list[Record], bool]:
    """Up to `limit` records after the id `after` in `listing`, newest first, and whether more follow.
    Each id's record is from_hash(its hash at key_of(id), the hash's TTL left); ids whose hash has
    expired are dropped from the listing. Raises KeyError for an `after` not in the listing."""
    start = 0
    if after:
        rank = client.zrevrank(listing, after)
        if rank is None:
            raise KeyError(after)
        start = rank + 1
    found: list[Record] = []
    while len(found) <= limit:
        ids = client.zrevrange(listing, start, start + limit)
        if not ids:
            break
        with client.pipeline(transaction=False) as pipe:
            for record_id in ids:
                pipe.hgetall(key_of(record_id))
                pipe.ttl(key_of(record_id))
            replies = pipe.execute()
        expired = [record_id for record_id, data in zip(ids, replies[::2], strict=True) if not data]
        found += [from_hash(data, ttl_left) for data, ttl_left in zip(replies[::2], replies[1::2], strict=True) if data]
        if expired:
            client.zrem(listing, *expired)
        start += len(ids) - len(expired)
    return found[:limit], len(found) > limit
