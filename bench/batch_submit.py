"""How long submitting a large batch takes, against submitting its requests one job at a time.

    python -m bench.batch_submit [--items 10000]

Runs the API in process (the app factory, Flask's test client: no HTTP server in the numbers) on a
Redis of its own (genqueue/launcher.py RedisServer, a free loopback port, stopped at the end), with
no worker: it measures accepting and queueing, not generating. Every number is measured in this run:
  1. POST /v1/batches with a JSONL upload of N requests, and with the same N as one JSON body; and the
     JSONL upload again with a worker of the default model announced (its tokenizer published, as a
     worker publishes it), so each request is also counted against the model's context (fail early);
  2. the baseline: the same requests as single POST /v1/jobs calls (a client without batches);
  3. queueing alone: a batch's N items queued a chunk per atomic step (tasks/runtime/submission.py
     queue_items), against storing and queueing M jobs one atomic step each (JobStore.submit, what
     POST /v1/jobs does after its checks).
Its Redis is flushed before and after each step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import redis

from api import create_app
from bench.harness import model_dir, print_table
from genqueue.launcher import RedisServer
from tasks.runtime.app import task_message
from tasks.runtime.submission import queue_items
from tasks.store import keys


def request_body(i: int) -> dict:
    return {"prompt": f"Write a haiku about the number {i}.", "max_tokens": 64, "temperature": 0}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--baseline-items", type=int, default=2_000, help="single jobs to time for the baseline")
    args = parser.parse_args()
    server = RedisServer()
    try:
        measure(server.url(0), args.items, args.baseline_items)
    finally:
        server.stop()


def measure(redis_url: str, n: int, m: int) -> None:
    client = redis.Redis.from_url(redis_url)
    client_text = redis.Redis.from_url(redis_url, decode_responses=True)
    # No worker runs: the no-worker check is off, and the quotas are raised past what is submitted.
    limits = {"NO_WORKER_GRACE_S": 0, "MAX_QUEUED_JOBS_PER_KEY": 0, "MAX_QUEUED_BATCH_ITEMS_PER_KEY": 0}
    app = create_app({"REDIS_URL": redis_url, "BATCH_MAX_ITEMS": max(n, 50_000), **limits})
    app.logger.setLevel(logging.WARNING)
    logging.getLogger("api").setLevel(logging.WARNING)
    api = app.test_client()
    celery = app.extensions["genqueue.jobs"].celery

    upload = "".join(json.dumps({"custom_id": f"item-{i}", "body": request_body(i)}) + "\n" for i in range(n)).encode()
    requests = [{"custom_id": f"item-{i}", **request_body(i)} for i in range(n)]
    queued = f"{app.config['DEFAULT_QUEUE']}.batch"

    def post_jsonl() -> None:
        response = api.post("/v1/batches", data=upload, content_type="application/jsonl")
        assert response.status_code == 201, response.json
        assert client.llen(queued) == n

    def post_json() -> None:
        response = api.post("/v1/batches", json={"requests": requests})
        assert response.status_code == 201, response.json

    def post_singles() -> None:
        for i in range(m):
            assert api.post("/v1/jobs", json=request_body(i)).status_code == 202

    def queue_chunked() -> None:
        batches = app.extensions["genqueue.batches"].store
        batches.create("batch_bench", "", app.config["DEFAULT_QUEUE"], {})
        batches.redis.hset(keys.batch("batch_bench"), "total", n)  # admitted
        queue_items(celery, batches, "batch_bench", app.config["DEFAULT_QUEUE"], n)
        assert client.llen(queued) == n

    def submit_one_by_one() -> None:
        store = app.extensions["genqueue.jobs"].store
        for i in range(m):
            store.submit(f"job-{i}", request_body(i), queued, "", task_message(celery, f"job-{i}", queued))

    def announce_a_worker() -> None:
        """What a worker of the default model does when it starts: publish its tokenizer, beat."""
        from engine.metadata import read_metadata
        from engine.tokenizer import read_tokenizer_files
        from tasks.store.registry import WorkerInfo, WorkerRegistry
        from tasks.store.tokenizers import TokenizerFiles

        model = Path(model_dir())
        digest = TokenizerFiles(client_text).publish(read_tokenizer_files(model))
        max_context = int((read_metadata(model) or {}).get("max_context") or 8192)
        info = WorkerInfo("bench:0", (app.config["DEFAULT_QUEUE"],), model.name, "cpu", "int8", (), max_context)
        WorkerRegistry(client_text).beat(dataclasses.replace(info, tokenizer=digest), ttl_s=3600)
        with app.app_context():  # the API builds the tokenizer once per process: not part of the timing
            app.extensions["genqueue.models"].request_check(app.config["DEFAULT_QUEUE"])

    steps = [
        (f"POST /v1/batches, JSONL upload of {n}", post_jsonl, n, None),
        ("  the same, each counted against the context", post_jsonl, n, announce_a_worker),
        (f"POST /v1/batches, JSON body of {n}", post_json, n, None),
        (f"baseline: {m} single POST /v1/jobs", post_singles, m, None),
        (f"queue_items: {n} batch items, a chunk per step", queue_chunked, n, None),
        (f"baseline: {m} JobStore.submit calls", submit_one_by_one, m, None),
    ]
    measured = []
    for name, fn, count, setup in steps:
        client.flushdb()
        if setup is not None:
            setup()
        seconds = timed(fn)
        client.flushdb()
        measured.append((name, count, seconds, seconds / count))
    single_job, one_submit = measured[3][3], measured[5][3]
    rows = []
    for index, (name, count, seconds, per_item) in enumerate(measured):
        baseline = single_job if index < 4 else one_submit
        rows.append(
            [name, f"{count}", seconds, f"{per_item * 1e6:.0f} us", f"{count / seconds:.0f}", baseline / per_item]
        )
    print_table(
        f"Submitting {n} requests as one batch vs one job at a time (API in process, no worker)",
        ["step", "items", "seconds", "per item", "items/s", "less time per item than its baseline (x)"],
        rows,
        notes=[
            f"One batch (JSONL) of {n}: {measured[0][2]:.2f} s; one at a time would take about "
            f"{single_job * n:.1f} s (from the {m} single jobs timed above). Counting each request against "
            f"the model's context made the JSONL batch {measured[1][2] / measured[0][2]:.2f} times as long."
        ],
    )


if __name__ == "__main__":
    main()
