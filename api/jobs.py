"""The jobs resource: submit a generation, read it (optionally waiting), stream its chunks."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from marshmallow import ValidationError

from api import request_id
from api.auth import current_owner
from api.errors import ApiError
from api.openapi import document
from api.schemas import ErrorSchema, GenerationSchema, JobSchema
from api.sse import job_event_stream
from tasks import keys
from tasks.app import enqueue
from tasks.metrics import MetricsRecorder
from tasks.states import JobState
from tasks.store import JobRecord, JobStore

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def store() -> JobStore:
    return current_app.extensions["genqueue.store"]


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(record: JobRecord) -> dict:
    return {
        "id": record.id,
        "status": record.status.value,
        "created_at": iso(record.created_at),
        "started_at": iso(record.started_at),
        "finished_at": iso(record.finished_at),
        "result": record.result,
        "error": record.error,
    }


def json_body() -> dict:
    """The request's JSON object, or a 415/400 that says what is wrong with it."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "malformed_json", "the body is not valid JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    return body


def validate(schema_cls, body: dict) -> dict:
    try:
        return schema_cls().load(body)
    except ValidationError as exc:
        fields = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        names = ", ".join(sorted(fields))
        raise ApiError(400, "invalid_request", f"invalid fields: {names}", fields) from exc


IDEMPOTENCY_WAIT_S = 2.0  # how long a retry waits for the first request's job to be written
RETRY_AFTER_FULL_S = 5


def served_loras(queue: str) -> set[str] | None:
    """The LoRA variants the live workers of a queue serve; None when no worker of it is heard from."""
    client = store().redis
    live = client.zrangebyscore(keys.WORKERS, time.time(), "+inf")
    with client.pipeline() as pipe:
        for worker_id in live:
            pipe.hgetall(keys.worker(worker_id))
        workers = pipe.execute()
    serving = [w for w in workers if queue in w.get("queues", "").split(",")]
    if not serving:
        return None
    return {name for w in serving for name in w.get("loras", "").split(",") if name}


def validate_generation(body: dict) -> dict:
    """A generation body validated, and its `lora` checked against what the queue's workers serve.
    With no worker up, the job is queued and the worker that takes it checks the name."""
    params = validate(GenerationSchema, body)
    lora = params.get("lora")
    known = served_loras(current_app.config["DEFAULT_QUEUE"]) if lora is not None else None
    if known is not None and lora not in known:
        listed = ", ".join(sorted(known)) or "none"
        message = f"unknown lora {lora!r}; the workers serve: {listed}"
        raise ApiError(400, "invalid_request", message, {"lora": [message]})
    return params


def submit(params: dict) -> JobRecord:
    """Create the job record and enqueue it; never leaves a record without a queued task.

    Honours the request's Idempotency-Key header (a retried submission gets the same job) and the
    queue's backpressure limit (429)."""
    params = dict(params)
    params.pop("stream", None)
    queue = choose_queue(params.pop("queue", None))
    owner = current_owner() or ""
    job_id = "job_" + secrets.token_urlsafe(18)  # 144 random bits: unguessable; the prefix keeps ids off '-'.
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key:
        key_digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        body_digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        bound = store().claim_idempotency_key(owner, key_digest, body_digest, job_id)
        if bound is not None:
            return replayed_job(bound, body_digest)
    try:
        depth = store().queue_depth(queue)
        if depth >= current_app.config["MAX_QUEUED_JOBS"]:
            raise ApiError(
                429,
                "queue_full",
                f"the {queue!r} queue holds {depth} waiting jobs, its limit; retry later",
                headers={"Retry-After": str(RETRY_AFTER_FULL_S)},
            )
        record = store().create(job_id, params, queue, owner=owner)
        try:
            enqueue(current_app.extensions["genqueue.celery"], job_id, queue)
        except Exception:
            store().delete(job_id)
            raise
    except Exception:
        if idempotency_key:  # nothing was queued: the same key may be tried again
            store().release_idempotency_key(owner, key_digest)
        raise
    MetricsRecorder(store().redis).job_submitted()
    current_app.logger.info("job %s: queued on %s (request %s)", job_id, queue, request_id.current())
    return record


def replayed_job(bound: dict, body_digest: str) -> JobRecord:
    if bound["body"] != body_digest:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body",
            {"Idempotency-Key": ["Already used with a different body."]},
        )
    deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
    while (record := store().get(bound["job_id"])) is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first request is still writing its job
    if record is None:
        raise ApiError(409, "idempotency_key_in_use", "a request with this Idempotency-Key is still being submitted")
    current_app.logger.info("job %s: returned again for its Idempotency-Key", record.id)
    return record


def choose_queue(requested: str | None) -> str:
    """The queue the request names; else the GPU queue while a GPU worker is alive; else the default."""
    if requested:
        return requested
    if store().queue_served("gpu"):
        return "gpu"
    return current_app.config["DEFAULT_QUEUE"]


def event_stream_response(job_id: str, after_seq: int = 0) -> Response:
    stream = job_event_stream(store(), job_id, after_seq, current_app.config["SSE_KEEPALIVE_S"])
    headers = {**SSE_HEADERS, "X-Job-Id": job_id}
    return Response(stream, mimetype="text/event-stream", headers=headers)


def get_record(job_id: str) -> JobRecord:
    """The job, if it exists and belongs to the caller's key: another key's job is a 404 too."""
    record = store().get(job_id)
    if record is None or record.owner != (current_owner() or ""):
        raise ApiError(404, "job_not_found", f"no job {job_id!r} (unknown, or expired)")
    return record


def wait_for_end(job_id: str, wait_s: float) -> JobRecord:
    """The job once it has ended, or as it is after wait_s seconds."""
    record = get_record(job_id)
    if wait_s and not record.status.terminal:
        deadline = time.monotonic() + wait_s
        for event in store().follow(job_id, poll_s=min(1.0, wait_s)):
            if (event and event["type"] == "end") or time.monotonic() >= deadline:
                break
        record = get_record(job_id)
    return record


@bp.post("")
@document(
    "Submit a generation job",
    description=(
        "Validates the body and queues the job: 202 with the job and its Location. With stream: true, "
        "answers 200 with the job's SSE stream instead (header X-Job-Id)."
    ),
    tags=["Jobs"],
    request=GenerationSchema,
    responses={
        202: ("The queued job", JobSchema),
        200: ("With stream: true, the job's Server-Sent Events", None, "text/event-stream"),
        400: ("Malformed JSON or invalid fields, each named with its limit", ErrorSchema),
        413: ("The body is over GENQUEUE_MAX_REQUEST_BYTES", ErrorSchema),
        415: ("The body is not JSON", ErrorSchema),
        422: ("The Idempotency-Key was used with another body", ErrorSchema),
        429: ("The queue is full (Retry-After)", ErrorSchema),
        503: ("Redis is unreachable (Retry-After)", ErrorSchema),
    },
)
def create_job():
    params = validate_generation(json_body())
    record = submit(params)
    location = url_for("jobs.get_job", job_id=record.id)
    if params["stream"]:
        response = event_stream_response(record.id)
        response.headers["Location"] = location
        return response
    return jsonify(job_view(record)), 202, {"Location": location}


@bp.get("/<job_id>")
@document(
    "Read a job, optionally waiting for it to end",
    tags=["Jobs"],
    parameters=[
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": "Seconds (0 to GENQUEUE_MAX_WAIT_S) to wait for the job to end before answering",
            "schema": {"type": "number", "minimum": 0},
        }
    ],
    responses={
        200: ("The job", JobSchema),
        400: ("An invalid wait", ErrorSchema),
        404: ("Unknown or expired job", ErrorSchema),
    },
)
def get_job(job_id: str):
    wait = request.args.get("wait", "0")
    try:
        wait_s = float(wait)
    except ValueError:
        wait_s = -1
    max_wait = current_app.config["MAX_WAIT_S"]
    if not 0 <= wait_s <= max_wait:
        raise ApiError(
            400,
            "invalid_request",
            f"wait must be a number of seconds from 0 to {max_wait}",
            {"wait": [f"Must be between 0 and {max_wait}."]},
        )
    return jsonify(job_view(wait_for_end(job_id, wait_s)))


@bp.get("/<job_id>/stream")
@document(
    "Stream a job's chunks as Server-Sent Events",
    description=(
        'Each chunk is `id: <n>` and `data: {"response": "<text>"}`; the last event carries tool_calls, usage '
        "and finish_reason (or `event: error`), then `data: [DONE]`. Replays from the start; Last-Event-ID resumes."
    ),
    tags=["Jobs"],
    parameters=[
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "Resume after this event id",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    responses={
        200: ("The job's events", None, "text/event-stream"),
        400: ("An invalid Last-Event-ID", ErrorSchema),
        404: ("Unknown or expired job", ErrorSchema),
    },
)
def stream_job(job_id: str):
    get_record(job_id)
    last_event_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    if not last_event_id.isdigit():
        raise ApiError(
            400,
            "invalid_request",
            "Last-Event-ID must be an event id from this stream",
            {"Last-Event-ID": ["Must be a non-negative integer."]},
        )
    return event_stream_response(job_id, int(last_event_id))


@bp.delete("/<job_id>")
@document(
    "Cancel a job",
    description=(
        "A queued job never runs (200, cancelled); a running one stops within a few tokens and keeps its partial "
        "output (202, then cancelled); an ended job cannot be cancelled (409)."
    ),
    tags=["Jobs"],
    responses={
        200: ("The job, cancelled", JobSchema),
        202: ("The job, still running: it stops within a few tokens", JobSchema),
        404: ("Unknown or expired job", ErrorSchema),
        409: ("The job already ended", ErrorSchema),
    },
)
def cancel_job(job_id: str):
    """Cancel: a queued job never runs (200, cancelled); a running one stops within a few tokens and
    keeps its partial output (202, then cancelled); an ended job cannot be cancelled (409)."""
    before = get_record(job_id)  # 404 for unknown jobs and other keys' jobs
    status = store().cancel(job_id)
    if status is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} (unknown, or expired)")
    if status is JobState.CANCELLED and before.status is JobState.QUEUED:  # ended here; a worker counts the rest
        MetricsRecorder(store().redis).job_ended(JobState.CANCELLED.value, before.created_at)
    if status in (JobState.SUCCEEDED, JobState.FAILED):
        raise ApiError(409, "job_already_ended", f"job {job_id!r} already {status.value}; nothing to cancel")
    current_app.logger.info("job %s: cancel requested (%s)", job_id, status.value)
    return jsonify(job_view(get_record(job_id))), 200 if status is JobState.CANCELLED else 202
