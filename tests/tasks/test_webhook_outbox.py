"""The webhook outbox on a real Redis: every path that ends a job or a batch queues its event in the
same script, leases, retries and giving up. (Delivery over HTTP: tests/api/test_webhooks.py.)"""

import time

import pytest

from tasks.store import keys
from tasks.store.batches import BatchRequest, BatchStore
from tasks.store.jobs import JobStore
from tasks.store.quotas import NO_LIMITS
from tasks.store.states import BatchState, JobState
from tasks.store.webhooks import WebhookOutbox
from tests.conftest import STORE_DB, redis_url

HOOK = "https://example.com/hooks/genqueue"
RESULT = {"response": "ok", "tool_calls": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


@pytest.fixture
def store():
    store = JobStore.from_url(redis_url(STORE_DB), ttl_s=120)
    store.redis.flushdb()
    return store


@pytest.fixture
def outbox(store):
    return WebhookOutbox(store.redis)


def due(store) -> list[str]:
    return store.redis.zrange(keys.WEBHOOKS_DUE, 0, -1)


def test_a_job_that_ends_queues_its_webhook_event_in_the_same_step(store, outbox):
    store.create("job_a", {"prompt": "hi"}, "cpu", webhook=HOOK)
    store.create("job_plain", {"prompt": "hi"}, "cpu")
    assert due(store) == []  # nothing before the end
    for job_id in ("job_a", "job_plain"):
        assert store.claim(job_id, "w1", 3) == "claimed"
        assert store.finish(job_id, 1, JobState.SUCCEEDED, result=RESULT)
    assert due(store) == ["msg_job_a"]  # the job without a webhook queues nothing
    event = outbox.get("msg_job_a")
    assert (event.url, event.kind, event.subject, event.type) == (HOOK, "job", "job_a", "job.succeeded")
    assert event.attempts == 0 and event.body is None
    assert abs(event.timestamp - time.time()) < 5  # Redis's clock, as the due time
    assert not store.finish("job_a", 2, JobState.FAILED)  # a job ends once: no second event
    assert due(store) == ["msg_job_a"] and outbox.get("msg_job_a").type == "job.succeeded"


def test_every_other_end_queues_it_too_cancel_and_exhausted_attempts(store, outbox):
    store.create("job_queued", {"prompt": "hi"}, "cpu", webhook=HOOK)
    assert store.cancel("job_queued") is JobState.CANCELLED  # the API's cancel of a queued job
    store.create("job_lost", {"prompt": "hi"}, "cpu", webhook=HOOK)
    for attempt in range(2):  # its worker died each time (a worker id no heartbeat names)
        assert store.claim("job_lost", f"gone-{attempt}", 1 if attempt else 2) in ("claimed", "exhausted")
    assert outbox.get("msg_job_queued").type == "job.cancelled"
    assert outbox.get("msg_job_lost").type == "job.failed"


def test_a_batch_with_a_webhook_queues_one_event_when_it_ends(store, outbox):
    batches = BatchStore(store, ttl_s=600)
    batches.create("batch_w", "", "cpu", {}, webhook=HOOK)
    batches.add_items("batch_w", "", "cpu", 0, [BatchRequest(f"c{i}", {"prompt": f"p{i}"}) for i in range(3)])
    assert batches.admit("batch_w", "", "cpu", "cpu.batch", 3, NO_LIMITS) is None
    assert batches.start("batch_w", 3) is BatchState.IN_PROGRESS
    for index in range(3):
        job_id = keys.batch_item("batch_w", index)
        assert store.claim(job_id, "w1", 3) == "claimed"
        assert due(store) == []  # items carry no webhook of their own
        assert store.finish(job_id, 1, JobState.SUCCEEDED, result=RESULT)
    assert due(store) == ["msg_batch_w"]
    event = outbox.get("msg_batch_w")
    assert (event.kind, event.subject, event.type) == ("batch", "batch_w", "batch.completed")

    batches.create("batch_c", "", "cpu", {}, webhook=HOOK)
    batches.add_items("batch_c", "", "cpu", 0, [BatchRequest(None, {"prompt": "p"})])
    assert batches.admit("batch_c", "", "cpu", "cpu.batch", 1, NO_LIMITS) is None
    batches.start("batch_c", 1)
    assert batches.cancel("batch_c") is BatchState.CANCELLED
    assert outbox.get("msg_batch_c").type == "batch.cancelled"


def test_a_claim_leases_events_and_a_failed_attempt_is_due_again_after_its_backoff(store, outbox):
    for name in ("job_1", "job_2"):
        store.create(name, {"prompt": "hi"}, "cpu", webhook=HOOK)
        store.cancel(name)
    claimed = outbox.claim(10, lease_s=60)
    assert sorted(claimed) == [("msg_job_1", 1), ("msg_job_2", 1)]
    assert outbox.claim(10, lease_s=60) == []  # leased: not handed out twice
    assert outbox.claim(0, lease_s=60) == []

    event = outbox.get("msg_job_1")
    assert outbox.failed(event, max_attempts=3, delay_s=0.3) == 1
    assert outbox.claim(10, lease_s=60) == []  # not due before its backoff
    time.sleep(0.4)
    assert outbox.claim(10, lease_s=60) == [("msg_job_1", 2)]
    stale = event  # the first dispatch's task, late: the event was handed out again since
    assert outbox.failed(stale, max_attempts=3, delay_s=0) == 0
    assert outbox.get("msg_job_1").attempts == 1

    event = outbox.get("msg_job_1")
    assert outbox.failed(event, max_attempts=2, delay_s=0) == -2  # the last attempt: given up
    assert outbox.get("msg_job_1") is None and "msg_job_1" not in due(store)
    outbox.delivered("msg_job_2")
    assert outbox.pending() == 0 and due(store) == []


def test_a_lease_that_runs_out_hands_the_event_out_again(store, outbox):
    store.create("job_1", {"prompt": "hi"}, "cpu", webhook=HOOK)
    store.cancel("job_1")
    assert outbox.claim(1, lease_s=0.3) == [("msg_job_1", 1)]
    time.sleep(0.4)  # its task never reported (its worker died)
    assert outbox.claim(1, lease_s=60) == [("msg_job_1", 2)]
    assert outbox.set_body("msg_job_1", b'{"first": 1}') == b'{"first": 1}'
    assert outbox.set_body("msg_job_1", b'{"second": 2}') == b'{"first": 1}'  # every attempt sends the same


def test_an_event_whose_entry_expired_is_dropped_from_the_due_set(store, outbox):
    store.create("job_1", {"prompt": "hi"}, "cpu", webhook=HOOK)
    store.cancel("job_1")
    store.redis.delete(keys.webhook("msg_job_1"))
    assert outbox.claim(5, lease_s=60) == [] and due(store) == []
