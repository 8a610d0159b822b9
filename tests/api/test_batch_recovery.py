"""A worker killed with SIGKILL in the middle of a batch: every item still ends exactly once."""

import signal
import time

from tasks.store.states import JobState
from tests.api.test_batches import post_batch, results, wait_batch
from tests.conftest import BATCH_DB, WorkerProcess, make_client
from tests.helpers import wait_job

# Short, so messages of the killed worker come back within seconds; the tiny model's items take far less.
SETTINGS = {"concurrency": 4, "max_batch_size": 4, "visibility_timeout_s": 2}
MAX_TOKENS = 150


def test_a_worker_killed_mid_batch_loses_no_item(tiny_dir):
    first = WorkerProcess(tiny_dir, BATCH_DB, **SETTINGS)
    second = None
    client = make_client(BATCH_DB, VISIBILITY_TIMEOUT_S=2)
    store = client.application.extensions["genqueue.jobs"].store
    total = 24
    bodies = [{"prompt": f"Story number {i}", "max_tokens": MAX_TOKENS, "temperature": 0} for i in range(total)]
    try:
        batch_id = post_batch(client, bodies)["id"]
        item = [f"{batch_id}-{i}" for i in range(total)]

        def generating() -> list[int]:
            return [i for i in range(total) if store.get(item[i]).status is JobState.RUNNING and store.events(item[i])]

        deadline = time.monotonic() + 60
        while client.get(f"/v1/batches/{batch_id}").json["request_counts"]["completed"] < 4 or not generating():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        first.process.send_signal(signal.SIGKILL)  # some items ended, others are generating
        first.process.wait()
        running = generating()  # cut off mid-generation: started, chunks logged, never ended
        assert running and len(store.events(item[running[0]])) < MAX_TOKENS
        assert client.get(f"/v1/batches/{batch_id}").json["request_counts"]["completed"] < total

        second = WorkerProcess(tiny_dir, BATCH_DB, **SETTINGS)
        batch = wait_batch(client, batch_id, timeout_s=120)
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": total, "completed": total, "failed": 0, "cancelled": 0}
        assert batch["usage"]["completion_tokens"] == total * MAX_TOKENS  # each item counted exactly once
        lines = results(client, batch_id)
        assert [line["index"] for line in lines] == list(range(total))
        assert all(line["result"]["usage"]["completion_tokens"] == MAX_TOKENS for line in lines)
        # An item cut off by the kill ran again from the start: its output is whole, its chunk log has
        # no duplicates, and it equals the same request run alone.
        index = running[0]
        assert store.get(item[index]).attempts >= 2
        events = store.events(item[index])
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert "".join(e.get("text", "") for e in events) == lines[index]["result"]["response"]
        alone = wait_job(client, client.post("/v1/jobs", json=bodies[index]).json["id"])
        assert alone["result"]["response"] == lines[index]["result"]["response"]
    finally:
        first.stop()
        if second is not None:
            second.stop()
