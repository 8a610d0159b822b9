"""No job is stored without being queued: a job's record and its broker message are written in one
atomic step, a batch's items are queued a chunk per step, and a batch whose submitting process died
is finished by the sweeper. Real Redis; the crash tests kill real processes with SIGKILL."""

import base64
import json
import signal
import subprocess
import sys
import time

import pytest
import redis

import config
from tasks.runtime.app import GENERATE_TASK, WEBHOOK_TASK, batch_queue, create_celery, job_of_message, task_message
from tasks.runtime.recovery import Recovery
from tasks.runtime.submission import SubmissionSweeper, finish_stalled
from tasks.store import keys, lost
from tasks.store.deliveries import Deliveries
from tasks.store.jobs import JobStore
from tasks.store.quotas import Limits
from tasks.store.registry import WorkerRegistry
from tasks.store.states import BatchState, JobState
from tests.conftest import REPO, SUBMIT_DB, redis_url

URL = redis_url(SUBMIT_DB)


@pytest.fixture
def store():
    jobs = JobStore.from_url(URL, ttl_s=600)
    jobs.redis.flushdb()
    return jobs


@pytest.fixture(scope="module")
def celery():
    return create_celery(config.load(REDIS_URL=URL))


def queued_ids(client: redis.Redis, queue: str) -> list[str]:
    """The job id each message in a queue's broker list carries (the task's one argument)."""
    ids = []
    for raw in client.lrange(keys.broker_queue(queue), 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["properties"] and message["body"]))
        assert message["headers"]["task"] == GENERATE_TASK
        ids.append(args[0])
    return ids


def test_a_job_message_is_the_one_kombu_itself_publishes(store, celery):
    celery.send_task(GENERATE_TASK, args=["job_kombu"], queue="probe", ignore_result=True)  # kombu's own producer
    published = json.loads(store.redis.lpop("probe"))
    ours = json.loads(task_message(celery, "job_kombu", "probe"))
    ids = ("id", "root_id", "correlation_id", "delivery_tag", "reply_to", "origin")

    def masked(message: dict) -> dict:
        headers = {k: v for k, v in message["headers"].items() if k not in ids}
        properties = {k: v for k, v in message["properties"].items() if k not in ids}
        return {**message, "headers": headers, "properties": properties}

    assert masked(ours) == masked(published)
    assert list(ours["properties"]) == list(published["properties"])  # the same envelope, field for field
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]


def deliver(store: JobStore, queue: str, age_s: float) -> dict:
    """Take the next message of a queue as kombu's Redis transport delivers it: into the unacked hash,
    its delivery time in the index (`age_s` ago). Returns the message."""
    raw = store.redis.rpop(keys.broker_queue(queue))
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    store.redis.zadd(keys.BROKER_UNACKED_INDEX, {tag: time.time() - age_s})
    store.redis.hset(keys.BROKER_UNACKED, tag, json.dumps([message, "", queue]))
    return message


def test_a_delivered_message_whose_job_is_still_queued_long_after_goes_back_on_its_queue(store, celery):
    for job_id in ("old", "new", "claimed", "ended", "gone"):
        store.submit(job_id, {"prompt": "hi"}, "cpu", "", task_message(celery, job_id, "cpu"))
    old, new, claimed, ended, gone = (deliver(store, "cpu", age) for age in (60, 0, 60, 60, 60))
    assert store.claim("claimed", "w1", 3) == "claimed"
    assert store.cancel("ended") is JobState.CANCELLED
    store.delete("gone")  # expired
    other = json.loads(task_message(celery, "x", "cpu")) | {"headers": {"task": WEBHOOK_TASK}}
    store.redis.hset(keys.BROKER_UNACKED, "other", json.dumps([other, "", "cpu"]))
    store.redis.zadd(keys.BROKER_UNACKED_INDEX, {"other": 0})

    swept = Deliveries(store.redis).sweep(10, job_of_message)

    assert swept.requeued == ["old"] and sorted(swept.dropped) == ["ended", "gone"]
    assert queued_ids(store.redis, "cpu") == ["old"]
    back = json.loads(store.redis.lindex("cpu", 0))
    assert back["properties"]["delivery_tag"] != old["properties"]["delivery_tag"]  # a tag of its own
    assert back["properties"]["delivery_info"]["redelivered"] and back["body"] == old["body"]
    # Left alone: one delivered just now, one whose job runs, and one that is not a job's.
    left = {new["properties"]["delivery_tag"], claimed["properties"]["delivery_tag"], "other"}
    assert set(store.redis.hkeys(keys.BROKER_UNACKED)) == left
    assert set(store.redis.zrange(keys.BROKER_UNACKED_INDEX, 0, -1)) == left
    assert Deliveries(store.redis).sweep(10, job_of_message) == ([], [])  # once


def test_a_queued_job_whose_message_is_nowhere_is_found_and_given_a_new_one(store, celery, monkeypatch):
    sent = {}
    for job_id in ("lost", "reserved", "waiting", "claimed", "cancelled", "young", "gone"):
        sent[job_id] = task_message(celery, job_id, "cpu")
        store.submit(job_id, {"prompt": "hi"}, "cpu", "", sent[job_id])
    assert json.loads(store.redis.rpop("cpu"))["headers"]["argsrepr"] == "['lost']"  # a worker took it, died
    deliver(store, "cpu", 0)  # "reserved": in the unacked hash
    assert store.claim("claimed", "w1", 3) == "claimed"
    assert store.cancel("cancelled") is JobState.CANCELLED
    store.redis.lrem("cpu", 1, sent["young"])  # lost too, but queued after the cutoff
    store.delete("gone")  # expired
    index = keys.queued("cpu")
    assert set(store.redis.zrange(index, 0, -1)) == {"lost", "reserved", "waiting", "young", "gone"}
    messages = lost.LostMessages(store.redis)
    now = messages.now()
    store.redis.zadd(index, {job_id: now - 60 for job_id in ("lost", "reserved", "waiting", "gone")})
    cutoff = now - 30

    assert messages.missing("cpu", cutoff, job_of_message) == ["lost"]
    assert set(store.redis.zrange(index, 0, -1)) == {"lost", "reserved", "waiting", "young"}  # "gone" forgotten
    assert messages.missing("cpu.batch", cutoff, job_of_message) == []  # another list, another index
    with monkeypatch.context() as patched:
        patched.setattr(lost, "SCAN_LIMIT", 2)  # the list holds more than that: it waits
        assert messages.missing("cpu", cutoff, job_of_message) == []

    assert messages.requeue("lost", "cpu", task_message(celery, "lost", "cpu"), cutoff)
    assert queued_ids(store.redis, "cpu")[-1] == "lost"  # at the end kombu takes from next
    assert not messages.requeue("lost", "cpu", task_message(celery, "lost", "cpu"), cutoff)  # pushed once
    assert messages.missing("cpu", cutoff, job_of_message) == []
    assert messages.missing("cpu", messages.now() + 1, job_of_message) == ["young"]
    assert not messages.requeue("claimed", "cpu", task_message(celery, "claimed", "cpu"), cutoff)  # it runs
    assert queued_ids(store.redis, "cpu").count("lost") == 1 and queued_ids(store.redis, "cpu").count("claimed") == 1


def test_the_recovery_sweep_pushes_a_lost_message_only_after_two_searches_onto_its_own_list(store, celery):
    batch_list = batch_queue("cpu")
    store.submit("item", {"prompt": "hi"}, "cpu", "", task_message(celery, "item", batch_list))
    store.redis.delete("cpu")  # submit pushed it onto "cpu": move it to the batch list, as a batch's item
    store.redis.hset(keys.job("item"), "broker_list", batch_list)
    store.redis.delete(keys.queued("cpu"))
    store.redis.zadd(keys.queued(batch_list), {"item": 0})  # and long ago; then its message was lost
    pushed = []

    def message_for(job_id: str, broker_list: str) -> str:
        pushed.append((job_id, broker_list))
        return task_message(celery, job_id, broker_list)

    registry = WorkerRegistry(store.redis)
    recovery = Recovery(store, registry, "w1", lambda *_: None, 1, 10, ["cpu", batch_list], message_for)
    recovery.sweep()
    assert pushed == [] and store.redis.llen(batch_list) == 0  # once missing: maybe in a worker's hands
    recovery._next_lost_search = 0  # the next search is due
    recovery.sweep()
    assert pushed == [("item", batch_list)] and queued_ids(store.redis, batch_list) == ["item"]
    assert json.loads(store.redis.lindex(batch_list, 0))["properties"]["delivery_info"]["routing_key"] == batch_list
    recovery._next_lost_search = 0
    recovery.sweep()
    assert pushed == [("item", batch_list)]  # found on its list now


def test_a_job_is_stored_if_and_only_if_its_message_is_queued(store, celery):
    limits = Limits(queue_depth=2)
    for job_id in ("job_a", "job_b"):
        submitted = store.submit(
            job_id, {"prompt": "hi"}, "cpu", "alice", task_message(celery, job_id, "cpu"), limits=limits
        )
        assert submitted.record is not None and submitted.record.status is JobState.QUEUED
    refused = store.submit(
        "job_c", {"prompt": "hi"}, "cpu", "alice", task_message(celery, "job_c", "cpu"), limits=limits
    )
    assert refused.record is None and refused.refusal.limit == "queue_depth" and refused.refusal.maximum == 2
    assert sorted(queued_ids(store.redis, "cpu")) == ["job_a", "job_b"]
    assert store.get("job_c") is None  # refused: nothing written, not even its listing
    assert store.redis.zrange(keys.owner_jobs("alice"), 0, -1) == ["job_a", "job_b"]


def test_an_idempotency_key_is_bound_in_the_same_step_and_never_names_a_missing_job(store, celery):
    def submit(job_id: str):
        message = task_message(celery, job_id, "cpu")
        return store.submit(job_id, {"prompt": "hi"}, "cpu", "alice", message, idempotency=("key", "body"))

    assert submit("job_first").record is not None
    again = submit("job_second")
    assert again.record is None and again.bound == {"job_id": "job_first", "body": "body"}
    assert queued_ids(store.redis, "cpu") == ["job_first"] and store.get("job_second") is None
    store.redis.delete(keys.job("job_first"))  # its record expired before the binding: the key is free
    assert submit("job_third").record is not None
    assert store.redis.get(keys.idempotency("alice", "key")) == json.dumps({"job_id": "job_third", "body": "body"})


SUBMITTER = """
import sys
import config
from tasks.runtime.app import create_celery, task_message
from tasks.store.jobs import JobStore
store, celery = JobStore.from_url(sys.argv[1]), create_celery(config.load(REDIS_URL=sys.argv[1]))
n = 0
while True:
    n += 1
    job_id = f"job_{sys.argv[2]}_{n}"
    store.submit(job_id, {"prompt": "hi"}, "cpu", "", task_message(celery, job_id, "cpu"), idempotency=(job_id, "b"))
"""


def test_a_submitter_killed_at_any_moment_leaves_no_job_without_its_message(store):
    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", SUBMITTER, URL, str(round_)], cwd=REPO)
        deadline = time.monotonic() + 60
        while store.redis.llen("cpu") < 200 * (round_ + 1):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.01)
        time.sleep(0.001 * round_)
        child.send_signal(signal.SIGKILL)
        child.wait()
    stored = {key.split(":")[2] for key in store.redis.scan_iter(keys.job("*")) if key.count(":") == 2}
    queued = queued_ids(store.redis, "cpu")
    assert len(queued) == len(set(queued))  # each once
    assert stored == set(queued)
    bound = {json.loads(store.redis.get(key))["job_id"] for key in store.redis.scan_iter(keys.idempotency("", "*"))}
    assert bound == stored  # every bound key names a job that is queued


BATCH_SUBMITTER = """
import sys, time
from api import create_app
from tasks.store.batches import BatchRequest

url, total, pause_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
settings = {"NO_WORKER_GRACE_S": 0, "BATCH_MAX_ITEMS": total, "STALE_SUBMISSION_S": 1, "BODY_TIMEOUT_S": 1}
app = create_app({"REDIS_URL": url, **settings})

def requests():
    for index in range(total):
        if index == pause_after:
            print("paused", flush=True)
            time.sleep(600)  # a client that stops sending: the parent kills this process here
        yield index, BatchRequest(f"c{index}", {"prompt": f"p{index}", "max_tokens": 2})

app.extensions["genqueue.batches"].create(requests(), "requests", "", {})
"""


def batch_submitter(total: int, pause_after: int = -1) -> subprocess.Popen:
    argv = [sys.executable, "-c", BATCH_SUBMITTER, URL, str(total), str(pause_after)]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)


def only_batch(client: redis.Redis) -> str:
    (batch_id,) = client.zrange(keys.owner_batches(""), 0, -1)
    return batch_id


def test_a_batch_whose_api_died_while_queueing_it_is_queued_to_its_end_by_the_sweeper(store):
    total = 20_000
    child = batch_submitter(total)
    deadline = time.monotonic() + 120

    def queueing_part_way() -> bool:
        batches = store.redis.zrange(keys.owner_batches(""), 0, -1)
        return bool(batches) and 0 < int(store.redis.hget(keys.batch(batches[0]), "queued") or 0) < total // 2

    while not queueing_part_way():
        assert time.monotonic() < deadline and child.poll() is None, "the batch was never caught while being queued"
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)  # part of its items are queued, the rest never will be by it
    child.wait()
    batch_id = only_batch(store.redis)
    queued = int(store.redis.hget(keys.batch(batch_id), "queued"))
    assert 0 < queued < total and store.redis.llen(batch_queue("cpu")) == queued
    sweeper = SubmissionSweeper(config.load(REDIS_URL=URL, STALE_SUBMISSION_S=1, BODY_TIMEOUT_S=1), store)
    assert sweeper.sweep() == 0  # not stalled yet (STALE_SUBMISSION_S): its API might only be slow
    time.sleep(1.1)
    assert sweeper.sweep() == 1
    assert sweeper.sweep() == 0  # done: nothing left to sweep
    ids = queued_ids(store.redis, batch_queue("cpu"))
    assert len(ids) == total and set(ids) == {keys.batch_item(batch_id, i) for i in range(total)}  # each once
    assert sweeper.store.get(batch_id).status is BatchState.IN_PROGRESS


def test_a_batch_whose_api_died_while_reading_it_fails_and_queues_nothing(store, celery):
    child = batch_submitter(5_000, pause_after=1_500)
    assert child.stdout.readline().strip() == "paused"  # its first chunk of items is written
    child.send_signal(signal.SIGKILL)
    child.wait()
    batch_id = only_batch(store.redis)
    sweeper = SubmissionSweeper(config.load(REDIS_URL=URL, STALE_SUBMISSION_S=1, BODY_TIMEOUT_S=1), store)
    assert sweeper.sweep() == 0  # its client may only be slow: stalled after STALE_SUBMISSION_S + BODY_TIMEOUT_S
    time.sleep(2.1)
    assert sweeper.sweep() == 1
    record = sweeper.store.get(batch_id)
    assert record.status is BatchState.FAILED and record.error["code"] == "submission_interrupted"
    assert store.redis.llen(batch_queue("cpu")) == 0
    assert store.get(keys.batch_item(batch_id, 0)).status is JobState.CANCELLED  # its written items never run
    finish_stalled(celery, sweeper.store, batch_id)  # a second sweeper on the same batch changes nothing
    assert sweeper.store.get(batch_id).status is BatchState.FAILED
