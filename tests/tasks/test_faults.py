"""Faults with real processes: a worker killed mid-job, graceful shutdown."""

import os
import signal
import time

import pytest

from tests.conftest import FAULT_DB, WorkerProcess, make_client
from tests.helpers import parse_sse, sse_text, wait_job

# Short redelivery settings so a dead worker's job comes back within seconds.
# The first worker runs on one thread, so the kill surely lands mid-job even on a loaded machine.
FAST_REDELIVERY = {"visibility_timeout_s": 30, "redelivery_check_s": 1, "job_time_limit_s": 25}
JOB = {"prompt": "Write a story about a lighthouse keeper.", "temperature": 0, "max_tokens": 64}


@pytest.fixture
def fault_db():
    import redis

    from tests.conftest import redis_url

    redis.Redis.from_url(redis_url(FAULT_DB)).flushdb()
    return FAULT_DB


def test_a_job_of_a_killed_worker_completes_on_another(smollm2_dir, fault_db):
    client = make_client(fault_db)
    first = WorkerProcess(smollm2_dir, fault_db, concurrency=1, intra_threads=1, **FAST_REDELIVERY)
    job_id = client.post("/v1/jobs", json=JOB).json["id"]
    store = client.application.extensions["genqueue.store"]
    while len(store.events(job_id)) < 3:  # it is generating on the first worker
        time.sleep(0.02)
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait()
    second = WorkerProcess(smollm2_dir, fault_db, concurrency=1, **FAST_REDELIVERY)
    try:
        job = wait_job(client, job_id, timeout_s=60)
        if job["status"] != "succeeded":  # redelivery takes visibility_timeout_s, then a heartbeat TTL
            job = wait_job(client, job_id, timeout_s=60)
        assert job["status"] == "succeeded", (job, second.output())
        record = store.get(job_id)
        assert record.attempts == 2
        # The replay log holds each chunk once, and they add up to the stored response.
        events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
        assert sse_text(events) == job["result"]["response"]
        ids = [e["id"] for e in events if e["id"]]
        assert ids == [str(i) for i in range(1, len(ids) + 1)]
    finally:
        second.stop()
    first.log.close()


def test_sigterm_lets_the_running_job_finish(smollm2_dir, fault_db):
    client = make_client(fault_db)
    worker = WorkerProcess(smollm2_dir, fault_db, concurrency=1)
    job_id = client.post("/v1/jobs", json=JOB).json["id"]
    store = client.application.extensions["genqueue.store"]
    while len(store.events(job_id)) < 2:
        time.sleep(0.02)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=60) == 0
    job = wait_job(client, job_id, timeout_s=1)
    assert job["status"] == "succeeded"
    assert job["result"]["usage"]["completion_tokens"] == JOB["max_tokens"]
    worker.log.close()
