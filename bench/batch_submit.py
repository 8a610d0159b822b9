"""How long submitting a large batch takes, against submitting its requests one job at a time.

    python -m bench.batch_submit [--items 10000] [--redis-url redis://127.0.0.1:6379/11]

Runs the API in process (the app factory, Flask's test client: no HTTP server in the numbers) on a
real Redis, with no worker: it measures accepting and queueing, not generating. Every number is
measured in this run:
  1. POST /v1/batches with a JSONL upload of N requests, and with the same N as one JSON body;
  2. the baseline: the same requests as single POST /v1/jobs calls (a client without batches);
  3. queueing alone: tasks.app.enqueue_many against enqueue() (Celery's send_task) once per message.
The Redis database is flushed before and after each step: give it one nothing else uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import redis

from api import create_app
from tasks.app import enqueue, enqueue_many


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
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    args = parser.parse_args()
    n, m = args.items, args.baseline_items

    client = redis.Redis.from_url(args.redis_url)
    app = create_app({"REDIS_URL": args.redis_url, "BATCH_MAX_ITEMS": max(n, 50_000)})
    app.logger.setLevel(logging.WARNING)
    api = app.test_client()
    celery = app.extensions["genqueue.celery"]

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

    def enqueue_pipelined() -> None:
        enqueue_many(celery, (f"job-{i}" for i in range(n)), queued)

    def enqueue_one_by_one() -> None:
        for i in range(m):
            enqueue(celery, f"job-{i}", queued)  # what POST /v1/jobs does: Celery's send_task

    rows = []
    for name, fn, count in [
        (f"POST /v1/batches, JSONL upload of {n}", post_jsonl, n),
        (f"POST /v1/batches, JSON body of {n}", post_json, n),
        (f"baseline: {m} single POST /v1/jobs", post_singles, m),
        (f"enqueue_many: {n} messages, pipelined", enqueue_pipelined, n),
        (f"baseline: {m} enqueue() (send_task) calls", enqueue_one_by_one, m),
    ]:
        client.flushdb()
        seconds = timed(fn)
        client.flushdb()
        rows.append((name, count, seconds))

    per_item = {name: seconds / count for name, count, seconds in rows}
    single_job = per_item[rows[2][0]]
    send_task = per_item[rows[4][0]]
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}; redis {args.redis_url}")
    print(f"{'step':48} {'items':>7} {'seconds':>8} {'per item':>10} {'items/s':>9} {'vs baseline':>12}")
    for index, (name, count, seconds) in enumerate(rows):
        baseline = single_job if index < 3 else send_task
        ratio = baseline / per_item[name]
        print(
            f"{name:48} {count:7d} {seconds:8.2f} {per_item[name] * 1e6:8.0f}us {count / seconds:9.0f} {ratio:11.1f}x"
        )
    print(f"\nSubmitting {n} requests as one batch (JSONL) took {rows[0][2]:.2f} s; one at a time would take about")
    print(f"{single_job * n:.1f} s (from {m} single jobs timed above).")


if __name__ == "__main__":
    main()
