"""A real redis-server stopped and restarted: the API answers 503, then API and worker recover."""

import subprocess
import time

import pytest
import redis

from tests.conftest import WorkerProcess
from tests.helpers import wait_job

PORT = 6399


def start_redis(binary: str, data_dir) -> None:
    subprocess.run(
        [
            binary,
            "--daemonize",
            "yes",
            "--port",
            str(PORT),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        check=True,
    )
    client = redis.Redis(port=PORT)
    for _ in range(100):
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def stop_redis() -> None:
    try:
        redis.Redis(port=PORT).shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # shutdown closes the connection
    client = redis.Redis(port=PORT)
    for _ in range(100):
        try:
            client.ping()
            time.sleep(0.05)
        except redis.ConnectionError:
            return


@pytest.fixture
def own_redis(redis_server_binary, tmp_path):
    start_redis(redis_server_binary, tmp_path)
    yield tmp_path
    stop_redis()


def test_api_answers_503_while_redis_is_down_and_everything_recovers(own_redis, redis_server_binary, tiny_dir):
    from api import create_app

    url = f"redis://127.0.0.1:{PORT}/0"
    worker = WorkerProcess(tiny_dir, 0, redis_base=f"redis://127.0.0.1:{PORT}")
    client = create_app({"TESTING": True, "REDIS_URL": url}).test_client()
    try:
        done = client.post("/v1/jobs", json={"prompt": "before", "max_tokens": 3}).json["id"]
        assert wait_job(client, done)["status"] == "succeeded"

        stop_redis()
        started = time.monotonic()
        response = client.post("/v1/jobs", json={"prompt": "during", "max_tokens": 3})
        assert response.status_code == 503
        assert response.json["error"]["code"] == "queue_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        assert client.get(f"/v1/jobs/{done}").status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json["redis"]
        assert client.get("/healthz").status_code == 200
        assert time.monotonic() - started < 15  # answers promptly, never hangs

        start_redis(redis_server_binary, own_redis)  # same data directory: the AOF brings jobs back
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
