"""Cancellation through the API and a real worker."""

import time

import redis

from tests.conftest import HELD_DB, WorkerProcess, make_client, redis_url
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
    store = client.application.extensions["genqueue.jobs"].store
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
    # Cancelling again is a 409 (the job has ended), as for any ended job; the worker serves the next job.
    again = client.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 409 and again.json["error"]["code"] == "job_already_ended"
    assert (
        wait_job(client, client.post("/v1/jobs", json={"prompt": "next", "max_tokens": 3}).json["id"])["status"]
        == "succeeded"
    )


def test_a_queued_job_never_runs(smollm2_dir):
    # A worker with one slot, held by a long job: the victim waits in the very queue that worker consumes.
    redis.Redis.from_url(redis_url(HELD_DB)).flushdb()
    worker = WorkerProcess(smollm2_dir, HELD_DB, concurrency=1, max_batch_size=1)
    try:
        client = make_client(HELD_DB)
        store = client.application.extensions["genqueue.jobs"].store
        blocker = client.post("/v1/jobs", json=LONG).json["id"]
        assert wait_running(client, blocker)["status"] == "running"
        victim = client.post("/v1/jobs", json={"prompt": "victim", "max_tokens": 8}).json["id"]
        response = client.delete(f"/v1/jobs/{victim}")
        assert response.status_code == 200 and response.json["status"] == "cancelled"
        assert client.delete(f"/v1/jobs/{victim}").status_code == 409  # a second DELETE: the job has ended
        assert client.get(f"/v1/jobs/{blocker}").json["status"] == "running"  # the victim was still waiting
        # Let the worker drain: the blocker stops, then the worker takes the victim's message and a
        # job queued after it, which runs.
        assert client.delete(f"/v1/jobs/{blocker}").status_code == 202
        after = client.post("/v1/jobs", json={"prompt": "after", "max_tokens": 3}).json["id"]
        assert wait_job(client, after)["status"] == "succeeded", worker.output()[-3000:]
        job = client.get(f"/v1/jobs/{victim}").json
        assert job["status"] == "cancelled" and job["started_at"] is None and job["result"] is None
        assert store.get(victim).attempts == 0
        assert [event["type"] for event in store.events(victim)] == ["end"]  # no chunk
        events = parse_sse(client.get(f"/v1/jobs/{victim}/stream").get_data(as_text=True))
        assert [e["data"] for e in events][-1] == "[DONE]" and sse_text(events) == ""
        # The worker took the victim's message and refused it: it never ran there.
        named = [line.split("] ", 1)[-1] for line in worker.output().splitlines() if victim in line]
        assert named == [f"job {victim}: not run (cancelled)"], named
    finally:
        worker.stop()


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
