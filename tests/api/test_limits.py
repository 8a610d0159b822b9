"""Backpressure, idempotency and request limits."""

import threading

import pytest
import redis

from tests.conftest import (
    IDLE_DB,  # no worker consumes its queues: jobs stay queued
    LIMIT_DB,
    WorkerProcess,
    make_client,
    redis_url,
)
from tests.helpers import parse_sse, sse_text, wait_job


@pytest.fixture
def idle_client():
    redis.Redis.from_url(redis_url(IDLE_DB)).flushdb()
    return make_client(IDLE_DB, MAX_QUEUED_JOBS=3)


def test_past_the_queue_limit_submissions_get_429_with_retry_after(idle_client):
    for _ in range(3):
        assert idle_client.post("/v1/jobs", json={"prompt": "wait"}).status_code == 202
    response = idle_client.post("/v1/jobs", json={"prompt": "one too many"})
    assert response.status_code == 429
    assert response.json["error"]["code"] == "queue_full"
    assert int(response.headers["Retry-After"]) > 0


def test_a_retried_submission_with_the_same_idempotency_key_returns_the_same_job(client):
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json={"prompt": "once", "max_tokens": 2}, headers=headers)
    again = client.post("/v1/jobs", json={"prompt": "once", "max_tokens": 2}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json["id"] == again.json["id"]
    assert wait_job(client, first.json["id"])["status"] == "succeeded"
    # After the job ended, the key still names it.
    assert (
        client.post("/v1/jobs", json={"prompt": "once", "max_tokens": 2}, headers=headers).json["id"]
        == first.json["id"]
    )
    other = client.post("/v1/jobs", json={"prompt": "once", "max_tokens": 2})
    assert other.json["id"] != first.json["id"]


def test_an_idempotency_key_reused_with_another_body_is_422(client):
    headers = {"Idempotency-Key": "order-43"}
    assert client.post("/v1/jobs", json={"prompt": "a", "max_tokens": 1}, headers=headers).status_code == 202
    response = client.post("/v1/jobs", json={"prompt": "b", "max_tokens": 1}, headers=headers)
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json["error"]["fields"]


def test_concurrent_retries_create_one_job(idle_client):
    ids, statuses = [], []

    def post():
        response = idle_client.application.test_client().post(
            "/v1/jobs", json={"prompt": "race"}, headers={"Idempotency-Key": "race-1"}
        )
        statuses.append(response.status_code)
        ids.append(response.json.get("id"))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [202] * 8
    assert len(set(ids)) == 1
    store = idle_client.application.extensions["genqueue.jobs"].store
    assert store.queue_depth("cpu") == 1


def test_a_body_over_the_size_limit_is_413(tiny_worker):
    small = make_client(IDLE_DB, MAX_REQUEST_BYTES=1000)
    response = small.post("/v1/jobs", json={"prompt": "x" * 2000})
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"


def test_a_job_over_the_time_limit_fails_with_time_limit_exceeded_and_keeps_its_partial_output(smollm2_dir):
    # 300 SmolLM2 tokens take seconds (about 30 tokens/s here); the worker allows each job 1 s.
    redis.Redis.from_url(redis_url(LIMIT_DB)).flushdb()
    worker = WorkerProcess(smollm2_dir, LIMIT_DB, concurrency=2, job_time_limit_s=1)
    try:
        client = make_client(LIMIT_DB)
        body = {"prompt": "Write a very long story about a lighthouse keeper.", "temperature": 0, "max_tokens": 300}
        job_id = client.post("/v1/jobs", json=body).json["id"]
        job = wait_job(client, job_id)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "time_limit_exceeded" and "1s" in job["error"]["message"]
        events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
        assert events[-2]["event"] == "error" and events[-1]["data"] == "[DONE]"
        # What it generated within the limit is kept: in the record and on the stream.
        kept = client.application.extensions["genqueue.jobs"].store.get(job_id).result
        assert 0 < kept["usage"]["completion_tokens"] < 300 and kept["finish_reason"] == "cancelled"
        assert sse_text(events[:-2]) == kept["response"] != ""
        short = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 2}).json["id"]
        assert wait_job(client, short)["status"] == "succeeded"  # within the limit, a job runs as usual
    finally:
        worker.stop()
