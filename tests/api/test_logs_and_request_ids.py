"""A request id on every response; one log line per job event naming the job; no prompt in the logs."""

from __future__ import annotations

import logging
import re
import secrets
import time

import pytest

from api.auth import hash_key
from genqueue.client import ApiClientError, Client
from genqueue.launcher import ApiProcess
from tests.conftest import REPO, TINY_DB, redis_url
from tests.helpers import wait_job

GENERATED = re.compile(r"[0-9a-f]{32}")
KEY = "gq_log-test-" + secrets.token_hex(12)


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
    worker_lines = logged(tiny_worker, job_id, "succeeded")
    assert any(f"job {job_id}: running" in line for line in worker_lines)
    assert any(f"job {job_id}: succeeded (3 tokens)" in line for line in worker_lines)
    assert prompt not in tiny_worker.output()


def logged(process, job_id: str, state: str) -> list[str]:
    """The lines of a process's log naming the job, once it has logged the job's end."""
    deadline = time.monotonic() + 10
    while f"job {job_id}: {state}" not in process.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    return [line for line in process.output().splitlines() if job_id in line]


@pytest.fixture(scope="module")
def keyed_api(tiny_worker, tmp_path_factory):
    """`genqueue api` (gunicorn, its access log on) with an API key, on the tiny worker's database."""
    api = ApiProcess(
        {"redis_url": redis_url(TINY_DB), "api_keys": f"team:{hash_key(KEY)}", "api_keys_file": ""},
        log_dir=tmp_path_factory.mktemp("api-log"),
        cwd=REPO,
    ).wait_ready()
    yield api
    api.stop()


def test_no_response_or_credential_reaches_the_api_or_worker_logs(keyed_api, tiny_worker):
    prompt = f"secret prompt {secrets.token_hex(8)}"
    # Sampled from the random tiny model: text that appears nowhere else.
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 1, "top_k": 50}
    responses = []
    with Client(keyed_api.url, api_key=KEY) as http:
        job = http.submit(body)
        responses.append(http.wait(job.id).text)
        responses.append("".join(event.text for event in http.stream(body)))
        chat = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 1}
        completion = http.json("POST", "/v1/chat/completions", chat)
        responses.append(completion["choices"][0]["message"]["content"])
    wrong_key = "gq_a-wrong-key-" + secrets.token_hex(8)
    with Client(keyed_api.url, api_key=wrong_key) as wrong, pytest.raises(ApiClientError) as refused:
        wrong.get(job.id)
    assert refused.value.status == 403
    api_log = keyed_api.output()
    assert f"job {job.id}: queued on cpu" in api_log  # the API's INFO lines are in this log...
    assert f"GET /v1/jobs/{job.id}" in api_log  # ...and so is gunicorn's access log
    assert logged(tiny_worker, job.id, "succeeded")
    worker_log = tiny_worker.output()
    for response in responses:
        assert len(response.strip()) >= 10, response  # distinctive enough to be looked for
    for secret in [prompt, KEY, f"Bearer {KEY}", hash_key(KEY), wrong_key, *responses]:
        for name, log in (("api", api_log), ("worker", worker_log)):
            assert secret not in log, f"{secret!r} is in the {name} log"
