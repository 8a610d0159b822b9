"""Faults with real processes: a worker killed mid-job, graceful shutdown."""

import json
import signal
import time

import pytest

from tasks.runtime.app import job_of_message
from tasks.store import keys
from tasks.store.states import JobState
from tests.conftest import FAULT_DB, WorkerProcess, make_client
from tests.helpers import parse_sse, sse_text, wait_job

# Short redelivery settings so a dead worker's job comes back within seconds.
# The first worker runs on one thread, so the kill surely lands mid-job even on a loaded machine.
FAST_REDELIVERY = {"visibility_timeout_s": 30, "redelivery_check_s": 1, "job_time_limit_s": 25}
JOB = {"prompt": "Write a story about a lighthouse keeper.", "temperature": 0, "max_tokens": 64}


@pytest.fixture
def fault_db():
    import redis

    from tests.conftest import redis_url

    redis.Redis.from_url(redis_url(FAULT_DB)).flushdb()
    return FAULT_DB


def test_a_job_of_a_killed_worker_completes_on_another(smollm2_dir, fault_db):
    client = make_client(fault_db)
    store = client.application.extensions["genqueue.jobs"].store
    first = WorkerProcess(smollm2_dir, fault_db, concurrency=1, intra_threads=1, **FAST_REDELIVERY)
    try:
        job_id = client.post("/v1/jobs", json=JOB).json["id"]
        while len(store.events(job_id)) < 3:  # it is generating on the first worker
            time.sleep(0.02)
        first.kill()
    finally:
        first.stop()
    second = WorkerProcess(smollm2_dir, fault_db, concurrency=1, **FAST_REDELIVERY)
    try:
        job = wait_job(client, job_id, timeout_s=60)
        if job["status"] != "succeeded":  # redelivery takes visibility_timeout_s, then a heartbeat TTL
            job = wait_job(client, job_id, timeout_s=60)
        assert job["status"] == "succeeded", (job, second.output())
        record = store.get(job_id)
        assert record.attempts == 2, second.output()[-3000:]
        # The replay log holds each chunk once, and they add up to the stored response.
        events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
        assert sse_text(events) == job["result"]["response"]
        ids = [e["id"] for e in events if e["id"]]
        assert ids == [str(i) for i in range(1, len(ids) + 1)]
    finally:
        second.stop()


def test_sigterm_lets_the_running_job_finish(smollm2_dir, fault_db):
    client = make_client(fault_db)
    worker = WorkerProcess(smollm2_dir, fault_db, concurrency=1)
    job_id = client.post("/v1/jobs", json=JOB).json["id"]
    store = client.application.extensions["genqueue.jobs"].store
    while len(store.events(job_id)) < 2:
        time.sleep(0.02)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=60) == 0
    job = wait_job(client, job_id, timeout_s=1)
    assert job["status"] == "succeeded"
    assert job["result"]["usage"]["completion_tokens"] == JOB["max_tokens"]
    worker.stop()


# -- takeover by heartbeat: the visibility timeout stays at its default (1800 s), so only the recovery
# sweep can bring the job back within the test's time.
TAKEOVER = {"heartbeat_timeout_s": 3, "concurrency": 1, "intra_threads": 1, "compute_type": "float32"}
LONG_JOB = {"prompt": "Write a long story about a lighthouse keeper and the sea.", "max_tokens": 200}


def holder_of(store, job_id: str, workers) -> WorkerProcess:
    """The worker process holding the job, once it has logged a few chunks."""
    deadline = time.monotonic() + 120
    while len(store.events(job_id)) < 5:
        assert time.monotonic() < deadline, [w.output()[-2000:] for w in workers]
        time.sleep(0.02)
    holder = store.redis.hget(f"genqueue:job:{job_id}", "worker")
    return next(w for w in workers if holder.endswith(f":{w.pid}"))


def check_log(client, store, job_id: str, job: dict) -> None:
    """The stream replays each chunk once, in order, and adds up to the result; each token is counted once."""
    events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    assert sse_text(events) == job["result"]["response"]
    ids = [e["id"] for e in events if e["id"]]
    assert ids == [str(i) for i in range(1, len(ids) + 1)]
    assert len(store.progress(job_id).ids) == job["result"]["usage"]["completion_tokens"]


def test_a_killed_workers_job_is_taken_over_and_goes_on_from_its_logged_tokens(smollm2_dir, fault_db):
    client = make_client(fault_db)
    store = client.application.extensions["genqueue.jobs"].store
    workers = [WorkerProcess(smollm2_dir, fault_db, **TAKEOVER) for _ in range(2)]
    try:
        body = {**LONG_JOB, "temperature": 0}
        job_id = client.post("/v1/jobs", json=body).json["id"]
        first = holder_of(store, job_id, workers)
        first.kill()
        killed_at = time.monotonic()
        logged = store.progress(job_id)
        job = wait_job(client, job_id, timeout_s=60)
        other = next(w for w in workers if w is not first)
        assert job["status"] == "succeeded", other.output()[-3000:]
        assert time.monotonic() - killed_at < 60
        assert store.get(job_id).attempts == 2
        assert "taken over from" in other.output()
        assert job["result"]["response"].startswith(logged.text) and len(logged.ids) < body["max_tokens"]
        check_log(client, store, job_id, job)
        # float32 greedy: the taken-over job ends exactly as an uninterrupted run of the same request.
        again = wait_job(client, client.post("/v1/jobs", json=body).json["id"], timeout_s=60)
        assert job["result"] == again["result"]
    finally:
        for worker in workers:
            worker.stop()


def test_a_worker_that_was_only_slow_finds_its_job_taken_and_writes_nothing(smollm2_dir, fault_db):
    client = make_client(fault_db)
    store = client.application.extensions["genqueue.jobs"].store
    workers = [WorkerProcess(smollm2_dir, fault_db, **TAKEOVER) for _ in range(2)]
    try:
        # Sampled: the two workers' continuations differ, so a write of the slow one would show.
        job_id = client.post("/v1/jobs", json={**LONG_JOB, "temperature": 1.0}).json["id"]
        slow = holder_of(store, job_id, workers)
        slow.kill(signal.SIGSTOP)  # past the heartbeat timeout: it looks dead
        deadline = time.monotonic() + 30
        while store.get(job_id).attempts < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        slow.kill(signal.SIGCONT)  # it goes on generating and writing, as attempt 1
        job = wait_job(client, job_id, timeout_s=60)
        assert job["status"] == "succeeded"
        check_log(client, store, job_id, job)
        deadline = time.monotonic() + 30
        while "letting it go" not in slow.output() and "nothing written" not in slow.output():
            assert time.monotonic() < deadline, slow.output()[-3000:]
            time.sleep(0.1)
        assert slow.alive()
    finally:
        for worker in workers:
            worker.stop()


def test_sigterm_hands_back_what_runs_past_the_grace_and_another_worker_resumes_it(smollm2_dir, fault_db):
    client = make_client(fault_db)
    store = client.application.extensions["genqueue.jobs"].store
    body = {**LONG_JOB, "temperature": 0}
    worker = WorkerProcess(smollm2_dir, fault_db, shutdown_grace_s=1, **TAKEOVER)
    job_id = client.post("/v1/jobs", json=body).json["id"]
    holder_of(store, job_id, [worker])
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=30) == 0
    worker.stop()
    record = store.get(job_id)
    assert record.status is JobState.RUNNING and store.running() == {job_id: ""}  # handed back, no holder
    handed = store.progress(job_id)
    assert 0 < len(handed.ids) < body["max_tokens"]
    second = WorkerProcess(smollm2_dir, fault_db, **TAKEOVER)
    try:
        job = wait_job(client, job_id, timeout_s=60)
        assert job["status"] == "succeeded", second.output()[-3000:]
        assert job["result"]["response"].startswith(handed.text)
        check_log(client, store, job_id, job)
        again = wait_job(client, client.post("/v1/jobs", json=body).json["id"], timeout_s=60)
        assert job["result"] == again["result"]
    finally:
        second.stop()


# -- messages a worker reserved but never claimed: one slot and three more reserved (prefetch 4).
PREFETCHING = {**TAKEOVER, "prefetch_multiplier": 4}
SHORTER_JOB = {**LONG_JOB, "max_tokens": 64, "temperature": 1.0}


def reserved(store, count: int, workers) -> None:
    """Wait until the broker's unacked hash holds `count` messages (delivered, not acknowledged)."""
    deadline = time.monotonic() + 60
    while store.redis.hlen(keys.BROKER_UNACKED) < count:
        assert time.monotonic() < deadline, [w.output()[-2000:] for w in workers]
        time.sleep(0.05)


def test_jobs_reserved_by_a_killed_worker_run_on_another_within_seconds_each_once(smollm2_dir, fault_db):
    client = make_client(fault_db)
    store = client.application.extensions["genqueue.jobs"].store
    # Its own sweep would move its waiting jobs after 15 s: it dies long before.
    first = WorkerProcess(smollm2_dir, fault_db, **{**PREFETCHING, "heartbeat_timeout_s": 15})
    second = None
    try:
        ids = [client.post("/v1/jobs", json=SHORTER_JOB).json["id"] for _ in range(4)]
        reserved(store, 4, [first])  # one running, three waiting in the worker for its one slot
        holder_of(store, next(i for i in ids if store.status(i) is JobState.RUNNING), [first]).kill()
        killed_at = time.monotonic()
        waiting = [i for i in ids if store.status(i) is JobState.QUEUED]
        # The gap: three queued jobs whose messages are neither on the queue nor acknowledged.
        assert len(waiting) == 3 and store.queue_depth("cpu") == 0, first.output()[-3000:]
        assert store.redis.hlen(keys.BROKER_UNACKED) == 4
        second = WorkerProcess(smollm2_dir, fault_db, **{**TAKEOVER, "concurrency": 4})
        # Far sooner than the visibility timeout (1800 s): the second worker's start, then 3 s.
        while any(store.status(i) is JobState.QUEUED for i in waiting):
            assert time.monotonic() - killed_at < 60, second.output()[-3000:]
            time.sleep(0.1)
        jobs = {i: wait_job(client, i, timeout_s=60) for i in ids}
        for job_id, job in jobs.items():
            assert job["status"] == "succeeded", second.output()[-3000:]
            check_log(client, store, job_id, job)
        assert [store.get(i).attempts for i in waiting] == [1, 1, 1]  # each run once, from its first token
        # Every message acknowledged, or dropped: the killed worker's message for the job it ran was
        # acknowledged by nobody (the job was taken over); the sweep drops it once the job has ended.
        unacked_gone(store, [second])
    finally:
        first.stop()
        if second is not None:
            second.stop()


def unacked_gone(store, workers) -> None:
    deadline = time.monotonic() + 15
    while store.redis.hlen(keys.BROKER_UNACKED):
        assert time.monotonic() < deadline, [w.output()[-2000:] for w in workers]
        time.sleep(0.1)


def ran_on(store, job_id: str, worker: WorkerProcess) -> bool:
    return store.redis.hget(f"genqueue:job:{job_id}", "worker").endswith(f":{worker.pid}")


def test_jobs_waiting_in_a_live_workers_reserve_move_to_an_idle_worker_and_run_once(smollm2_dir, fault_db):
    client = make_client(fault_db)
    store = client.application.extensions["genqueue.jobs"].store
    busy = WorkerProcess(smollm2_dir, fault_db, **PREFETCHING)
    idle = None
    try:
        # Its one slot holds a long job (400 tokens: many times a worker's start) ...
        long_id = client.post("/v1/jobs", json={**LONG_JOB, "max_tokens": 400, "temperature": 0}).json["id"]
        holder_of(store, long_id, [busy])
        # ... and its reserve three short ones, which it would run only after it.
        ids = [client.post("/v1/jobs", json=SHORTER_JOB).json["id"] for _ in range(3)]
        reserved(store, 4, [busy])
        idle = WorkerProcess(smollm2_dir, fault_db, **{**TAKEOVER, "concurrency": 4})
        jobs = {i: wait_job(client, i, timeout_s=60) for i in ids}
        assert store.status(long_id) is JobState.RUNNING, "the long job ended first: the test shows nothing"
        for job_id, job in jobs.items():
            assert job["status"] == "succeeded", idle.output()[-3000:]
            assert ran_on(store, job_id, idle)
            check_log(client, store, job_id, job)
            assert store.get(job_id).attempts == 1  # claimed once, though two messages named it
        # The busy worker ends its long job, gets to its own copies of the moved jobs and lets them go unrun.
        job = wait_job(client, long_id, timeout_s=60)
        assert job["status"] == "succeeded" and ran_on(store, long_id, busy) and store.get(long_id).attempts == 1
        deadline = time.monotonic() + 30
        while busy.output().count(": not run (") < 3:
            assert time.monotonic() < deadline, busy.output()[-3000:]
            time.sleep(0.1)
        unacked_gone(store, [busy, idle])  # the let-go copies are acknowledged too
    finally:
        busy.stop()
        if idle is not None:
            idle.stop()


def test_jobs_whose_messages_were_lost_on_the_way_to_a_worker_run_once_within_seconds(tiny_dir, fault_db):
    # kombu's Redis transport takes a message off its list (BRPOP), then records it as unacknowledged: a
    # worker killed, or a Redis stopped, between the two loses it. The test takes them as such a worker.
    client = make_client(fault_db, NO_WORKER_GRACE_S=0)  # no worker yet: the messages wait on their lists
    store = client.application.extensions["genqueue.jobs"].store
    job_id = client.post("/v1/jobs", json={"prompt": "one", "max_tokens": 8}).json["id"]
    requests = [{"prompt": "two", "max_tokens": 8}, {"prompt": "three", "max_tokens": 8}]
    batch_id = client.post("/v1/batches", json={"requests": requests}).json["id"]
    assert job_of_message(json.loads(store.redis.rpop("cpu"))) == job_id
    item_id = job_of_message(json.loads(store.redis.rpop("cpu.batch")))
    assert item_id == keys.batch_item(batch_id, 0) and store.redis.llen("cpu") == 0
    worker = WorkerProcess(tiny_dir, fault_db, heartbeat_timeout_s=2, concurrency=2)
    try:
        assert wait_job(client, job_id, timeout_s=30)["status"] == "succeeded", worker.output()[-3000:]
        assert wait_job(client, item_id, timeout_s=30)["status"] == "succeeded", worker.output()[-3000:]
        deadline = time.monotonic() + 30
        while client.get(f"/v1/batches/{batch_id}").json["status"] != "completed":
            assert time.monotonic() < deadline, client.get(f"/v1/batches/{batch_id}").json
            time.sleep(0.1)
        assert [store.get(job).attempts for job in (job_id, item_id)] == [1, 1]  # new messages, each run once
        assert worker.output().count("its message was lost on its way to a worker; queued again") == 2
        assert store.redis.zcard(keys.queued("cpu")) == store.redis.zcard(keys.queued("cpu.batch")) == 0
    finally:
        worker.stop()
