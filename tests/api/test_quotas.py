"""Quotas per API key and per queue, checked in the step that stores and queues the work, and the
refusal of a queue no live worker serves."""

import threading
import time

import pytest
import redis

import config
from api.auth import hash_key
from tasks.runtime.app import create_celery, task_message
from tasks.store import keys
from tasks.store.jobs import JobStore
from tasks.store.quotas import Limits
from tasks.store.states import JobState
from tests.conftest import SUBMIT_DB, TINY_DB, make_client, redis_url

ALICE, BOB = "gq_quota-alice", "gq_quota-bob"
KEYS = f"alice:{hash_key(ALICE)},bob:{hash_key(BOB)}"


def as_(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def quota_client():
    """No worker serves this database (the no-worker check is off, as make_client sets it): jobs stay queued."""
    redis.Redis.from_url(redis_url(SUBMIT_DB)).flushdb()
    return make_client(
        SUBMIT_DB,
        API_KEYS=KEYS,
        MAX_QUEUED_JOBS_PER_KEY=2,
        MAX_RUNNING_JOBS_PER_KEY=1,
        MAX_QUEUED_BATCH_ITEMS_PER_KEY=3,
        MAX_QUEUED_BATCH_ITEMS=5,
    )


def post(client, key: str, body: dict | None = None):
    return client.post("/v1/jobs", json=body or {"prompt": "wait"}, headers=as_(key))


def assert_refused(response, status: int, code: str, setting: str) -> None:
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code
    assert f"GENQUEUE_{setting}" in response.json["error"]["message"]  # the error names its limit
    assert int(response.headers["Retry-After"]) > 0


def test_past_its_queued_jobs_a_key_gets_429_and_other_keys_do_not(quota_client):
    first, _second = post(quota_client, ALICE), post(quota_client, ALICE)
    assert first.status_code == _second.status_code == 202
    assert_refused(post(quota_client, ALICE), 429, "too_many_queued_jobs", "MAX_QUEUED_JOBS_PER_KEY")
    assert post(quota_client, BOB).status_code == 202  # per key
    store = quota_client.application.extensions["genqueue.jobs"].store
    assert store.queue_depth("cpu") == 3  # the refused job left nothing behind
    assert quota_client.delete(f"/v1/jobs/{first.json['id']}", headers=as_(ALICE)).status_code == 200
    assert post(quota_client, ALICE).status_code == 202  # a cancelled job no longer counts


def test_past_its_running_jobs_a_key_gets_429(quota_client):
    job_id = post(quota_client, ALICE).json["id"]
    store = quota_client.application.extensions["genqueue.jobs"].store
    assert store.claim(job_id, "worker-1", 3) == "claimed"  # what a worker does: the job runs
    assert_refused(post(quota_client, ALICE), 429, "too_many_running_jobs", "MAX_RUNNING_JOBS_PER_KEY")
    assert post(quota_client, BOB).status_code == 202
    store.finish(job_id, 1, JobState.SUCCEEDED, result={"response": ""})
    assert post(quota_client, ALICE).status_code == 202  # ended: no longer running


def test_past_its_queued_batch_items_a_key_gets_429_and_the_batch_is_not_kept(quota_client):
    batch = {"requests": [{"prompt": "a"}, {"prompt": "b"}]}
    assert quota_client.post("/v1/batches", json=batch, headers=as_(ALICE)).status_code == 201
    refused = quota_client.post("/v1/batches", json=batch, headers=as_(ALICE))
    assert_refused(refused, 429, "too_many_queued_batch_items", "MAX_QUEUED_BATCH_ITEMS_PER_KEY")
    assert len(quota_client.get("/v1/batches", headers=as_(ALICE)).json["data"]) == 1  # discarded
    # The batch queue holds 2; bob's 3 would make 5, its depth limit; 4 more would pass it.
    assert (
        quota_client.post("/v1/batches", json={"requests": [{"prompt": "c"}] * 3}, headers=as_(BOB)).status_code == 201
    )
    over = quota_client.post("/v1/batches", json={"requests": [{"prompt": "d"}]}, headers=as_(BOB))
    assert_refused(over, 429, "batch_queue_full", "MAX_QUEUED_BATCH_ITEMS")
    redis_client = quota_client.application.extensions["genqueue.jobs"].store.redis
    assert redis_client.llen("cpu.batch") == 5


def test_the_limits_hold_under_concurrent_submissions():
    """Twenty threads race to submit for one owner with room for five: exactly five get in."""
    url = redis_url(SUBMIT_DB)
    store = JobStore.from_url(url)
    store.redis.flushdb()
    celery = create_celery(config.load(REDIS_URL=url))
    outcomes: list[bool] = []
    start = threading.Barrier(20)

    def submit(n: int) -> None:
        job_id = f"job_race_{n}"
        message = task_message(celery, job_id, "cpu")
        start.wait()
        submitted = store.submit(job_id, {"prompt": "hi"}, "cpu", "alice", message, limits=Limits(owner_queued=5))
        outcomes.append(submitted.record is not None)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 5 and store.queue_depth("cpu") == 5


def test_a_queue_no_live_worker_serves_refuses_new_jobs_naming_it(tiny_worker):
    client = make_client(TINY_DB, NO_WORKER_GRACE_S=30)  # the default: the check on
    assert client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 2}).status_code == 202  # cpu is served
    refused = client.post("/v1/jobs", json={"prompt": "hi", "queue": "gpu"})
    assert refused.status_code == 503 and refused.json["error"]["code"] == "no_worker"
    assert (
        "'gpu' queue" in refused.json["error"]["message"]
        and "GENQUEUE_NO_WORKER_GRACE_S" in refused.json["error"]["message"]
    )
    assert int(refused.headers["Retry-After"]) > 0
    gpu_api = make_client(TINY_DB, NO_WORKER_GRACE_S=30, DEFAULT_QUEUE="gpu")
    redis_client = gpu_api.application.extensions["genqueue.jobs"].store.redis
    batches_before = redis_client.zcard(keys.owner_batches(""))
    batch = gpu_api.post("/v1/batches", json={"requests": [{"prompt": "a"}]})
    assert batch.status_code == 503 and batch.json["error"]["code"] == "no_worker"
    assert redis_client.zcard(keys.owner_batches("")) == batches_before  # refused: not kept


def test_a_queue_whose_worker_stopped_beating_is_refused_only_after_the_grace():
    redis_client = redis.Redis.from_url(redis_url(SUBMIT_DB), decode_responses=True)
    redis_client.flushdb()
    client = make_client(SUBMIT_DB, NO_WORKER_GRACE_S=20)
    redis_client.set(keys.queue_seen("cpu"), repr(time.time() - 10))  # its last worker beat 10 s ago
    assert client.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202  # within the grace
    redis_client.set(keys.queue_seen("cpu"), repr(time.time() - 25))
    refused = client.post("/v1/jobs", json={"prompt": "hi"})
    assert refused.status_code == 503 and refused.json["error"]["code"] == "no_worker"
    assert redis_client.llen("cpu") == 1  # nothing piled up
