"""The native jobs resource: submit a generation, list your jobs, read one (optionally waiting),
stream it, cancel it."""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify, request, url_for

from api import waiting
from api.errors import ApiError
from api.generation import Submission
from api.http import PAGE_PARAMETERS, json_body, list_page, owner, page_limit, submit, validate
from api.openapi import IDEMPOTENCY_KEY, SSE, document
from api.schemas import ErrorSchema, GenerationSchema, JobListSchema, JobSchema, StreamEventSchema, to_submission
from api.service import batch_service, job_service
from api.sse import job_event_stream
from tasks.store.states import JobState
from tasks.store.views import job_view

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

PLAIN_INTEGER = re.compile(r"[0-9]{1,16}")  # ASCII digits only: no sign, space, exponent or other script
MAX_EVENT_ID = 2**53 - 1  # the largest integer a JavaScript client keeps exactly


def native_submission(body: dict) -> tuple[Submission, bool]:
    """Validate a native body (POST /v1/jobs, Workers AI): (the submission, whether to stream)."""
    data = validate(GenerationSchema(), body)
    return to_submission(data), data.get("stream", False)


def stream_response(job_id: str, after_seq: int = 0, hold: waiting.Hold | None = None, submitted: bool = False):
    """The job's SSE stream (ownership is checked before the response starts)."""
    return waiting.stream(job_id, job_event_stream, after_seq, hold, submitted)


def plain_integer(name: str, raw: str, maximum: int, unit: str = "") -> int:
    """raw as an integer from 0 to maximum, or a 400 naming the parameter."""
    if PLAIN_INTEGER.fullmatch(raw) and int(raw) <= maximum:
        return int(raw)
    raise ApiError(
        400,
        "invalid_request",
        f"{name} must be a whole number{unit} from 0 to {maximum}",
        {name: [f"Must be an integer from 0 to {maximum}."]},
    )


WAIT = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "Whole seconds (0 to GENQUEUE_MAX_WAIT_S) to wait for the job to end before answering",
    "schema": {"type": "integer", "minimum": 0},
}


def wait_seconds() -> int | None:
    """?wait= as whole seconds up to MAX_WAIT_S (None when not given), or a 400 naming it."""
    raw = request.args.get("wait")
    return None if raw is None else plain_integer("wait", raw, current_app.config["MAX_WAIT_S"], " of seconds")


@bp.post("")
@document(
    "Submit a generation job",
    description=(
        "Validates the body and queues the job: 202 with the job and its Location. With ?wait=S, waits up to S "
        "seconds for the job to end first (submit and wait in one request): 200 with the ended job, else 202 "
        "with the job as it is then. With stream: true, answers 200 with the job's SSE stream instead (header "
        "X-Job-Id; wait does not apply)."
    ),
    tags=["Jobs"],
    request=GenerationSchema,
    parameters=[IDEMPOTENCY_KEY, WAIT],
    headers={202: ["Location"], 200: ["X-Job-Id", "Location"]},
    events=StreamEventSchema,
    examples={
        "request": {"prompt": "What is the capital of France?", "temperature": 0, "max_tokens": 64},
        202: {
            "id": "job_Xp3b9Qe0LqWv2mHc7rT1uYkA",
            "status": "queued",
            "created_at": "2026-12-03T10:00:00.000Z",
            "started_at": None,
            "finished_at": None,
            "result": None,
            "error": None,
            "metadata": {},
        },
    },
    responses={
        202: ("The queued job (with ?wait: the job, not ended within the wait)", JobSchema),
        200: ("With ?wait: the ended job. With stream: true, the job's Server-Sent Events", JobSchema, SSE),
        400: ("Malformed JSON, invalid fields or an invalid wait, each named with its limit", ErrorSchema),
        413: ("The body is over GENQUEUE_MAX_REQUEST_BYTES", ErrorSchema),
        415: ("The body is not JSON", ErrorSchema),
        422: ("The Idempotency-Key was used with another body", ErrorSchema),
        429: ("The queue is full, or this client holds its limit of streams (stream) or waits (?wait)", ErrorSchema),
        503: ("Redis is unreachable (Retry-After)", ErrorSchema),
    },
)
def create_job():
    submission, stream = native_submission(json_body())
    wait_s = wait_seconds()
    if stream and wait_s is not None:
        message = "wait does not apply to stream: true (the stream follows the job to its end)"
        raise ApiError(400, "invalid_request", message, {"wait": [message]})
    if stream:
        record, hold = waiting.submit_held(submission, waiting.STREAMS)
        response = stream_response(record.id, hold=hold, submitted=True)
        response.headers["Location"] = url_for("jobs.get_job", job_id=record.id)
        return response
    if wait_s is None:
        record = submit(submission)
        return jsonify(job_view(record)), 202, {"Location": url_for("jobs.get_job", job_id=record.id)}
    return submit_and_wait(submission, wait_s)


def submit_and_wait(submission: Submission, wait_s: int):
    """POST ?wait: the job once it has ended (200), or as it is after wait_s (202). The wait counts
    against the client's waits (a 429 queues nothing); a client that leaves meanwhile cancels the
    job it submitted (CANCEL_ON_DISCONNECT), as a synchronous call does."""
    record, hold = waiting.submit_held(submission, waiting.WAITS)
    location = {"Location": url_for("jobs.get_job", job_id=record.id)}
    ended = waiting.wait(record, wait_s, hold, submitted=True)
    if ended is None:
        return waiting.gone_response()
    return jsonify(job_view(ended)), 200 if ended.status.terminal else 202, location


@bp.get("")
@document(
    "List your jobs, newest first",
    description=(
        "The jobs your API key submitted that have not expired (GENQUEUE_JOB_TTL_S), in OpenAI's list shape. "
        "A batch's jobs are listed with ?batch_id= (newest, the highest index, first), not among yours."
    ),
    tags=["Jobs"],
    parameters=[
        *PAGE_PARAMETERS,
        {
            "name": "status",
            "in": "query",
            "required": False,
            "description": "Only jobs in this state",
            "schema": {"type": "string", "enum": [state.value for state in JobState]},
        },
        {
            "name": "batch_id",
            "in": "query",
            "required": False,
            "description": "The jobs of this batch of yours",
            "schema": {"type": "string"},
        },
    ],
    responses={
        200: ("A page of jobs", JobListSchema),
        400: ("An invalid limit, after or status", ErrorSchema),
        404: ("Unknown or expired batch_id", ErrorSchema),
    },
)
def list_jobs():
    limit, batch_id = page_limit(), request.args.get("batch_id")
    batch = batch_service().get(batch_id, owner()) if batch_id is not None else None
    after, status = request.args.get("after") or None, request.args.get("status")
    records, has_more = job_service().list(owner(), limit, after, status, batch)
    return list_page([job_view(record) for record in records], has_more)


@bp.get("/<job_id>")
@document(
    "Read a job, optionally waiting for it to end",
    tags=["Jobs"],
    parameters=[WAIT],
    examples={
        200: {
            "id": "job_Xp3b9Qe0LqWv2mHc7rT1uYkA",
            "status": "succeeded",
            "created_at": "2026-12-03T10:00:00.000Z",
            "started_at": "2026-12-03T10:00:00.012Z",
            "finished_at": "2026-12-03T10:00:00.400Z",
            "result": {
                "response": "The capital of France is Paris.",
                "tool_calls": [],
                "usage": {"prompt_tokens": 37, "completion_tokens": 8, "total_tokens": 45},
                "finish_reason": "stop",
            },
            "error": None,
            "metadata": {},
        }
    },
    responses={
        200: ("The job", JobSchema),
        400: ("An invalid wait", ErrorSchema),
        404: ("Unknown or expired job", ErrorSchema),
        429: ("This client holds GENQUEUE_MAX_WAITS_PER_CLIENT waits already (Retry-After)", ErrorSchema),
    },
)
def get_job(job_id: str):
    wait_s = wait_seconds() or 0
    record = job_service().get(job_id, owner())
    if wait_s and not record.status.terminal:
        record = waiting.wait(record, wait_s, waiting.Hold(waiting.WAITS))
        if record is None:
            return waiting.gone_response()
    return jsonify(job_view(record))


@bp.get("/<job_id>/stream")
@document(
    "Stream a job's chunks as Server-Sent Events",
    description=(
        'Each chunk is `id: <n>` and `data: {"response": "<text>"}`; the last event carries tool_calls, usage '
        "and finish_reason (or `event: error`), then `data: [DONE]`. Replays from the start; Last-Event-ID resumes "
        "(at or past the end of an ended job: its last event again, then [DONE]). Never cancels the job."
    ),
    tags=["Jobs"],
    parameters=[
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "Resume after this event id",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_ID},
        }
    ],
    events=StreamEventSchema,
    responses={
        200: ("The job's events", None, "text/event-stream"),
        400: ("An invalid Last-Event-ID", ErrorSchema),
        404: ("Unknown or expired job", ErrorSchema),
        429: ("This client holds GENQUEUE_MAX_STREAMS_PER_CLIENT streams already (Retry-After)", ErrorSchema),
    },
)
def stream_job(job_id: str):
    last_event_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    return stream_response(job_id, plain_integer("Last-Event-ID", last_event_id, MAX_EVENT_ID))


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
    status, record = job_service().cancel(job_id, owner())
    return jsonify(job_view(record)), 200 if status.terminal else 202
