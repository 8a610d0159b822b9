"""Jobs: submit, read, wait for, follow and cancel, for any surface.

A submission is routed to a queue, checked against what that queue's workers serve, then stored and
queued in one atomic step with its limits (tasks/store/jobs.py submit; api/service/quotas.py): no job
is stored without its broker message. An Idempotency-Key makes a retried submission return the job
the first one created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery import Celery

from api.errors import ApiError
from api.generation import Submission
from api.service.models import ModelService
from api.service.quotas import Quotas
from api.service.webhooks import check_webhook
from tasks.runtime.app import task_message
from tasks.store.batches import BatchRecord
from tasks.store.followers import Followers
from tasks.store.jobs import JobRecord, JobStore
from tasks.store.metrics import MetricsRecorder
from tasks.store.registry import WorkerInfo, WorkerRegistry
from tasks.store.states import JobState

log = logging.getLogger("api")

GPU_QUEUE = "gpu"

Event = dict[str, Any]

TOKEN = r"[A-Za-z0-9_-]{24}"  # secrets.token_urlsafe(18)
# A job's id, or a batch item's (keys.batch_item: its batch's id, '-', its index). Checked before any
# Redis access, so no other string reaches a key.
JOB_ID = re.compile(rf"job_{TOKEN}|batch_{TOKEN}-(0|[1-9][0-9]{{0,8}})")


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(18)  # 144 random bits: unguessable; the prefix keeps ids off '-'.


def not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job {job_id!r} (unknown, or expired)")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class JobService:
    def __init__(
        self,
        store: JobStore,
        registry: WorkerRegistry,
        models: ModelService,
        celery: Celery,
        settings: Mapping[str, Any],
    ):
        self.store = store
        self.registry = registry
        self.models = models
        self.celery = celery
        self.settings = settings
        self.metrics = MetricsRecorder(store.redis)
        self.quotas = Quotas(settings)
        self.followers = Followers(store)

    # -- submitting -----------------------------------------------------------------------------

    def route(self, requested: str | None, live: list[WorkerInfo]) -> str:
        """The queue the request names; else the GPU queue while a GPU worker is alive; else the default."""
        if requested:
            return requested
        if any(worker.serves(GPU_QUEUE) for worker in live):
            return GPU_QUEUE
        return self.settings["DEFAULT_QUEUE"]

    def submit(
        self, submission: Submission, owner: str, idempotency_key: str | None = None, request_id: str = ""
    ) -> JobRecord:
        """Queue the submission as a job of owner's: the new job, or the one its Idempotency-Key made."""
        live = self.registry.live()  # read once: a submission costs this and its store step, two round trips
        queue = self.route(submission.queue, live)
        self.models.request_check(queue, live)(submission.request)
        check_webhook(submission.webhook, self.settings)
        stored = submission.request.to_dict()
        job_id = new_job_id()
        idempotency = None
        if idempotency_key:
            extra = {"webhook": submission.webhook, "metadata": submission.metadata}
            extra = {name: value for name, value in extra.items() if value}
            body_digest = digest(json.dumps({"request": stored, "queue": queue, **extra}, sort_keys=True))
            idempotency = (digest(idempotency_key), body_digest)
        submitted = self.store.submit(
            job_id,
            stored,
            queue,
            owner,
            task_message(self.celery, job_id, queue),
            limits=self.quotas.job_limits(queue),
            idempotency=idempotency,
            webhook=submission.webhook,
            metadata=submission.metadata,
        )
        if submitted.bound is not None:
            return self._replayed(submitted.bound, idempotency[1] if idempotency else "")
        if submitted.refusal is not None:
            raise self.quotas.refused(submitted.refusal, queue)
        assert submitted.record is not None
        log.info("job %s: queued on %s (request %s)", job_id, queue, request_id)
        return submitted.record

    def _replayed(self, bound: dict, body_digest: str) -> JobRecord:
        if bound["body"] != body_digest:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body",
                {"Idempotency-Key": ["Already used with a different body."]},
            )
        record = self.store.get(bound["job_id"])
        if record is None:  # expired since the binding was read: the key is free again
            raise ApiError(409, "idempotency_key_expired", "the job of this Idempotency-Key has just expired; retry")
        log.info("job %s: returned again for its Idempotency-Key", record.id)
        return record

    # -- reading ----------------------------------------------------------------------------------

    def get(self, job_id: str, owner: str) -> JobRecord:
        """The job, if it exists and is owner's: another owner's job is a 404 too, and so is an id
        that is no job id (without asking Redis)."""
        if not JOB_ID.fullmatch(job_id):
            raise not_found(job_id)
        record = self.store.get(job_id)
        if record is None or record.owner != owner:
            raise not_found(job_id)
        return record

    def list(
        self,
        owner: str,
        limit: int,
        after: str | None = None,
        status: str | None = None,
        batch: BatchRecord | None = None,
    ) -> tuple[list[JobRecord], bool]:
        """The owner's jobs newest first (a batch's items with `batch`, which must be theirs), up to
        `limit` after the job `after`, with `status` if given; and whether more follow."""
        state = None
        if status is not None:
            try:
                state = JobState(status)
            except ValueError:
                states = ", ".join(s.value for s in JobState)
                raise ApiError(
                    400, "invalid_request", f"status must be one of {states}", {"status": [f"One of {states}."]}
                ) from None
        try:
            if batch is not None:
                return self.store.list_batch_items(batch.id, batch.total, limit, after, state)
            return self.store.list(owner, limit, after, state)
        except KeyError:
            where = f"batch {batch.id}'s jobs" if batch is not None else "your jobs"
            raise ApiError(
                400, "invalid_request", f"no job {after!r} in {where} to list after", {"after": [f"Not in {where}."]}
            ) from None

    def follow(
        self, job_id: str, owner: str, after_seq: int = 0, poll_s: float = 1.0, until: float | None = None
    ) -> Iterator[Event | None]:
        """The job's events after after_seq, replayed then live, until its end or `until` (see
        Followers.events). The job's ownership is checked now, before the first event."""
        self.get(job_id, owner)
        return self.followers.events(job_id, after_seq, poll_s, until)

    def wait(
        self, record: JobRecord, wait_s: float, poll_s: float = 1.0, gone: Callable[[], bool] | None = None
    ) -> JobRecord:
        """The job of `record` (read for its owner) once it has ended, or as it is after wait_s seconds,
        or once gone() says the waiting client has left (asked every poll_s)."""
        if wait_s <= 0 or record.status.terminal:
            return record
        for _quiet in self.followers.end(record.id, poll_s, until=time.monotonic() + wait_s):
            if gone is not None and gone():
                break
        return self.get(record.id, record.owner)

    # -- cancelling -------------------------------------------------------------------------------

    def cancel(self, job_id: str, owner: str) -> tuple[JobState, JobRecord]:
        """Cancel: a queued job ends now (cancelled), a running one stops within a few tokens (its state
        stays running for now); 409 for an ended one, a cancelled one included. Returns the state the
        cancel left, and the job."""
        before = self.get(job_id, owner)
        status = self._cancel(before)
        if status is None:
            raise not_found(job_id)
        if status in (JobState.SUCCEEDED, JobState.FAILED) or before.status.terminal:  # a second cancel too
            raise ApiError(409, "job_already_ended", f"job {job_id!r} already {status.value}; nothing to cancel")
        log.info("job %s: cancel requested (%s)", job_id, status.value)
        return status, self.get(job_id, owner)

    def cancel_abandoned(self, job_id: str) -> None:
        """Cancel a job whose submitting client went away before it ended (CANCEL_ON_DISCONNECT)."""
        before = self.store.get(job_id)
        if before is not None and not before.status.terminal:
            self._cancel(before)
            log.info("job %s: cancel requested, its client went away (%s)", job_id, before.status.value)

    def _cancel(self, before: JobRecord) -> JobState | None:
        status = self.store.cancel(before.id)
        if status is JobState.CANCELLED and before.status is JobState.QUEUED:  # ended here; a worker counts the rest
            self.metrics.job_ended(JobState.CANCELLED.value, before.created_at)
        return status
