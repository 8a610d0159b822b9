"""A real Redis with maxmemory and noeviction: the API refuses new work with a clear 503 before Redis
is full, never evicts what it accepted, and says the same if Redis itself refuses a write."""

import pytest
import redis

from api import create_app
from genqueue.launcher import RedisServer

PROMPT = "x" * 20_000


@pytest.fixture
def small_redis(redis_server_binary, tmp_path):
    server = RedisServer(data_dir=tmp_path, binary=redis_server_binary)
    client = redis.Redis.from_url(server.url())
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 1_500_000)
    client.config_set("maxmemory-policy", "noeviction")
    yield server
    server.stop()


def fill(client, limit: int = 200) -> tuple[list[str], object]:
    """Submit jobs until one is refused: (the accepted ids, the refusal)."""
    accepted = []
    for _ in range(limit):
        response = client.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 1})
        if response.status_code != 202:
            return accepted, response
        accepted.append(response.json["id"])
    raise AssertionError(f"{limit} jobs accepted: Redis never filled up")


@pytest.mark.parametrize("high_water", [0.9, 2.0])  # 2.0: the API never refuses first, so Redis does
def test_a_full_redis_refuses_new_jobs_with_a_clear_503_and_keeps_the_accepted_ones(small_redis, high_water):
    settings = {"REDIS_URL": small_redis.url(), "REDIS_HIGH_WATER": high_water, "NO_WORKER_GRACE_S": 0}  # no worker
    client = create_app({"TESTING": True, **settings})
    client = client.test_client()
    accepted, refused = fill(client)
    assert len(accepted) >= 5
    assert refused.status_code == 503, refused.json
    assert refused.json["error"]["code"] == "store_full" and "full" in refused.json["error"]["message"]
    assert int(refused.headers["Retry-After"]) > 0
    if high_water < 1:  # refused by the API's own check, before Redis had to refuse a write
        assert "maxmemory in use, over 90%" in refused.json["error"]["message"]
    for job_id in accepted:  # nothing was evicted to make room
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    # A batch too: at once under the high-water mark; when Redis itself refuses, it may first have room
    # for a small write (a refused request's buffers are freed), so batches go on until one is refused.
    for _ in range(50):
        batch = client.post("/v1/batches", json={"requests": [{"prompt": PROMPT, "max_tokens": 1}]})
        if batch.status_code != 201:
            break
    assert batch.status_code == 503 and batch.json["error"]["code"] == "store_full", batch.json
