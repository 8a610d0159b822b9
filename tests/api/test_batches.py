"""Batches through the API and a real worker (the tiny random Llama): results in order, bad items,
limits, cancel, per-key visibility, priority of interactive jobs, bounded memory while uploading."""

import io
import json
import time
import tracemalloc

import pytest

from api.auth import hash_key
from api.service.jobs import new_job_id
from engine import GenerationRequest, SamplingOptions
from tasks.runtime.app import batch_queue, task_message
from tasks.store import keys
from tests.conftest import STORE_DB, TINY_DB, make_client
from tests.helpers import wait_job

GREEDY = {"temperature": 0}
ENDED = ("completed", "failed", "cancelled")


def post_batch(client, requests, **extra):
    response = client.post("/v1/batches", json={"requests": requests, **extra})
    assert response.status_code == 201, response.json
    assert response.headers["Location"] == f"/v1/batches/{response.json['id']}"
    return response.json


def jsonl(lines) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def wait_batch(client, batch_id: str, timeout_s: float = 120, until=ENDED) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").json
        if batch["status"] in until:
            return batch
        time.sleep(0.05)
    raise TimeoutError(f"batch {batch_id} still {batch['status']}: {batch['request_counts']}")


def results(client, batch_id: str) -> list[dict]:
    response = client.get(f"/v1/batches/{batch_id}/results")
    assert response.status_code == 200 and response.mimetype == "application/jsonl"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def test_a_batch_runs_to_results_in_input_order_that_match_single_jobs(client):
    requests = [
        {"custom_id": f"q{i}", "prompt": f"Tell me about the number {i}.", "max_tokens": 4 + 3 * i, **GREEDY}
        for i in range(10)
    ]
    requests[3] = {
        "custom_id": "chat",
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 9,
        **GREEDY,
    }
    batch = post_batch(client, requests, metadata={"run": "nightly"})
    assert batch["status"] in ("in_progress", "finalizing", "completed")
    assert batch["request_counts"]["total"] == 10 and batch["metadata"] == {"run": "nightly"}
    # The same requests as single jobs, each alone on the worker.
    singles = []
    for body in requests:
        job = {k: v for k, v in body.items() if k != "custom_id"}
        singles.append(wait_job(client, client.post("/v1/jobs", json=job).json["id"])["result"])

    batch = wait_batch(client, batch["id"])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 10, "completed": 10, "failed": 0, "cancelled": 0}
    assert batch["usage"]["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in singles)
    assert batch["completed_at"] >= batch["in_progress_at"] >= batch["created_at"]
    lines = results(client, batch["id"])
    assert [(line["index"], line["custom_id"]) for line in lines] == [
        (i, r["custom_id"]) for i, r in enumerate(requests)
    ]
    for line, single in zip(lines, singles, strict=True):
        assert line["result"]["response"] == single["response"]
        assert line["result"]["usage"] == single["usage"]
    # Each item is also an ordinary job of the caller's.
    item = client.get(f"/v1/jobs/{batch['id']}-0").json
    assert item["status"] == "succeeded" and item["result"] == lines[0]["result"]


def test_a_jsonl_upload_is_listed_newest_first(client):
    upload = jsonl({"custom_id": f"l{i}", "body": {"prompt": f"line {i}", "max_tokens": 2}} for i in range(3))
    response = client.post(
        "/v1/batches", data=upload, content_type="application/jsonl", query_string={"metadata": '{"from": "file"}'}
    )
    assert response.status_code == 201, response.json
    first = response.json
    second = post_batch(client, [{"prompt": "x", "max_tokens": 1}])
    page = client.get("/v1/batches?limit=1").json
    assert [b["id"] for b in page["data"]] == [second["id"]] and page["has_more"]
    page = client.get(f"/v1/batches?limit=1&after={second['id']}").json
    assert [b["id"] for b in page["data"]] == [first["id"]] and page["first_id"] == first["id"]
    batch = wait_batch(client, first["id"])
    assert batch["status"] == "completed" and batch["metadata"] == {"from": "file"}
    assert [line["custom_id"] for line in results(client, first["id"])] == ["l0", "l1", "l2"]
    for bad in ("0", "101", "x"):
        assert "limit" in client.get(f"/v1/batches?limit={bad}").json["error"]["fields"]
    assert "after" in client.get("/v1/batches?after=nope").json["error"]["fields"]


def batch_keys(client) -> int:
    redis = client.application.extensions["genqueue.jobs"].store.redis
    return len(redis.keys("genqueue:batch:*")) + len(redis.keys(keys.job("batch_*")))


def test_bad_items_refuse_the_whole_batch_naming_each_by_index_or_line_and_field(client):
    before = batch_keys(client)
    response = client.post(
        "/v1/batches",
        json={
            "requests": [
                {"prompt": "fine"},
                {"prompt": "x", "max_tokens": 0, "custom_id": 7},
                {"prompt": "x", "stream": True},
                "not an object",
            ]
        },
    )
    assert response.status_code == 400
    error = response.json["error"]
    assert error["code"] == "invalid_batch" and "3 of 4" in error["message"]
    assert error["fields"]["requests"] == {
        "1": {
            "custom_id": ["Must be a string of 1 to 512 characters."],
            "max_tokens": ["Must be greater than or equal to 1 and less than or equal to 131072."],
        },
        "2": {"stream": ["Not available in a batch: read the batch's results instead."]},
        "3": {"_schema": ["Must be a JSON object: a job's request and an optional custom_id."]},
    }
    upload = b'{"body": {"prompt": "ok"}}\n\n{"body": {"prompt": "ok"}, "url": "/v1/jobs"}\n{broken\n{"body": {}}\n'
    response = client.post("/v1/batches", data=upload, content_type="application/x-ndjson")
    assert response.status_code == 400
    lines = response.json["error"]["fields"]["lines"]
    assert sorted(lines) == ["3", "4", "5"]  # line numbers count the blank line
    assert lines["3"] == {"url": ["Unknown field."]}
    assert "Not valid JSON" in lines["4"]["_schema"][0]
    assert set(lines["5"]["body"]) == {"prompt", "messages"}
    for body, field in [({}, "requests"), ({"requests": []}, "requests"), ({"requests": [], "x": 1}, "x")]:
        response = client.post("/v1/batches", json=body)
        assert response.status_code == 400 and field in response.json["error"]["fields"], body
    response = client.post("/v1/batches", json={"requests": [{"prompt": "a"}], "metadata": {"k": 1}})
    assert response.status_code == 400 and "metadata" in response.json["error"]["fields"]
    assert client.post("/v1/batches", data="x", content_type="text/plain").status_code == 415
    assert batch_keys(client) == before  # nothing written was left behind, nothing queued


def test_limits_on_items_and_bytes_answer_413(tiny_worker):
    client = make_client(TINY_DB, BATCH_MAX_ITEMS=3, BATCH_MAX_BYTES=400, BATCH_MAX_JSON_BYTES=400)
    before = batch_keys(client)
    response = client.post("/v1/batches", json={"requests": [{"prompt": "a"}] * 4})
    assert response.status_code == 413 and "GENQUEUE_BATCH_MAX_ITEMS" in response.json["error"]["message"]
    response = client.post("/v1/batches", json={"requests": [{"prompt": "a" * 500}]})
    assert response.status_code == 413 and "GENQUEUE_BATCH_MAX_JSON_BYTES" in response.json["error"]["message"]
    # A JSONL upload without Content-Length (chunked) is counted as it is read.
    upload = jsonl({"body": {"prompt": "b" * 150}} for _ in range(3))
    assert len(upload) > 400
    response = client.post(
        "/v1/batches",
        input_stream=io.BytesIO(upload),
        content_type="application/jsonl",
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413 and response.json["error"]["code"] == "batch_too_large"
    assert batch_keys(client) == before
    assert post_batch(client, [{"prompt": "a", "max_tokens": 1}] * 3)["request_counts"]["total"] == 3


def test_a_batch_is_visible_to_its_own_key_alone(tiny_worker):
    alice, bob = "gq_alice-batch", "gq_bob-batch"
    keyed = make_client(TINY_DB, API_KEYS=f"alice:{hash_key(alice)},bob:{hash_key(bob)}")
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    response = keyed.post("/v1/batches", json={"requests": [{"prompt": "mine", "max_tokens": 2}]}, headers=as_alice)
    assert response.status_code == 201
    batch_id = response.json["id"]
    for method, path in [
        ("GET", f"/v1/batches/{batch_id}"),
        ("GET", f"/v1/batches/{batch_id}/results"),
        ("POST", f"/v1/batches/{batch_id}/cancel"),
        ("GET", f"/v1/jobs/{batch_id}-0"),
    ]:
        response = keyed.open(path, method=method, headers=as_bob)
        assert response.status_code == 404, (method, path)
    assert batch_id not in [b["id"] for b in keyed.get("/v1/batches", headers=as_bob).json["data"]]
    assert batch_id in [b["id"] for b in keyed.get("/v1/batches", headers=as_alice).json["data"]]
    assert keyed.get(f"/v1/batches/{batch_id}", headers=as_alice).status_code == 200


def started_at(client, job_id: str) -> float:
    return client.application.extensions["genqueue.jobs"].store.get(job_id).started_at


def test_cancel_mid_run_stops_running_items_never_starts_queued_ones_and_keeps_results(client):
    total, tokens = 40, 400  # 400 tokens take the tiny model a second or more: items run a while
    batch = post_batch(client, [{"prompt": f"Story {i}", "max_tokens": tokens, **GREEDY} for i in range(total)])
    batch_id = batch["id"]
    store = client.application.extensions["genqueue.jobs"].store
    wait_until = time.monotonic() + 120
    while client.get(f"/v1/batches/{batch_id}").json["request_counts"]["completed"] < 4:
        assert time.monotonic() < wait_until
        time.sleep(0.02)
    # Cancel while an item has just started: it has most of its tokens still to go.
    running = None
    while running is None:
        assert time.monotonic() < wait_until
        for index in range(total):
            record = store.get(f"{batch_id}-{index}")
            if record.status.value == "running" and 0 < len(store.events(record.id)) <= 50:
                running = index
                break
    response = client.post(f"/v1/batches/{batch_id}/cancel")
    cancelled_at = time.time()
    assert response.status_code == 202 and response.json["status"] == "cancelling"  # an item was running
    batch = wait_batch(client, batch_id, timeout_s=30)
    assert batch["status"] == "cancelled" and batch["cancelled_at"] >= batch["cancelling_at"]
    counts = batch["request_counts"]
    assert counts["completed"] >= 4 and counts["cancelled"] > total // 2
    assert counts["completed"] + counts["failed"] + counts["cancelled"] == total
    lines = results(client, batch_id)
    assert [line["index"] for line in lines] == list(range(total))  # every item has its line, in order
    never_ran = [line for line in lines if "error" in line]
    assert never_ran and all(line["error"]["code"] == "cancelled" for line in never_ran)
    for line in never_ran:
        assert store.get(f"{batch_id}-{line['index']}").started_at is None
    # No item started after the cancel; those running then stopped early with their partial output.
    starts = [start for i in range(total) if (start := store.get(f"{batch_id}-{i}").started_at) is not None]
    assert len(starts) >= 5 and max(starts) <= cancelled_at
    stopped = [line["result"] for line in lines if line.get("result", {}).get("finish_reason") == "cancelled"]
    assert lines[running]["result"] in stopped
    assert all(0 < r["usage"]["completion_tokens"] < tokens for r in stopped)
    assert client.post(f"/v1/batches/{batch_id}/cancel").status_code == 200  # again: harmless
    done = post_batch(client, [{"prompt": "x", "max_tokens": 1}])
    assert wait_batch(client, done["id"])["status"] == "completed"
    response = client.post(f"/v1/batches/{done['id']}/cancel")
    assert response.status_code == 409 and response.json["error"]["code"] == "batch_already_ended"
    assert client.post("/v1/batches/nope/cancel").status_code == 404


def test_results_headers_tell_the_batch_status_and_how_many_ended(tiny_worker):
    # Its items go to gpu.batch, which no worker of this database consumes: they end only when cancelled.
    client = make_client(TINY_DB, DEFAULT_QUEUE="gpu")
    batch_id = post_batch(client, [{"prompt": f"held {i}", "max_tokens": 2} for i in range(5)])["id"]

    def headers() -> tuple[str, str, list[int]]:
        response = client.get(f"/v1/batches/{batch_id}/results")
        lines = [json.loads(line)["index"] for line in response.get_data(as_text=True).splitlines()]
        return response.headers["X-Batch-Status"], response.headers["X-Batch-Ended"], lines

    assert headers() == ("in_progress", "0", [])
    for index in (1, 3):
        assert client.delete(f"/v1/jobs/{batch_id}-{index}").status_code == 200
    assert headers() == ("in_progress", "2", [1, 3])
    assert client.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    assert headers() == ("cancelled", "5", [0, 1, 2, 3, 4])
    done = post_batch(make_client(TINY_DB), [{"prompt": "x", "max_tokens": 1}] * 3)["id"]
    assert wait_batch(client, done)["status"] == "completed"
    response = client.get(f"/v1/batches/{done}/results")
    assert (response.headers["X-Batch-Status"], response.headers["X-Batch-Ended"]) == ("completed", "3")


def test_interactive_jobs_take_the_next_free_slot_ahead_of_a_running_batch(client, tiny_worker):
    concurrency = 4  # tiny_worker's
    batch_id = post_batch(client, [{"prompt": f"Item {i}", "max_tokens": 60, **GREEDY} for i in range(300)])["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/batches/{batch_id}").json["request_counts"]["completed"] < 8:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Twelve interactive jobs arrive at once: each stored and queued in one step, as the API does.
    store = client.application.extensions["genqueue.jobs"].store
    celery = client.application.extensions["genqueue.jobs"].celery
    jobs = [new_job_id() for _ in range(12)]
    messages = [task_message(celery, job_id, "cpu") for job_id in jobs]
    submitted_at = time.time()
    for i, (job_id, message) in enumerate(zip(jobs, messages, strict=True)):
        request = GenerationRequest(prompt=f"Now {i}", options=SamplingOptions(max_tokens=5))
        store.submit(job_id, request.to_dict(), "cpu", "", message)
    finished = [wait_job(client, job_id) for job_id in jobs]
    assert all(job["status"] == "succeeded" for job in finished)
    last_start = max(started_at(client, job_id) for job_id in jobs)
    redis = store.redis
    # Batch items that started while interactive jobs waited can only be those a slot had already
    # taken from the queue when the jobs arrived (at most one per slot), never further batch items.
    overtaking = 0
    for index in range(300):
        start = store.get(f"{batch_id}-{index}").started_at
        if start is not None and submitted_at < start < last_start:
            overtaking += 1
    assert overtaking <= concurrency, f"{overtaking} batch items started ahead of waiting interactive jobs"
    assert redis.llen(batch_queue("cpu")) > 0  # the batch was still waiting all along
    assert client.post(f"/v1/batches/{batch_id}/cancel").status_code in (200, 202)
    assert wait_batch(client, batch_id)["status"] == "cancelled"


def upload_peak_bytes(path, items: int) -> int:
    """Peak Python memory the API allocates while taking a JSONL upload of `items` requests from disk."""
    client = make_client(STORE_DB, BATCH_MAX_ITEMS=100_000)
    line = {"body": {"prompt": "Summarize the following paragraph in one sentence. " * 8, "max_tokens": 64}}
    path.write_bytes(jsonl({"custom_id": f"item-{i}", **line} for i in range(items)))
    client.application.extensions["genqueue.jobs"].store.redis.flushdb()
    with open(path, "rb") as upload:
        tracemalloc.start()
        response = client.post(
            "/v1/batches",
            input_stream=upload,
            content_type="application/jsonl",
            headers={"Content-Length": str(path.stat().st_size)},
        )
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert response.status_code == 201, response.json
    assert response.json["request_counts"]["total"] == items
    client.application.extensions["genqueue.jobs"].store.redis.flushdb()
    return peak


@pytest.mark.timeout(300)
def test_the_api_memory_does_not_grow_with_the_upload(tmp_path):
    # The items are written a chunk (tasks.batches.WRITE_CHUNK) at a time: only one chunk is held.
    small = upload_peak_bytes(tmp_path / "small.jsonl", 1_200)
    large = upload_peak_bytes(tmp_path / "large.jsonl", 4_800)  # 4x the items and bytes (2.6 MB)
    assert large < 1.5 * small, (small, large)
