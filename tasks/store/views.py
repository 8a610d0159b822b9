"""The public JSON of a job and of a batch: what the API's GET answers and what a webhook carries.

One definition for both, so a webhook's `data` is exactly what `GET /v1/jobs/<id>` (or
`GET /v1/batches/<id>`) would have answered when the event happened.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tasks.store.batches import BatchRecord
from tasks.store.jobs import JobRecord
from tasks.store.states import BatchState

BATCHES_PATH = "/v1/batches"  # where the API serves batches (api/batches.py), for results_url


def iso(timestamp: float | None) -> str | None:
    """Unix time as ISO 8601 in UTC with milliseconds, e.g. 2026-12-03T10:00:00.123Z."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "status": record.status.value,
        "created_at": iso(record.created_at),
        "started_at": iso(record.started_at),
        "finished_at": iso(record.finished_at),
        "result": record.result,
        "error": record.error,
        "metadata": record.metadata,
    }


def batch_view(record: BatchRecord) -> dict[str, Any]:
    """A batch as GET /v1/batches/<id> answers it: in OpenAI's shape for one made through OpenAI's
    Batch API (from an input file), else genqueue's own."""
    return openai_batch_view(record) if record.openai else native_batch_view(record)


def native_batch_view(record: BatchRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "batch",
        "status": record.status.value,
        "request_counts": {
            "total": record.total,
            "completed": record.completed,
            "failed": record.failed,
            "cancelled": record.cancelled,
        },
        "usage": {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens,
        },
        "metadata": record.metadata,
        "created_at": iso(record.created_at),
        **{name: iso(record.timestamps.get(name)) for name in BatchRecord.TIMESTAMPS},
        "expires_at": iso(record.expires_at),
        "error": record.error,
        "results_url": f"{BATCHES_PATH}/{record.id}/results",
    }


def output_file_id(batch_id: str, errors: bool = False) -> str:
    """The id of an OpenAI batch's output (or error) file: its results, rendered when read."""
    return f"file-{batch_id}-{'errors' if errors else 'output'}"


def openai_batch_view(record: BatchRecord) -> dict[str, Any]:
    """OpenAI's Batch object. completed_with_errors is OpenAI's completed (the failed requests are in
    the error file); cancelled requests count as failed; timestamps are Unix seconds."""
    info = record.openai or {}
    status = BatchState.COMPLETED if record.status is BatchState.COMPLETED_WITH_ERRORS else record.status
    ended = record.status.terminal

    def seconds(timestamp: float | None) -> int | None:
        return int(timestamp) if timestamp is not None else None

    return {
        "id": record.id,
        "object": "batch",
        "endpoint": info.get("endpoint"),
        "model": info.get("model"),
        "errors": {"object": "list", "data": [record.error]} if record.error else None,
        "input_file_id": info.get("input_file_id"),
        "completion_window": info.get("completion_window"),
        "status": status.value,
        "output_file_id": output_file_id(record.id) if ended and record.completed else None,
        "error_file_id": output_file_id(record.id, errors=True) if ended and record.failed + record.cancelled else None,
        "created_at": int(record.created_at),
        **{name: seconds(record.timestamps.get(name)) for name in BatchRecord.TIMESTAMPS},
        "expires_at": seconds(record.expires_at),
        "expired_at": None,
        "request_counts": {
            "total": record.total,
            "completed": record.completed,
            "failed": record.failed + record.cancelled,
        },
        "usage": {
            "input_tokens": record.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": record.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": record.prompt_tokens + record.completion_tokens,
        },
        "metadata": record.metadata or None,
    }
