"""The batch store on a real Redis: counts kept by the job store's own scripts, cancel, listing, expiry.

Workers are played by the JobStore calls a worker makes (claim, append_chunk, finish), so each
race can be set up exactly; tests/api/test_batches.py runs batches through a real worker.
"""

import json

import pytest

from tasks.runtime.app import batch_queue, create_celery
from tasks.runtime.submission import queue_items
from tasks.store import keys
from tasks.store.batches import BatchRequest, BatchStore
from tasks.store.jobs import JobStore
from tasks.store.quotas import NO_LIMITS
from tasks.store.states import BatchState, JobState
from tests.conftest import STORE_DB, redis_url


def append_chunk(store, job_id: str, seq: int, text: str) -> bool:
    """Log one chunk; False if it was logged already or the job has ended."""
    return store.append_chunks([(job_id, seq, text)]) == [1]


RESULT = {"response": "ok", "tool_calls": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


@pytest.fixture
def store():
    jobs = JobStore.from_url(redis_url(STORE_DB), ttl_s=120)
    jobs.redis.flushdb()
    return BatchStore(jobs, ttl_s=600)


@pytest.fixture(scope="module")
def celery():
    import config

    return create_celery(config.load(REDIS_URL=redis_url(STORE_DB)))


def queue_batch(store, celery, batch_id: str, n: int) -> BatchState:
    """Admit a written batch's n items, queue them on cpu.batch and start it, as the API's batch service does."""
    assert store.admit(batch_id, "", "cpu", batch_queue("cpu"), n, NO_LIMITS) is None
    return queue_items(celery, store, batch_id, "cpu", n)


def make_batch(store, celery, n: int, batch_id: str = "b1", owner: str = "") -> str:
    store.create(batch_id, owner, "cpu", {"purpose": "test"})
    store.add_items(batch_id, owner, "cpu", 0, [BatchRequest(f"c{i}", {"prompt": f"p{i}"}) for i in range(n)])
    assert queue_batch(store, celery, batch_id, n) is BatchState.IN_PROGRESS
    return batch_id


def item(batch_id: str, index: int) -> str:
    return keys.batch_item(batch_id, index)


def test_items_are_queued_on_the_batch_queue_and_counted_as_they_end(store, celery):
    batch_id = make_batch(store, celery, 3)
    assert store.redis.llen(batch_queue("cpu")) == 3
    assert store.redis.llen("cpu") == 0  # the interactive queue is untouched
    record = store.get(batch_id)
    assert (record.status, record.total, record.metadata) == (BatchState.IN_PROGRESS, 3, {"purpose": "test"})

    jobs = store.jobs
    assert jobs.claim(item(batch_id, 0), "w", 3) == "claimed" and jobs.claim(item(batch_id, 1), "w", 3) == "claimed"
    assert jobs.finish(item(batch_id, 1), 1, JobState.SUCCEEDED, result=RESULT)
    error = {"code": "context_length_exceeded", "message": "too long"}
    assert jobs.finish(item(batch_id, 0), 1, JobState.FAILED, error=error)
    # A redelivered item ends again: the first end wins and nothing is counted twice.
    assert not jobs.finish(item(batch_id, 1), 1, JobState.SUCCEEDED, result=RESULT)
    record = store.get(batch_id)
    assert (record.completed, record.failed, record.status) == (1, 1, BatchState.IN_PROGRESS)
    assert jobs.claim(item(batch_id, 2), "w", 3) == "claimed"
    assert store.get(batch_id).status is BatchState.FINALIZING  # every item taken by a worker
    assert jobs.finish(item(batch_id, 2), 1, JobState.SUCCEEDED, result=RESULT)

    record = store.get(batch_id)
    assert record.status is BatchState.COMPLETED_WITH_ERRORS  # one request failed: the state says so
    assert (record.completed, record.failed, record.cancelled) == (2, 1, 0)
    assert (record.prompt_tokens, record.completion_tokens) == (10, 4)
    assert (
        record.timestamps["completed_at"] >= record.timestamps["finalizing_at"] >= record.timestamps["in_progress_at"]
    )
    entries = list(store.results(batch_id, record.total))
    assert [(e["index"], e["custom_id"], e["end"]["status"]) for e in entries] == [
        (0, "c0", "failed"),
        (1, "c1", "succeeded"),
        (2, "c2", "succeeded"),
    ]
    assert entries[0]["end"]["error"] == error and entries[1]["end"]["result"] == RESULT


def test_a_batch_is_completed_only_when_every_request_succeeded(store, celery):
    clean, cancelled_one = make_batch(store, celery, 2, "b-clean"), make_batch(store, celery, 2, "b-one-cancelled")
    for index in range(2):
        assert store.jobs.claim(item(clean, index), "w", 3) == "claimed"
        store.jobs.finish(item(clean, index), 1, JobState.SUCCEEDED, result=RESULT)
    assert store.get(clean).status is BatchState.COMPLETED
    assert store.jobs.cancel(item(cancelled_one, 0)) is JobState.CANCELLED  # one request cancelled by itself
    assert store.jobs.claim(item(cancelled_one, 1), "w", 3) == "claimed"
    store.jobs.finish(item(cancelled_one, 1), 1, JobState.SUCCEEDED, result=RESULT)
    record = store.get(cancelled_one)
    assert (record.status, record.completed, record.cancelled) == (BatchState.COMPLETED_WITH_ERRORS, 1, 1)
    assert record.status.terminal and "completed_at" in record.timestamps


def test_results_skip_items_still_running_and_keep_input_order(store, celery):
    batch_id = make_batch(store, celery, 5)
    for index in (4, 1, 3):
        assert store.jobs.claim(item(batch_id, index), "w", 3) == "claimed"
        store.jobs.finish(item(batch_id, index), 1, JobState.SUCCEEDED, result=RESULT)
    assert [e["index"] for e in store.results(batch_id, 5)] == [1, 3, 4]


def test_cancel_ends_queued_items_now_and_flags_running_ones(store, celery):
    batch_id = make_batch(store, celery, 4)
    jobs = store.jobs
    assert jobs.claim(item(batch_id, 0), "w", 3) == "claimed"
    jobs.finish(item(batch_id, 0), 1, JobState.SUCCEEDED, result=RESULT)
    assert jobs.claim(item(batch_id, 1), "w", 3) == "claimed"
    append_chunk(jobs, item(batch_id, 1), 1, "par")

    assert store.cancel(batch_id) is BatchState.CANCELLING  # item 1 is still running
    assert [jobs.get(item(batch_id, i)).status for i in range(4)] == [
        JobState.SUCCEEDED,
        JobState.RUNNING,
        JobState.CANCELLED,
        JobState.CANCELLED,
    ]
    assert jobs.cancel_requested(item(batch_id, 1))
    assert jobs.claim(item(batch_id, 2), "w", 3) != "claimed"  # a cancelled item's message is never run
    # The worker stops the running item; its partial output is kept and the batch ends.
    partial = {**RESULT, "response": "par", "finish_reason": "cancelled"}
    jobs.finish(item(batch_id, 1), 2, JobState.CANCELLED, result=partial)
    record = store.get(batch_id)
    assert record.status is BatchState.CANCELLED
    assert (record.completed, record.failed, record.cancelled) == (1, 0, 3)
    ends = [e["end"] for e in store.results(batch_id, 4)]
    assert [e["status"] for e in ends] == ["succeeded", "cancelled", "cancelled", "cancelled"]
    assert ends[1]["result"] == partial and "result" not in ends[2]
    assert store.cancel(batch_id) is BatchState.CANCELLED  # again: harmless


def test_a_batch_cancelled_while_validating_never_starts(store, celery):
    store.create("b2", "", "cpu", {})
    store.add_items("b2", "", "cpu", 0, [BatchRequest(None, {"prompt": "a"})])
    assert store.cancel("b2") is BatchState.CANCELLING  # total unknown yet: not ended
    store.add_items("b2", "", "cpu", 1, [BatchRequest(None, {"prompt": "b"})])  # the API goes on writing
    assert queue_batch(store, celery, "b2", 2) is BatchState.CANCELLING
    record = store.get("b2")
    assert (record.status, record.cancelled) == (BatchState.CANCELLED, 2)
    assert [store.jobs.get(item("b2", i)).status for i in range(2)] == [JobState.CANCELLED] * 2


def test_a_completed_batch_cannot_be_cancelled(store, celery):
    batch_id = make_batch(store, celery, 1)
    assert store.jobs.claim(item(batch_id, 0), "w", 3) == "claimed"
    store.jobs.finish(item(batch_id, 0), 1, JobState.SUCCEEDED, result=RESULT)
    assert store.cancel(batch_id) is BatchState.COMPLETED
    assert store.cancel("unknown") is None


def test_discard_removes_a_refused_batch_and_its_items(store):
    store.create("b3", "alice", "cpu", {})
    store.add_items("b3", "alice", "cpu", 0, [BatchRequest(None, {"prompt": "a"}) for _ in range(3)])
    store.discard("b3", "alice", 3)
    assert store.redis.keys("*") == []


def test_listing_is_newest_first_paginated_per_owner_and_forgets_expired(store, celery):
    for n in range(5):
        make_batch(store, celery, 1, batch_id=f"a{n}", owner="alice")
    make_batch(store, celery, 1, batch_id="bob1", owner="bob")
    page, more = store.list("alice", 2)
    assert [r.id for r in page] == ["a4", "a3"] and more
    page, more = store.list("alice", 2, after="a3")
    assert [r.id for r in page] == ["a2", "a1"] and more
    store.redis.delete(keys.batch("a0"))  # expired
    page, more = store.list("alice", 2, after="a1")
    assert page == [] and not more
    assert store.redis.zrange(keys.owner_batches("alice"), 0, -1) == ["a1", "a2", "a3", "a4"]
    assert [r.id for r in store.list("bob", 10)[0]] == ["bob1"]
    with pytest.raises(KeyError):
        store.list("alice", 2, after="bob1")


def test_a_batch_its_results_and_its_queued_items_expire_with_the_batch_ttl(store, celery):
    batch_id = make_batch(store, celery, 2)
    assert 500 < store.redis.ttl(keys.batch(batch_id)) <= 600
    assert 500 < store.redis.ttl(keys.job(item(batch_id, 1))) <= 600  # queued: kept as long as its batch
    assert store.jobs.claim(item(batch_id, 0), "w", 3) == "claimed"
    store.jobs.finish(item(batch_id, 0), 1, JobState.SUCCEEDED, result=RESULT)
    assert 500 < store.redis.ttl(keys.batch_results(batch_id)) <= 600
    assert store.get(batch_id).expires_at is not None
    line = json.loads(store.redis.hget(keys.batch_results(batch_id), "0"))
    assert line["custom_id"] == "c0"
