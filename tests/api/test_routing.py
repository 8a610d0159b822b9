"""Routing: a job goes to the queue it names, else to the GPU queue while a GPU worker is alive,
else to the default queue; each queue's workers are real processes."""

import time

import pytest
import redis

from tasks.store import keys
from tests.conftest import ROUTING_DB, WorkerProcess, make_client, redis_url
from tests.helpers import wait_job

JOB = {"prompt": "route me", "temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def workers(tiny_dir):
    redis.Redis.from_url(redis_url(ROUTING_DB)).flushdb()
    started = {}
    try:
        for queue in ("cpu", "gpu"):  # a "gpu" worker here is a CPU process consuming the gpu queue
            started[queue] = WorkerProcess(tiny_dir, ROUTING_DB, queue=queue, concurrency=2)
        yield started
    finally:
        for worker in started.values():
            worker.stop()


def run(client, body: dict) -> tuple[dict, str]:
    """Submit, wait; the job, and the pid of the worker that ran it."""
    job = wait_job(client, client.post("/v1/jobs", json=body).json["id"])
    holder = client.application.extensions["genqueue.jobs"].store.redis.hget(keys.job(job["id"]), "worker")
    return job, holder.rsplit(":", 1)[1]


def test_jobs_go_to_the_gpu_queue_while_a_gpu_worker_is_alive(workers):
    client = make_client(ROUTING_DB)
    job, pid = run(client, JOB)
    assert job["status"] == "succeeded"
    assert pid == str(workers["gpu"].process.pid)
    assert client.application.extensions["genqueue.jobs"].store.get(job["id"]).queue == "gpu"


def test_a_request_may_name_its_queue(workers):
    client = make_client(ROUTING_DB)
    for queue in ("cpu", "gpu"):
        job, pid = run(client, {**JOB, "queue": queue})
        assert job["status"] == "succeeded"
        assert pid == str(workers[queue].process.pid)


def test_an_unknown_queue_is_400_naming_the_field(workers):
    response = make_client(ROUTING_DB).post("/v1/jobs", json={**JOB, "queue": "tpu"})
    assert response.status_code == 400
    assert "Must be one of: cpu, gpu" in response.json["error"]["fields"]["queue"][0]


def test_without_a_live_gpu_worker_jobs_go_to_the_default_queue(workers):
    client = make_client(ROUTING_DB)
    registry = client.application.extensions["genqueue.jobs"].registry
    gpu = [w.id for w in registry.live() if w.serves("gpu")]
    assert gpu and all(w.endswith(f":{workers['gpu'].process.pid}") for w in gpu)
    workers["gpu"].process.kill()  # kill -9: its entry stays until its heartbeat expires
    workers["gpu"].stop()
    now = time.time()
    assert all(now < registry.redis.zscore(keys.WORKERS, w) <= now + 15 for w in gpu)  # it would expire
    registry.redis.zadd(keys.WORKERS, {w: now - 1 for w in gpu})  # what its expiry does, without waiting for it
    job, pid = run(client, JOB)
    assert job["status"] == "succeeded"
    assert pid == str(workers["cpu"].process.pid)
