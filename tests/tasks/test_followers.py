"""The fan-out of job events to followers: one subscription per process, against a real Redis."""

import threading
import time

import pytest
import redis

from genqueue import launcher
from tasks.store import followers as followers_module
from tasks.store.followers import Followers
from tasks.store.jobs import JobStore
from tasks.store.states import JobState
from tests.conftest import STORE_DB, redis_url


@pytest.fixture
def store():
    store = JobStore.from_url(redis_url(STORE_DB), ttl_s=120)
    store.redis.flushdb()
    return store


def running_job(store, job_id: str) -> None:
    store.create(job_id, {"prompt": "hi"}, "cpu")
    assert store.claim(job_id, "w1", 3) == "claimed"


def collect(iterator, into: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(e for e in iterator if e), daemon=True)
    thread.start()
    return thread


def wait_for(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_follower_that_reads_nothing_holds_up_no_other_and_catches_up_from_the_log(store):
    running_job(store, "j1")
    store.append_chunks([("j1", 1, "1 ")])
    followers = Followers(store)
    slow = followers.events("j1", poll_s=30)
    assert next(slow)["seq"] == 1  # registered, and replayed what there was
    fast: list[dict] = []
    fast_thread = collect(followers.events("j1", after_seq=1, poll_s=30), fast)
    # One live event through both: the subscription is up (and what its start asked of them is done).
    store.append_chunks([("j1", 2, "2 ")])
    wait_for(lambda: len(fast) == 1)
    assert next(slow)["seq"] == 2
    total = followers_module.QUEUE_SIZE * 3  # far more than the slow one's queue holds
    for seq in range(3, total + 1):
        store.append_chunks([("j1", seq, f"{seq} ")])
    # The fast follower has every event while the slow one has read none of them.
    wait_for(lambda: len(fast) == total - 1)
    store.finish("j1", total + 1, JobState.SUCCEEDED, result={"response": "..."})
    fast_thread.join(timeout=10)
    assert [e["seq"] for e in fast] == list(range(2, total + 2))
    # The slow one: its queue overflowed; it reads on from the log, in order, nothing twice.
    started = time.monotonic()
    rest = [e for e in slow if e]
    assert [e["seq"] for e in rest] == list(range(3, total + 2))
    assert time.monotonic() - started < 5  # at once, not at its next quiet interval
    assert followers.fanout.count() == 0


def test_events_published_while_the_subscription_is_down_come_from_the_log(store):
    running_job(store, "j2")
    followers = Followers(store)
    got: list[dict] = []
    thread = collect(followers.events("j2", poll_s=30), got)
    store.append_chunks([("j2", 1, "a")])
    wait_for(lambda: len(got) == 1)
    admin = redis.Redis.from_url(redis_url(STORE_DB), decode_responses=True)
    subscribers = [c["id"] for c in admin.client_list() if int(c.get("psub", 0)) > 0]
    assert subscribers, "no pattern subscription"
    for client_id in subscribers:
        admin.client_kill_filter(_id=client_id)
    # Published while no subscription is there: no subscriber hears these, the log keeps them.
    store.append_chunks([("j2", 2, "b"), ("j2", 3, "c")])
    store.finish("j2", 4, JobState.SUCCEEDED, result={"response": "abc"})
    thread.join(timeout=15)
    assert not thread.is_alive(), "the follower never heard the end"
    assert [e["seq"] for e in got] == [1, 2, 3, 4]


def test_a_resume_at_or_past_the_end_gets_the_last_event_and_ends_at_once(store):
    running_job(store, "j3")
    store.append_chunks([("j3", 1, "a"), ("j3", 2, "b")])
    store.finish("j3", 3, JobState.SUCCEEDED, result={"response": "ab"})
    followers = Followers(store)
    for after in (2, 3, 10**12):
        started = time.monotonic()
        events = list(followers.events("j3", after_seq=after, poll_s=30))
        assert time.monotonic() - started < 2
        assert [e["seq"] for e in events] == [3] and events[0]["type"] == "end"
    assert [e["seq"] for e in followers.events("j3", after_seq=1, poll_s=30)] == [2, 3]


def test_a_follow_and_a_wait_end_at_their_deadline(store):
    running_job(store, "j4")
    followers = Followers(store)
    started = time.monotonic()
    ticks = list(followers.events("j4", poll_s=0.2, until=time.monotonic() + 1))
    assert 0.9 < time.monotonic() - started < 3
    assert ticks and all(tick is None for tick in ticks)  # keep-alive points, then the end
    started = time.monotonic()
    list(followers.end("j4", poll_s=0.2, until=time.monotonic() + 1))
    assert 0.9 < time.monotonic() - started < 3


def test_a_wait_ends_when_its_job_ends(store):
    running_job(store, "j5")
    followers = Followers(store)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (list(followers.end("j5", poll_s=30)), done.set()), daemon=True)
    thread.start()
    wait_for(lambda: followers.fanout.count() == 1)
    store.append_chunks([("j5", 1, "a")])  # a chunk is not the end
    time.sleep(0.2)
    assert not done.is_set()
    store.finish("j5", 2, JobState.SUCCEEDED, result={"response": "a"})
    assert done.wait(5)


def test_a_follower_outlives_redis_going_away_and_reads_on_when_it_is_back(tmp_path):
    server = launcher.RedisServer(data_dir=tmp_path, appendonly=True)
    try:
        store = JobStore.from_url(server.url(), ttl_s=120)
        running_job(store, "j6")
        store.append_chunks([("j6", 1, "a")])
        got: list = []
        thread = threading.Thread(target=lambda: got.extend(Followers(store).events("j6", poll_s=0.2)), daemon=True)
        thread.start()
        wait_for(lambda: len(got) >= 1)
        server.stop()  # down while quiet intervals pass: the follower's reads fail meanwhile
        before = len(got)
        time.sleep(1.5)
        assert thread.is_alive() and got[before:].count(None) >= 2  # keep-alive points went on
        server = launcher.RedisServer(server.port, tmp_path, appendonly=True)
        store.append_chunks([("j6", 2, "b")])
        store.finish("j6", 3, JobState.SUCCEEDED, result={"response": "ab"})
        thread.join(timeout=15)
        assert [e["seq"] for e in got if e] == [1, 2, 3]
    finally:
        server.stop()
