"""Batching through the real worker: concurrent jobs share engine calls, yet each job streams and
ends with exactly its own output (float32: see tests/tasks/test_batcher.py), and stops alone."""

import re
import threading
import time

import pytest

from engine import Model
from tests.conftest import TINY32_DB, make_client
from tests.helpers import generate, native_request, parse_sse, sse_text, wait_job

PROMPTS = [
    ("Tell me about the sea.", 200),
    ("hi", 60),
    ("Write a list of ten animals and what they eat, one per line.", 180),
    ("What is two plus two?", 120),
    ("A story about a fox", 150),
    ("Explain rain.", 90),
]


@pytest.fixture(scope="module")
def expected(tiny_dir):
    """Each job's output run alone, straight on the engine."""
    model = Model(tiny_dir, compute_type="float32")
    return lambda body: generate(model, native_request(body))


def submit_all(client, bodies: list[dict]) -> list[str]:
    return [client.post("/v1/jobs", json=body).json["id"] for body in bodies]


def engine_calls(worker) -> list[int]:
    return [int(n) for n in re.findall(r"engine call: (\d+) jobs", worker.output())]


def test_concurrent_jobs_share_engine_calls_and_each_streams_exactly_its_own_output(tiny32_worker, expected):
    client = make_client(TINY32_DB)
    calls_before = len(engine_calls(tiny32_worker))
    bodies = [{"prompt": p, "temperature": 0, "max_tokens": n} for p, n in PROMPTS]
    ids = submit_all(client, bodies)
    for job_id, body in zip(ids, bodies, strict=True):
        job = wait_job(client, job_id)
        assert job["status"] == "succeeded", job
        alone = expected(body)
        assert job["result"]["response"] == alone.response
        assert job["result"]["usage"] == alone.usage.to_dict()
        events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
        ids_seen = [int(e["id"]) for e in events if e["id"]]
        assert ids_seen == list(range(1, len(ids_seen) + 1))
        assert sse_text(events) == alone.response  # this job's chunks, all of them, and no other's
    assert max(engine_calls(tiny32_worker)[calls_before:]) >= 2  # they were batched


def test_cancelling_one_job_of_a_batch_stops_it_alone(tiny32_worker, expected):
    client = make_client(TINY32_DB)
    store = client.application.extensions["genqueue.jobs"].store
    bodies = [{"prompt": p, "temperature": 0, "max_tokens": 400} for p in ("one job", "two jobs", "three jobs")]
    ids = submit_all(client, bodies)
    deadline = time.monotonic() + 60
    while len(store.events(ids[1])) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert client.delete(f"/v1/jobs/{ids[1]}").status_code == 202
    jobs = [wait_job(client, job_id) for job_id in ids]

    assert [job["status"] for job in jobs] == ["succeeded", "cancelled", "succeeded"]
    cancelled = jobs[1]["result"]
    assert cancelled["finish_reason"] == "cancelled"
    assert cancelled["usage"]["completion_tokens"] < 400
    assert expected(bodies[1]).response.startswith(cancelled["response"])
    for job, body in [(jobs[0], bodies[0]), (jobs[2], bodies[2])]:
        assert job["result"]["response"] == expected(body).response
        assert job["result"]["usage"]["completion_tokens"] == 400


def test_jobs_submitted_from_many_clients_at_once_all_end_right(tiny32_worker, expected):
    bodies = [
        {"prompt": f"Job number {n}: say something.", "temperature": 0, "max_tokens": 40 + 10 * n} for n in range(8)
    ]
    results: dict[int, dict] = {}

    def one(n: int) -> None:
        client = make_client(TINY32_DB)
        results[n] = wait_job(client, client.post("/v1/jobs", json=bodies[n]).json["id"])

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == list(range(len(bodies)))
    for n, body in enumerate(bodies):
        assert results[n]["result"]["response"] == expected(body).response
