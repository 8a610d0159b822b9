"""The chunk writer against a real Redis: order, exactly-once seqs, ended jobs, a lost Redis."""

import socket
import threading

import pytest
import redis

from tasks.runtime.writer import ChunkWriter, WriteFailedError
from tasks.store.jobs import JobStore
from tasks.store.states import JobState
from tests.conftest import STORE_DB, redis_url


@pytest.fixture
def store():
    store = JobStore.from_url(redis_url(STORE_DB), ttl_s=120)
    store.redis.flushdb()
    return store


def running_job(store: JobStore, job_id: str) -> None:
    store.create(job_id, {"prompt": "hi"}, "cpu")
    assert store.claim(job_id, "w1", 3) == "claimed"


def test_chunks_of_many_jobs_handed_over_at_once_are_logged_in_order_per_job(store):
    jobs = [f"j{n}" for n in range(8)]
    for job_id in jobs:
        running_job(store, job_id)
    writer = ChunkWriter(store).start()

    def generate(job_id: str) -> None:  # as the engine's callback does: one chunk per token
        for seq in range(1, 201):
            writer.append(job_id, seq, f"{job_id}:{seq} ")

    threads = [threading.Thread(target=generate, args=(job_id,)) for job_id in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job_id in jobs:
        writer.flush(job_id)
        events = store.events(job_id)
        assert [e["seq"] for e in events] == list(range(1, 201))
        assert "".join(e["text"] for e in events) == "".join(f"{job_id}:{seq} " for seq in range(1, 201))
        assert not writer.stopped(job_id)


def test_a_chunk_sent_again_is_not_logged_twice(store):
    running_job(store, "j1")
    writer = ChunkWriter(store).start()
    for seq, text in [(1, "a"), (2, "b"), (1, "a"), (2, "b"), (3, "c")]:  # a redelivered job starts over
        writer.append("j1", seq, text)
    writer.flush("j1")
    assert [e["text"] for e in store.events("j1")] == ["a", "b", "c"]


def test_a_job_that_ended_elsewhere_stops_taking_chunks(store):
    running_job(store, "j1")
    writer = ChunkWriter(store).start()
    writer.append("j1", 1, "a")
    writer.flush("j1")
    assert store.finish("j1", 2, JobState.CANCELLED, result={"response": "a"})
    writer.append("j1", 3, "late")
    writer.flush("j1")
    assert writer.stopped("j1")
    assert [e["seq"] for e in store.events("j1")] == [1, 2]


def test_a_lost_redis_fails_the_jobs_chunks_after_retrying():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = JobStore(redis.Redis(port=port, socket_connect_timeout=0.2))
    writer = ChunkWriter(unreachable, retry_for_s=0.5).start()
    writer.append("j1", 1, "a")
    with pytest.raises(WriteFailedError, match="not written"):
        writer.flush("j1")
    assert writer.stopped("j1")
