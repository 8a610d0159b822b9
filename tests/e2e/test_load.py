"""Load: 1,000 jobs from 50 concurrent clients over HTTP (gunicorn) through a real worker."""

import json
import statistics
import threading
import time
import urllib.request

import pytest

from genqueue.launcher import ApiProcess
from tests.conftest import REPO, TINY_DB, redis_url

CLIENTS, JOBS_PER_CLIENT = 50, 20


@pytest.fixture(scope="module")
def api_url(tiny_worker):
    api = ApiProcess({"redis_url": redis_url(TINY_DB), "max_queued_jobs": 100000}, cwd=REPO).wait_ready()
    yield api.url
    api.stop()


def call(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, json.load(response)


def test_a_thousand_jobs_from_fifty_clients_all_complete_each_with_its_own_result(api_url, tiny_dir):
    from engine import GenerationRequest
    from engine.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer(tiny_dir)
    latencies: list[float] = []
    outcomes: list[tuple[dict, int, dict]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        try:
            mine = []
            for i in range(JOBS_PER_CLIENT):
                # Prompt length and max_tokens vary per request, so a result shows whose it is.
                body = {
                    "prompt": f"client {number} job {i} " + "word " * (i % 7),
                    "raw": True,
                    "temperature": 0,
                    "max_tokens": 1 + (number + i) % 5,
                }
                started = time.perf_counter()
                status, job = call("POST", f"{api_url}/v1/jobs", body)
                with lock:
                    latencies.append(time.perf_counter() - started)
                assert status == 202
                mine.append((body, job["id"]))
            for body, job_id in mine:
                _status, job = call("GET", f"{api_url}/v1/jobs/{job_id}?wait=60")
                with lock:
                    outcomes.append((body, job_id, job))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.perf_counter() - started
    assert not errors, errors[:3]
    assert len(outcomes) == CLIENTS * JOBS_PER_CLIENT
    assert len({job_id for _b, job_id, _j in outcomes}) == len(outcomes)  # no job duplicated or merged

    from tasks.store.jobs import JobStore

    store = JobStore.from_url(redis_url(TINY_DB))
    for body, job_id, job in outcomes:
        assert job["status"] == "succeeded", job
        record = store.get(job_id)
        assert record.request["prompt"] == body["prompt"]  # the job is the one this client sent
        usage = job["result"]["usage"]
        assert usage["completion_tokens"] == body["max_tokens"] or job["result"]["finish_reason"] == "stop"
        assert usage["prompt_tokens"] == len(tokenizer.encode(GenerationRequest(prompt=body["prompt"], raw=True)))
    ordered = sorted(latencies)
    p50, p99 = statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]
    print(
        f"\n{len(outcomes)} jobs from {CLIENTS} clients in {elapsed:.1f}s; "
        f"submit latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
