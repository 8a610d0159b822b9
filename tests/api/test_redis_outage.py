"""A real redis-server stopped and restarted: the API answers 503, then API and worker recover; queued
jobs survive a restart (AOF); a worker holding an unacknowledged job lives through the outage."""

import time

import pytest

from genqueue.launcher import RedisServer
from tasks.store import keys
from tests.conftest import WorkerProcess
from tests.helpers import parse_sse, sse_text, wait_job

PROMPT_503_S = 5  # "at once": a refused connection, not a timeout (generous for a loaded 2-core machine)


@pytest.fixture
def own_redis(redis_server_binary, tmp_path):
    server = RedisServer(data_dir=tmp_path, appendonly=True, binary=redis_server_binary)
    yield server
    server.stop()


def test_api_answers_503_while_redis_is_down_and_everything_recovers(own_redis, tiny_dir):
    from api import create_app

    url = own_redis.url(0)
    worker = WorkerProcess(tiny_dir, 0, redis_base=url.rsplit("/", 1)[0])
    client = create_app({"TESTING": True, "REDIS_URL": url}).test_client()
    try:
        done = client.post("/v1/jobs", json={"prompt": "before", "max_tokens": 3}).json["id"]
        assert wait_job(client, done)["status"] == "succeeded"

        own_redis.stop()
        started = time.monotonic()
        response = client.post("/v1/jobs", json={"prompt": "during", "max_tokens": 3})
        assert time.monotonic() - started < PROMPT_503_S
        assert response.status_code == 503
        assert response.json["error"]["code"] == "queue_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        assert client.get(f"/v1/jobs/{done}").status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json["redis"]
        assert client.get("/healthz").status_code == 200
        assert time.monotonic() - started < 4 * PROMPT_503_S  # each answered promptly, none hangs

        own_redis = own_redis.restart()  # same port and data directory: the AOF brings jobs back
        assert client.get(f"/v1/jobs/{done}").json["status"] == "succeeded"
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:  # the worker reconnects and beats again
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.5)
        after = client.post("/v1/jobs", json={"prompt": "after", "max_tokens": 3})
        assert after.status_code == 202
        assert wait_job(client, after.json["id"])["status"] == "succeeded", worker.output()
    finally:
        worker.stop()
        own_redis.stop()


def test_a_redis_restart_keeps_queued_jobs_and_they_then_run(own_redis, tiny_dir):
    from api import create_app

    url = own_redis.url(0)
    # The worker starts after the jobs are queued: the refusal of jobs no worker would run is off.
    client = create_app({"TESTING": True, "REDIS_URL": url, "NO_WORKER_GRACE_S": 0}).test_client()
    jobs = [client.post("/v1/jobs", json={"prompt": f"kept {i}", "max_tokens": 3}).json["id"] for i in range(3)]
    assert [client.get(f"/v1/jobs/{job_id}").json["status"] for job_id in jobs] == ["queued"] * 3  # no worker yet
    own_redis = own_redis.restart()  # the same port and data directory: the append-only file is read back
    try:
        assert [client.get(f"/v1/jobs/{job_id}").json["status"] for job_id in jobs] == ["queued"] * 3
        assert client.application.extensions["genqueue.jobs"].store.queue_depth("cpu") == 3  # their messages too
        worker = WorkerProcess(tiny_dir, 0, redis_base=url.rsplit("/", 1)[0])
        try:
            assert [wait_job(client, job_id)["status"] for job_id in jobs] == ["succeeded"] * 3, worker.output()
        finally:
            worker.stop()
    finally:
        own_redis.stop()


def test_a_worker_holding_an_unacknowledged_job_lives_through_an_outage_and_ends_the_job(own_redis, smollm2_dir):
    from api import create_app

    url = own_redis.url(0)
    # A free slot besides the job, so the consumer is polling when Redis goes (the usual case); messages
    # not acknowledged come back after 15 s, looked for every second.
    redelivery = {"visibility_timeout_s": 15, "job_time_limit_s": 14, "redelivery_check_s": 1}
    worker = WorkerProcess(smollm2_dir, 0, redis_base=url.rsplit("/", 1)[0], concurrency=2, **redelivery)
    client = create_app({"TESTING": True, "REDIS_URL": url}).test_client()
    store = client.application.extensions["genqueue.jobs"].store
    try:
        body = {"prompt": "Write a story about a lighthouse keeper.", "temperature": 0, "max_tokens": 100}
        job_id = client.post("/v1/jobs", json=body).json["id"]
        deadline = time.monotonic() + 60
        while len(store.events(job_id)) < 3:  # generating: its message is delivered and not acknowledged
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.02)
        own_redis.stop()
        deadline = time.monotonic() + 60
        while "Connection to broker lost" not in worker.output():  # Celery closed the job's channel
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.1)
        own_redis = own_redis.restart()
        job = wait_job(client, job_id)
        assert job["status"] == "succeeded", worker.output()[-3000:]
        assert job["result"]["usage"]["completion_tokens"] == 100
        events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
        assert sse_text(events) == job["result"]["response"]  # every chunk logged once, in order
        after = client.post("/v1/jobs", json={"prompt": "after", "max_tokens": 3}).json["id"]
        assert wait_job(client, after)["status"] == "succeeded", worker.output()[-3000:]
        # The job's message, never acknowledged on the closed channel, leaves the unacked hash: the recovery
        # sweep drops it (its job has ended), or it comes back after the visibility timeout and runs nothing.
        deadline = time.monotonic() + 60
        while store.redis.hlen(keys.BROKER_UNACKED):
            worker.check()  # alive throughout: kombu alone dies acknowledging on the closed channel
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.2)
        assert store.get(job_id).attempts == 1
        worker.check()
    finally:
        worker.stop()
        own_redis.stop()
