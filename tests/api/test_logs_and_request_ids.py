"""A request id on every response; one log line per job event naming the job; no prompt in the logs."""

from __future__ import annotations

import logging
import re
import secrets
import time

from tests.helpers import wait_job

GENERATED = re.compile(r"[0-9a-f]{32}")


def test_every_response_carries_a_request_id(client):
    responses = [
        client.get("/healthz"),
        client.get("/v1/nothing"),  # 404
        client.post("/v1/jobs", json={"prompt": ""}),  # 400
        client.post("/v1/chat/completions", json={}),  # 400, OpenAI's shape
        client.get("/metrics"),
    ]
    ids = [r.headers.get("X-Request-Id", "") for r in responses]
    assert all(GENERATED.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_a_usable_request_id_from_the_caller_is_kept_and_others_replaced(client):
    assert client.get("/healthz", headers={"X-Request-Id": "trace-42.a:b"}).headers["X-Request-Id"] == "trace-42.a:b"
    for unusable in ("has space", "x" * 129, "semi;colon"):
        answered = client.get("/healthz", headers={"X-Request-Id": unusable}).headers["X-Request-Id"]
        assert GENERATED.fullmatch(answered), unusable


def test_job_events_are_logged_with_the_job_id_and_the_prompt_is_not(client, tiny_worker, caplog):
    prompt = f"secret prompt {secrets.token_hex(8)}"
    with caplog.at_level(logging.INFO):
        response = client.post("/v1/jobs", json={"prompt": prompt, "max_tokens": 3}, headers={"X-Request-Id": "rq-1"})
        job_id = response.json["id"]
        assert wait_job(client, job_id)["status"] == "succeeded"
    api_lines = [r.getMessage() for r in caplog.records]
    assert f"job {job_id}: queued on cpu (request rq-1)" in api_lines
    assert not any(prompt in line for line in api_lines)
    deadline = time.monotonic() + 10
    while f"job {job_id}: succeeded" not in tiny_worker.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker_lines = [line for line in tiny_worker.output().splitlines() if job_id in line]
    assert any(f"job {job_id}: running" in line for line in worker_lines)
    assert any(f"job {job_id}: succeeded (3 tokens)" in line for line in worker_lines)
    assert prompt not in tiny_worker.output()
