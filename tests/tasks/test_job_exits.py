"""Every exit path of a job thread ends the job: a worker runtime in this process (tiny model, real
Redis), with faults put into its parts. Its database (SUBMIT_DB) is flushed by each test."""

from __future__ import annotations

import threading
import time

import pytest
import redis

import config
from engine import GenerationRequest, SamplingOptions
from tasks.runtime.worker import WorkerRuntime
from tasks.store.states import JobState
from tests.conftest import SUBMIT_DB, redis_url

REQUEST = GenerationRequest(prompt="Tell me about the sea", options=SamplingOptions(temperature=0, max_tokens=24))


@pytest.fixture(scope="module")
def runtime(tiny_dir):
    redis.Redis.from_url(redis_url(SUBMIT_DB)).flushdb()
    settings = config.load(
        {}, redis_url=redis_url(SUBMIT_DB), model=str(tiny_dir), heartbeat_timeout_s=1, write_retry_s=1
    )
    runtime = WorkerRuntime(settings).start()
    yield runtime
    runtime.stop()


def run(runtime: WorkerRuntime, job_id: str) -> None:
    runtime.store.create(job_id, REQUEST.to_dict(), "cpu")
    thread = threading.Thread(target=runtime.run_job, args=(job_id,))
    thread.start()
    thread.join(60)
    assert not thread.is_alive()


def ended(runtime: WorkerRuntime, job_id: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not (record := runtime.store.get(job_id)).status.terminal:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    assert job_id not in runtime.store.running()  # no job is left running without a holder
    return record


def test_an_unexpected_engine_exception_fails_the_job_with_a_safe_message(runtime, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("secret internals at 0xdeadbeef")

    monkeypatch.setattr(runtime.batcher, "run", broken)
    run(runtime, "boom-engine")
    record = ended(runtime, "boom-engine")
    assert record.status is JobState.FAILED
    assert record.error["code"] == "internal_error" and "0xdeadbeef" not in record.error["message"]


def test_an_exception_outside_generation_fails_the_job(runtime, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in the job thread")

    monkeypatch.setattr(runtime.store, "progress", broken)  # read before generating
    run(runtime, "boom-thread")
    record = ended(runtime, "boom-thread")
    assert record.status is JobState.FAILED and record.error["code"] == "internal_error"


def test_an_end_redis_refuses_is_retried_then_handed_back_and_a_takeover_ends_it(runtime, monkeypatch):
    alone = runtime.model.generate_batch([runtime.model.encode(REQUEST)])[0]
    real_finish, refused = runtime.store.finish, []

    def unreachable(*args, **kwargs):
        refused.append(time.monotonic())
        if refused[-1] - refused[0] < 2:  # longer than WRITE_RETRY_S
            raise redis.ConnectionError("Redis went away")
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(runtime.store, "finish", unreachable)
    run(runtime, "lost-end")
    assert len(refused) > 2  # tried again for WRITE_RETRY_S
    record = ended(runtime, "lost-end")
    assert record.status is JobState.SUCCEEDED
    assert record.attempts >= 2  # a takeover ended it, from the logged tokens, generating nothing again
    assert record.result["response"] == alone.response
    assert record.result["usage"] == alone.usage.to_dict()
