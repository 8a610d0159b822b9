"""Uploaded files (OpenAI's Files API, purpose "batch"): a batch's input lines, kept for their owner.

A file is a hash (keys.file: id, owner, purpose, filename, bytes, lines, created_at) and its lines in a
list (keys.file_lines), written a chunk at a time while the upload is read, so neither the API nor
one Redis command holds the whole file. Files are listed per owner (keys.owner_files) and expire
with batches (GENQUEUE_BATCH_TTL_S). A batch's output and error files are not stored: they are its
results, rendered when read (api/openai/files.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tasks.store import keys
from tasks.store.jobs import JobStore, now
from tasks.store.listing import newest_first

LINES_CHUNK = 1000  # lines per pipelined round trip


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    lines: int
    created_at: float
    expires_at: float | None = None

    @classmethod
    def from_hash(cls, data: dict[str, str], ttl_left_s: int | None) -> FileRecord:
        return cls(
            id=data["id"],
            owner=data.get("owner", ""),
            purpose=data.get("purpose", ""),
            filename=data.get("filename", ""),
            bytes=int(data.get("bytes") or 0),
            lines=int(data.get("lines") or 0),
            created_at=float(data["created_at"]),
            expires_at=now() + ttl_left_s if ttl_left_s and ttl_left_s > 0 else None,
        )


class FileStore:
    def __init__(self, jobs: JobStore, ttl_s: int):
        self.redis = jobs.redis
        self.ttl_s = int(ttl_s)

    def create(self, file_id: str, owner: str, purpose: str, filename: str, lines: Iterable[bytes]) -> FileRecord:
        """Write the file's lines a chunk at a time, then its record (a file is listed only once whole).
        An exception while reading the lines removes what was written, and is raised again."""
        count = size = 0
        chunk: list[bytes] = []
        try:
            for line in lines:
                chunk.append(line)
                count, size = count + 1, size + len(line)
                if len(chunk) == LINES_CHUNK:
                    self._append(file_id, chunk)
                    chunk = []
            self._append(file_id, chunk)
        except BaseException:
            self.redis.delete(keys.file_lines(file_id))
            raise
        created_at = now()
        fields = {
            "id": file_id,
            "owner": owner,
            "purpose": purpose,
            "filename": filename,
            "bytes": size,
            "lines": count,
            "created_at": repr(created_at),
        }
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.file(file_id), mapping=fields)
            pipe.expire(keys.file(file_id), self.ttl_s)
            pipe.expire(keys.file_lines(file_id), self.ttl_s)
            pipe.zadd(keys.owner_files(owner), {file_id: created_at})
            pipe.expire(keys.owner_files(owner), self.ttl_s)
            pipe.execute()
        return FileRecord(file_id, owner, purpose, filename, size, count, created_at, created_at + self.ttl_s)

    def _append(self, file_id: str, lines: list[bytes]) -> None:
        if lines:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(keys.file_lines(file_id), *lines)
                pipe.expire(keys.file_lines(file_id), self.ttl_s)
                pipe.execute()

    def get(self, file_id: str) -> FileRecord | None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.file(file_id))
            pipe.ttl(keys.file(file_id))
            data, ttl_left = pipe.execute()
        return FileRecord.from_hash(data, ttl_left) if data else None

    def lines(self, file_id: str, count: int) -> Iterator[str]:
        """The file's lines in order, read LINES_CHUNK at a time."""
        for start in range(0, count, LINES_CHUNK):
            yield from self.redis.lrange(keys.file_lines(file_id), start, start + LINES_CHUNK - 1)

    def delete(self, file_id: str, owner: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.file(file_id), keys.file_lines(file_id))
            pipe.zrem(keys.owner_files(owner), file_id)
            pipe.execute()

    def list(self, owner: str, limit: int, after: str | None = None) -> tuple[list[FileRecord], bool]:
        """The owner's files newest first, up to `limit` after the file `after`, and whether more follow.
        Raises KeyError for an `after` that is not one of the owner's files."""
        return newest_first(self.redis, keys.owner_files(owner), limit, after, keys.file, FileRecord.from_hash)
