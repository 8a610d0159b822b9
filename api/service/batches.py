"""Batches: write a batch's requests while they are checked, queue them all once every one is valid
and the limits admit them (api/service/quotas.py), and read, list, cancel and export them for their
owner. Queueing is a chunk per atomic step; a batch whose API dies part way is finished by a worker's
sweeper (tasks/runtime/submission.py)."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from api.errors import ApiError
from api.service.capacity import Capacity
from api.service.jobs import TOKEN
from api.service.quotas import Quotas
from api.service.webhooks import check_webhook
from tasks.runtime.app import batch_queue
from tasks.runtime.submission import queue_items
from tasks.store.batches import WRITE_CHUNK, BatchRecord, BatchRequest, BatchStore
from tasks.store.states import BatchState

log = logging.getLogger("api")

MAX_LISTED_ERRORS = 100  # invalid items named in a 400; all are counted
TOUCH_EVERY_S = 1.0  # while reading a batch's requests, how often the API says it is still at it
BATCH_ID = re.compile(rf"batch_{TOKEN}")  # checked before any Redis access

# What a batch's reader yields for each request: its position (index or line number) and either the
# request or its problems (field -> messages).
Checked = tuple[int, BatchRequest | dict[str, Any]]


def too_large(what: str) -> ApiError:
    return ApiError(413, "batch_too_large", what)


@dataclass
class _Writer:
    """Writes a batch's valid requests a chunk at a time, and counts and lists the invalid ones."""

    store: BatchStore
    batch_id: str
    owner: str
    queue: str
    total: int = 0
    written: int = 0
    invalid: int = 0
    errors: dict[str, Any] = field(default_factory=dict)
    chunk: list[BatchRequest] = field(default_factory=list)
    touched: float = field(default_factory=time.monotonic)

    def add(self, position: int, checked: BatchRequest | dict[str, Any]) -> None:
        self.total += 1
        if time.monotonic() >= self.touched + TOUCH_EVERY_S:  # still reading: this batch has not stalled
            self.store.touch(self.batch_id)
            self.touched = time.monotonic()
        if isinstance(checked, dict):
            self.invalid += 1
            if len(self.errors) < MAX_LISTED_ERRORS:
                self.errors[str(position)] = checked
        elif not self.invalid:  # once one is invalid the batch is refused: check the rest, write nothing
            self.chunk.append(checked)
            if len(self.chunk) == WRITE_CHUNK:
                self.flush()

    def flush(self) -> None:
        if self.chunk:
            self.store.add_items(self.batch_id, self.owner, self.queue, self.written, self.chunk)
            self.written += len(self.chunk)
            self.chunk = []


class BatchService:
    def __init__(self, store: BatchStore, celery: Celery, settings: Mapping[str, Any]):
        self.store = store
        self.celery = celery
        self.settings = settings
        self.capacity = Capacity(store.redis, settings["REDIS_HIGH_WATER"])
        self.quotas = Quotas(settings)

    def create(
        self,
        checked: Iterable[Checked],
        where: str,
        owner: str,
        metadata: dict[str, str],
        webhook: str | None = None,
        openai: dict[str, str] | None = None,
    ) -> BatchRecord:
        """Write the requests while they are checked; refuse the batch (discarding what was written)
        if any is invalid or a limit is passed; else queue every one. where: "requests" or "lines".
        A webhook is told once, when the batch ends; `openai` marks a batch of OpenAI's Batch API."""
        check_webhook(webhook, self.settings)
        self.capacity.check()
        queue = self.queue
        batch_id = "batch_" + secrets.token_urlsafe(18)
        self.store.create(batch_id, owner, queue, metadata, webhook, openai)
        writer = _Writer(self.store, batch_id, owner, queue)
        try:
            self._write_all(writer, checked, where)
        except BaseException:
            self.store.discard(batch_id, owner, writer.written)
            raise
        limits = self.quotas.batch_limits(queue)
        refusal = self.store.admit(batch_id, owner, queue, batch_queue(queue), writer.total, limits)
        if refusal is not None:
            self.store.discard(batch_id, owner, writer.written)
            raise self.quotas.refused(refusal, queue, writer.total)
        self._queue(batch_id, queue, writer.total)
        log.info("batch %s: %d requests queued on %s", batch_id, writer.total, queue)
        record = self.store.get(batch_id)
        assert record is not None
        return record

    def _write_all(self, writer: _Writer, checked: Iterable[Checked], where: str) -> None:
        max_items = int(self.settings["BATCH_MAX_ITEMS"])
        for position, item in checked:
            if writer.total >= max_items:
                raise too_large(f"the batch has more than {max_items} requests (GENQUEUE_BATCH_MAX_ITEMS)")
            writer.add(position, item)
        if writer.invalid or not writer.total:
            raise invalid_batch(where, writer.total, writer.invalid, writer.errors)
        writer.flush()

    def _queue(self, batch_id: str, queue: str, total: int) -> None:
        try:
            queue_items(self.celery, self.store, batch_id, queue, total)
        except Exception as exc:
            log.exception("batch %s: queueing failed", batch_id)
            error = {"code": "enqueue_failed", "message": f"queueing the items failed: {exc}"}
            self.store.fail(batch_id, total, error)
            raise

    @property
    def queue(self) -> str:
        """The queue a batch's requests run on (its batch queue, read after interactive jobs)."""
        return self.settings["DEFAULT_QUEUE"]

    def get(self, batch_id: str, owner: str) -> BatchRecord:
        """The batch, if it exists and is owner's: another owner's batch is a 404 too."""
        record = self.store.get(batch_id) if BATCH_ID.fullmatch(batch_id) else None
        if record is None or record.owner != owner:
            raise ApiError(404, "batch_not_found", f"no batch {batch_id!r} (unknown, or expired)")
        return record

    def list(self, owner: str, limit: int, after: str | None) -> tuple[list[BatchRecord], bool]:
        try:
            if after is not None and not BATCH_ID.fullmatch(after):
                raise KeyError(after)
            return self.store.list(owner, limit, after)
        except KeyError:
            raise ApiError(
                400, "invalid_request", f"no batch {after!r} to list after", {"after": ["Not one of your batches."]}
            ) from None

    def results(self, batch_id: str, owner: str) -> tuple[BatchRecord, Iterator[dict[str, Any]]]:
        record = self.get(batch_id, owner)
        return record, self.store.results(batch_id, record.total)

    def cancel(self, batch_id: str, owner: str) -> tuple[BatchState, BatchRecord]:
        """Cancel: queued items never run, running ones stop, ended ones keep their results; 409 if it
        ended. Returns the state the cancel left (cancelling while items stop), and the batch."""
        self.get(batch_id, owner)
        status = self.store.cancel(batch_id)
        if status is None:
            raise ApiError(404, "batch_not_found", f"no batch {batch_id!r} (unknown, or expired)")
        if status.terminal and status is not BatchState.CANCELLED:
            raise ApiError(409, "batch_already_ended", f"batch {batch_id!r} already {status.value}; nothing to cancel")
        log.info("batch %s: cancel requested (%s)", batch_id, status.value)
        return status, self.get(batch_id, owner)


def invalid_batch(where: str, total: int, invalid: int, errors: dict[str, Any]) -> ApiError:
    if not total:
        return ApiError(400, "invalid_request", "the batch has no requests", {where: ["Must hold at least one."]})
    unit = "line" if where == "lines" else "index"
    listed = ", ".join(errors)
    more = f" and {invalid - len(errors)} more" if invalid > len(errors) else ""
    return ApiError(
        400,
        "invalid_batch",
        f"{invalid} of {total} requests are invalid (by {unit}: {listed}{more}); nothing was queued",
        {where: errors},
    )
