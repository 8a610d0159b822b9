"""The engine never waits for Redis: with Redis paused (CLIENT PAUSE ALL), a worker generates a whole
job, and only the writes wait for the pause to end."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest
import redis

from genqueue.launcher import RedisServer
from tasks.store.metrics import BATCH_SIZE, JOBS, QUEUE_WAIT, TIME_TO_FIRST_TOKEN, MetricsRecorder
from tests.conftest import WorkerProcess
from tests.helpers import wait_job

# The worker's engine waits GATE_S for company before it starts a call: the test pauses Redis in that
# time, so the call starts (its metrics included) and runs its 100 tokens (0.3 s here) inside the pause.
GATE_S = 1.0
PAUSE_S = 4.0  # under the broker's socket timeout (5 s), so the worker's consumer keeps its connection
DONE_LINE = re.compile(r"^\[(\S+ \S+): INFO/\S+\] engine call done: 1 jobs in ([\d.]+) s$")


@pytest.fixture
def own_redis(redis_server_binary, tmp_path):
    server = RedisServer(data_dir=tmp_path, binary=redis_server_binary)
    yield server
    server.stop()


def engine_calls_done(log: str) -> list[tuple[float, float]]:
    """(Unix time, seconds it ran) of each 'engine call done' line of a worker log."""
    calls = []
    for line in log.splitlines():
        if match := DONE_LINE.match(line):
            at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            calls.append((at, float(match[2])))
    return calls


def test_the_engine_generates_a_whole_job_while_redis_is_paused(own_redis, tiny_dir):
    from api import create_app

    url = own_redis.url(0)
    worker = WorkerProcess(tiny_dir, 0, redis_base=url.rsplit("/", 1)[0], gather_window_s=GATE_S, max_batch_size=2)
    client = create_app({"TESTING": True, "REDIS_URL": url}).test_client()
    control = redis.Redis.from_url(url, decode_responses=True)
    try:
        job_id = client.post("/v1/jobs", json={"prompt": "Story", "temperature": 0, "max_tokens": 100}).json["id"]
        metrics = MetricsRecorder(control)
        deadline = time.monotonic() + 60
        # The job's thread has recorded its start (the counter, then the queue wait: its last Redis
        # writes before it hands the job to the engine) and waits for the engine.
        while not (metrics.counter_values(JOBS).get("running") and metrics.histogram(QUEUE_WAIT)[0][-1][1]):
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.01)
        control.execute_command("CLIENT", "PAUSE", int(PAUSE_S * 1000), "ALL")
        paused_at = time.time()
        assert not engine_calls_done(worker.output())  # the engine is still gathering

        job = wait_job(client, job_id, timeout_s=60)
        assert job["status"] == "succeeded" and job["result"]["usage"]["completion_tokens"] == 100
        record = client.application.extensions["genqueue.jobs"].store.get(job_id)
        # The pause held every Redis write: the job's end was written after it...
        assert record.finished_at >= paused_at + PAUSE_S - 0.05
        # ...while the engine started and finished generating inside it (log times are to the ms).
        [(done_at, seconds)] = engine_calls_done(worker.output())
        assert paused_at - 0.01 <= done_at - seconds and done_at < paused_at + PAUSE_S, (paused_at, worker.output())
        # What the engine's thread handed over was recorded once Redis answered, with the engine's times.
        assert metrics.histogram(BATCH_SIZE)[0][-1][1] == 1
        first_text = metrics.histogram(TIME_TO_FIRST_TOKEN)
        assert first_text[0][-1][1] == 1 and first_text[1] < paused_at + PAUSE_S - record.created_at
    finally:
        worker.stop()
