import threading
import time

import pytest
import redis

from tasks.store import keys
from tasks.store.followers import Followers
from tasks.store.jobs import JobStore
from tasks.store.states import JobState
from tests.conftest import STORE_DB, redis_url


def append_chunk(store, job_id: str, seq: int, text: str) -> bool:
    """Log one chunk; False if it was logged already or the job has ended."""
    return store.append_chunks([(job_id, seq, text)]) == [1]


@pytest.fixture
def store():
    store = JobStore.from_url(redis_url(STORE_DB), ttl_s=120)
    store.redis.flushdb()
    return store


def test_a_job_and_its_log_expire_after_the_ttl(store):
    store.create("j1", {"prompt": "hi"}, "cpu")
    assert append_chunk(store, "j1", 1, "Hel")
    assert 0 < store.redis.ttl(keys.job("j1")) <= 120
    assert 0 < store.redis.ttl(keys.job_log("j1")) <= 120


def test_chunks_replay_in_order_and_a_repeated_seq_is_not_logged_twice(store):
    store.create("j1", {"prompt": "hi"}, "cpu")
    assert store.claim("j1", "w1", 3) == "claimed"
    assert [append_chunk(store, "j1", seq, text) for seq, text in [(1, "a"), (2, "b"), (3, "c")]] == [True] * 3
    # A redelivered job generates its chunks again: the log keeps one copy.
    assert not append_chunk(store, "j1", 1, "a")
    assert not append_chunk(store, "j1", 3, "c")
    assert store.finish("j1", 4, JobState.SUCCEEDED, result={"response": "abc"})
    events = store.events("j1")
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e.get("text") for e in events[:3]] == ["a", "b", "c"]
    assert events[3]["type"] == "end" and events[3]["status"] == "succeeded"
    assert [e["seq"] for e in store.events("j1", after_seq=2)] == [3, 4]


def test_nothing_is_appended_after_the_job_ended(store):
    store.create("j1", {"prompt": "hi"}, "cpu")
    assert store.finish("j1", 1, JobState.CANCELLED)
    assert not append_chunk(store, "j1", 2, "late")
    assert not store.finish("j1", 2, JobState.SUCCEEDED, result={"response": "late"})
    assert store.claim("j1", "w1", 3) == "cancelled"
    record = store.get("j1")
    assert record.status is JobState.CANCELLED
    assert record.result is None
    assert [e["seq"] for e in store.events("j1")] == [1]


def test_unknown_or_expired_jobs_take_no_writes(store):
    assert store.get("nope") is None
    assert not append_chunk(store, "nope", 1, "x")
    assert not store.redis.exists(keys.job_log("nope"))


def test_record_keeps_state_and_timestamps(store):
    created = store.create("j1", {"prompt": "hi", "max_tokens": 3}, "cpu")
    assert created.status is JobState.QUEUED and created.started_at is None
    assert store.claim("j1", "w1", 3) == "claimed"
    running = store.get("j1")
    assert running.status is JobState.RUNNING and running.started_at >= running.created_at
    assert running.attempts == 1
    store.finish("j1", 1, JobState.FAILED, error={"code": "x", "message": "y"})
    failed = store.get("j1")
    assert failed.status is JobState.FAILED and failed.finished_at >= failed.started_at
    assert failed.error == {"code": "x", "message": "y"} and failed.request["max_tokens"] == 3


def test_a_live_follower_and_a_late_one_see_every_event(store):
    store.create("j1", {"prompt": "hi"}, "cpu")
    append_chunk(store, "j1", 1, "early ")
    live: list[dict] = []
    followers = Followers(store)
    follower = threading.Thread(target=lambda: live.extend(e for e in followers.events("j1", poll_s=0.2) if e))
    follower.start()
    time.sleep(0.3)
    for seq in range(2, 30):
        append_chunk(store, "j1", seq, f"{seq} ")
    store.finish("j1", 30, JobState.SUCCEEDED, result={"response": "..."})
    follower.join(timeout=10)
    late = [e for e in followers.events("j1") if e]
    assert [e["seq"] for e in live] == list(range(1, 31))
    assert late == live


def test_follow_resumes_after_a_seq_and_ends_when_the_job_expires(store):
    store.create("j1", {"prompt": "hi"}, "cpu")
    for seq in (1, 2, 3):
        append_chunk(store, "j1", seq, "x")
    events = Followers(store).events("j1", after_seq=2, poll_s=0.2)
    assert next(events)["seq"] == 3
    assert next(events) is None  # quiet: a keep-alive point
    store.redis.delete(keys.job("j1"))
    assert list(events) == []


def test_store_errors_surface_as_redis_errors():
    store = JobStore.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(redis.ConnectionError):
        store.get("j1")


def test_a_job_held_by_a_live_worker_is_not_claimed_twice(store):
    store.create("j1", {"prompt": "hi"}, "cpu")
    store.redis.set(keys.worker("w1"), "alive", ex=60)
    assert store.claim("j1", "w1", 3) == "claimed"
    assert store.claim("j1", "w2", 3) == "busy"
    assert store.get("j1").attempts == 1


def test_a_job_whose_worker_died_is_taken_over_until_attempts_run_out(store):
    store.create("j1", {"prompt": "hi"}, "cpu")
    assert store.claim("j1", "w1", 2) == "claimed"  # w1 has no heartbeat: it died
    started = store.get("j1").started_at
    append_chunk(store, "j1", 1, "partial")
    assert store.claim("j1", "w2", 2) == "claimed"
    record = store.get("j1")
    assert record.attempts == 2 and record.started_at == started
    assert store.claim("j1", "w3", 2) == "exhausted"
    record = store.get("j1")
    assert record.status is JobState.FAILED
    assert record.error["code"] == "attempts_exhausted"
    events = store.events("j1")
    assert [e["seq"] for e in events] == [1, 2] and events[-1]["status"] == "failed"
    assert store.claim("j1", "w4", 2) == "failed"
    assert store.claim("nope", "w1", 2) is None
