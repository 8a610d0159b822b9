"""The jobs resource: submit a generation, read it (optionally waiting), stream its chunks."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from marshmallow import ValidationError

from api.auth import current_owner
from api.errors import ApiError
from api.schemas import GenerationSchema
from api.sse import job_event_stream
from tasks.app import enqueue
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


def submit(params: dict) -> JobRecord:
    """Create the job record and enqueue it; never leaves a record without a queued task."""
    params = dict(params)
    params.pop("stream", None)
    queue = choose_queue(params.pop("queue", None))
    job_id = secrets.token_urlsafe(18)  # 144 random bits: unguessable
    record = store().create(job_id, params, queue, owner=current_owner())
    try:
        enqueue(current_app.extensions["genqueue.celery"], job_id, queue)
    except Exception:
        store().delete(job_id)
        raise
    current_app.logger.info("job %s: queued on %s", job_id, queue)
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


@bp.post("")
def create_job():
    params = validate(GenerationSchema, json_body())
    record = submit(params)
    location = url_for("jobs.get_job", job_id=record.id)
    if params["stream"]:
        response = event_stream_response(record.id)
        response.headers["Location"] = location
        return response
    return jsonify(job_view(record)), 202, {"Location": location}


@bp.get("/<job_id>")
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
    record = get_record(job_id)
    if wait_s and not record.status.terminal:
        deadline = time.monotonic() + wait_s
        for event in store().follow(job_id, poll_s=min(1.0, wait_s)):
            if (event and event["type"] == "end") or time.monotonic() >= deadline:
                break
        record = get_record(job_id)
    return jsonify(job_view(record))


@bp.get("/<job_id>/stream")
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
def cancel_job(job_id: str):
    """Cancel: a queued job never runs (200, cancelled); a running one stops within a few tokens and
    keeps its partial output (202, then cancelled); an ended job cannot be cancelled (409)."""
    get_record(job_id)  # 404 for unknown jobs and other keys' jobs
    status = store().cancel(job_id)
    if status is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} (unknown, or expired)")
    if status in (JobState.SUCCEEDED, JobState.FAILED):
        raise ApiError(409, "job_already_ended", f"job {job_id!r} already {status.value}; nothing to cancel")
    current_app.logger.info("job %s: cancel requested (%s)", job_id, status.value)
    return jsonify(job_view(get_record(job_id))), 200 if status is JobState.CANCELLED else 202
