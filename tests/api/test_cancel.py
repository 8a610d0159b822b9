"""Cancellation through the API and a real worker."""

import time

from tests.conftest import TINY_DB, make_client
from tests.helpers import parse_sse, sse_text, wait_job

# SmolLM2 takes seconds for this (about 26 tokens/s here): long enough to cancel while it runs.
LONG = {"prompt": "Write a very long story about a lighthouse keeper.", "temperature": 0, "max_tokens": 400}


def wait_running(client, job_id: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json
        if job["status"] != "queued":
            return job
        time.sleep(0.02)
    raise TimeoutError(job_id)


def test_a_running_job_stops_within_a_few_tokens_and_keeps_its_output(smol_client):
    client = smol_client
    job_id = client.post("/v1/jobs", json=LONG).json["id"]
    assert wait_running(client, job_id)["status"] == "running"
    store = client.application.extensions["genqueue.store"]
    while len(store.events(job_id)) < 5:  # let it generate some tokens
        time.sleep(0.02)
    response = client.delete(f"/v1/jobs/{job_id}")
    chunks_at_cancel = len(store.events(job_id))
    assert response.status_code == 202
    job = wait_job(client, job_id)
    assert job["status"] == "cancelled"
    result = job["result"]
    assert result["finish_reason"] == "cancelled"
    assert chunks_at_cancel <= result["usage"]["completion_tokens"] <= chunks_at_cancel + 5
    events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    assert sse_text(events) == result["response"]
    assert events[-1]["data"] == "[DONE]"
    # Cancelling again is harmless; the worker serves the next job.
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    assert (
        wait_job(client, client.post("/v1/jobs", json={"prompt": "next", "max_tokens": 3}).json["id"])["status"]
        == "succeeded"
    )


def test_a_queued_job_never_runs(tiny_worker):
    # A client on a queue no worker consumes keeps its jobs queued.
    client = make_client(TINY_DB, DEFAULT_QUEUE="gpu")
    job_id = client.post("/v1/jobs", json=LONG).json["id"]
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    job = response.json
    assert job["status"] == "cancelled"
    assert job["started_at"] is None and job["result"] is None
    events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    assert [e["data"] for e in events][-1] == "[DONE]"
    assert sse_text(events) == ""


def test_cancelling_an_ended_job_is_409_and_an_unknown_one_404(client):
    job_id = client.post("/v1/jobs", json={"prompt": "short", "max_tokens": 2}).json["id"]
    assert wait_job(client, job_id)["status"] == "succeeded"
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 409
    assert response.json["error"]["code"] == "job_already_ended"
    assert client.delete("/v1/jobs/nope").status_code == 404


def test_a_live_stream_ends_when_its_job_is_cancelled(smol_client):
    client = smol_client
    job_id = client.post("/v1/jobs", json=LONG).json["id"]
    wait_running(client, job_id)
    stream = client.get(f"/v1/jobs/{job_id}/stream", buffered=False)
    chunks = stream.response  # iterate the live body
    first = next(iter(chunks))
    assert first
    client.delete(f"/v1/jobs/{job_id}")
    rest = b"".join(chunks).decode()
    assert rest.rstrip().endswith("data: [DONE]")
    assert wait_job(client, job_id)["status"] == "cancelled"
