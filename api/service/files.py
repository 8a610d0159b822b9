"""Files (OpenAI's Files API): upload a batch's input, read, list and delete your files, and find a
batch's output and error files, which are its results (never stored twice)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from api.errors import ApiError
from api.service.batches import BatchService
from api.service.capacity import Capacity
from tasks.store.batches import BatchRecord
from tasks.store.files import FileRecord, FileStore

PURPOSES = ("batch",)
OUTPUT_FILE = re.compile(r"^file-(batch_[A-Za-z0-9_-]+)-(output|errors)$")


class FileService:
    def __init__(self, store: FileStore, batches: BatchService, settings: Mapping[str, Any]):
        self.store = store
        self.batches = batches
        self.capacity = Capacity(store.redis, settings["REDIS_HIGH_WATER"])

    def create(self, owner: str, purpose: str, filename: str, lines: Iterable[bytes]) -> FileRecord:
        """Store an upload's lines as a file of owner's (lines raises what is wrong with the upload)."""
        self.capacity.check()
        return self.store.create("file-" + secrets.token_urlsafe(18), owner, purpose, filename, lines)

    def get(self, file_id: str, owner: str) -> FileRecord:
        """One of owner's uploaded files; another owner's is a 404 too."""
        record = self.store.get(file_id)
        if record is None or record.owner != owner:
            raise not_found(file_id)
        return record

    def output_of(self, file_id: str, owner: str) -> tuple[BatchRecord, bool] | None:
        """(the batch, whether it is the error file) for a batch's output or error file id that exists
        (the batch ended and has such requests); None for an id of another form."""
        match = OUTPUT_FILE.match(file_id)
        if match is None or self.store.get(file_id) is not None:
            return None
        try:
            batch = self.batches.get(match.group(1), owner)
        except ApiError:
            raise not_found(file_id) from None
        errors = match.group(2) == "errors"
        ended = batch.openai and batch.status.terminal
        if not ended or not (batch.failed + batch.cancelled if errors else batch.completed):
            raise not_found(file_id)
        return batch, errors

    def lines(self, record: FileRecord) -> Iterable[str]:
        return self.store.lines(record.id, record.lines)

    def delete(self, file_id: str, owner: str) -> None:
        self.store.delete(self.get(file_id, owner).id, owner)

    def list(self, owner: str, limit: int, after: str | None) -> tuple[list[FileRecord], bool]:
        try:
            return self.store.list(owner, limit, after)
        except KeyError:
            raise ApiError(
                400, "invalid_request", f"no file {after!r} to list after", {"after": ["Not one of your files."]}
            ) from None


def not_found(file_id: str) -> ApiError:
    return ApiError(404, "file_not_found", f"no file {file_id!r} (unknown, expired, or not yours)")
