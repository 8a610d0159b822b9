"""genqueue.Client, the typed client of the native API, over real HTTP against the app and the tiny
model's worker: each call's answer is checked against the HTTP API read directly."""

import io
import json
import urllib.request

import pytest

from genqueue import ApiClientError, Batch, Client, Job, Page, Result


@pytest.fixture
def api(tiny_api):
    with Client(tiny_api.url, timeout_s=120) as client:
        yield client


def raw_get(server, path: str) -> dict:
    with urllib.request.urlopen(server.url + path, timeout=60) as response:
        return json.load(response)


def test_submit_wait_and_get_give_typed_jobs(api, tiny_api):
    submitted = api.submit({"prompt": "Hi", "max_tokens": 5, "temperature": 0})
    assert isinstance(submitted, Job) and submitted.status == "queued" and submitted.result is None
    job = api.wait(submitted.id, timeout_s=60)
    assert job.ended and job.status == "succeeded"
    assert isinstance(job.result, Result)
    as_http = raw_get(tiny_api, f"/v1/jobs/{job.id}")
    assert job.raw == as_http and job.text == as_http["result"]["response"]
    assert job.result.usage.completion_tokens == as_http["result"]["usage"]["completion_tokens"] == 5
    assert job.result.finish_reason == "length" and job.finished_at == as_http["finished_at"]
    assert api.get(job.id) == job


def test_submit_with_wait_s_gives_the_ended_job_in_one_request(api, tiny_api):
    job = api.submit({"prompt": "Hi", "max_tokens": 5, "temperature": 0}, wait_s=60)
    assert job.ended and job.status == "succeeded" and job.result is not None
    assert job.result.usage.completion_tokens == 5
    assert job.raw == raw_get(tiny_api, f"/v1/jobs/{job.id}")


def test_stream_texts_add_up_to_the_result_and_follow_replays_them(api):
    stream = api.stream({"prompt": "Tell me a story", "max_tokens": 12, "temperature": 0})
    texts = list(stream.texts())
    assert len(texts) > 1 and stream.last is not None and stream.last.data["finish_reason"] == "length"
    job = api.get(stream.job_id)
    assert "".join(texts) == job.text
    assert "".join(list(api.follow(stream.job_id).texts())) == job.text
    with pytest.raises(ApiClientError) as caught:  # longer than the tiny model's context: refused at submit
        api.stream({"prompt": "word " * 600})
    assert (caught.value.status, caught.value.code) == (400, "context_length_exceeded")


def test_cancel_and_errors_are_typed(api):
    parked = api.submit({"prompt": "Hi", "queue": "gpu"})  # no gpu worker: it stays queued
    cancelled = api.cancel(parked.id)
    assert cancelled.status == "cancelled" and cancelled.ended
    done = api.wait(api.submit({"prompt": "Hi", "max_tokens": 1}).id, timeout_s=60)
    with pytest.raises(ApiClientError) as caught:
        api.cancel(done.id)
    assert (caught.value.status, caught.value.code) == (409, "job_already_ended")
    with pytest.raises(ApiClientError) as caught:
        api.submit({"prompt": "Hi", "max_tokens": 0})
    assert caught.value.status == 400 and "max_tokens" in caught.value.fields
    with pytest.raises(ApiClientError) as caught:
        Client("http://127.0.0.1:9").get("job_x")
    assert caught.value.status == 0 and caught.value.code == "unreachable"


def test_list_jobs_pages_and_jobs_iterates_every_page(api, tiny_api):
    ids = [api.submit({"prompt": f"list {i}", "max_tokens": 1}).id for i in range(3)]
    page = api.list_jobs(limit=2)
    assert isinstance(page, Page) and [job.id for job in page.data] == ids[::-1][:2] and page.has_more
    rest = api.list_jobs(limit=2, after=page.last_id)
    assert rest.data[0].id == ids[0]
    everything = [job.id for job in api.jobs(page_size=2)]
    assert everything[:3] == ids[::-1] and len(everything) == len(set(everything))
    for job_id in ids:
        api.wait(job_id, timeout_s=60)
    assert {job.id for job in api.jobs(status="succeeded")} >= set(ids)
    assert [job.raw for job in api.list_jobs(limit=3).data] == raw_get(tiny_api, "/v1/jobs?limit=3")["data"]


def test_batches_with_a_progress_callback(api, tiny_api):
    lines = b"".join(
        json.dumps({"custom_id": f"c{i}", "body": {"prompt": f"n {i}", "max_tokens": 2}}).encode() + b"\n"
        for i in range(4)
    )
    batch = api.create_batch(io.BytesIO(lines), len(lines), metadata={"run": "client"})
    assert isinstance(batch, Batch) and batch.request_counts.total == 4 and batch.metadata == {"run": "client"}
    seen: list[Batch] = []
    final = api.wait_batch(batch.id, poll_s=0.1, progress=seen.append, timeout_s=120)
    assert final.status == "completed" and final.request_counts.completed == 4 and final.usage.completion_tokens == 8
    assert seen[-1] == final and all(
        a.request_counts.ended <= b.request_counts.ended for a, b in zip(seen, seen[1:], strict=False)
    )
    as_http = raw_get(tiny_api, f"/v1/batches/{batch.id}")
    assert {**final.raw, "expires_at": None} == {**as_http, "expires_at": None}  # expires_at: read from the TTL left
    assert batch.id in [b.id for b in api.list_batches(limit=100).data]
    assert [job.id for job in api.jobs(batch_id=batch.id)] == [f"{batch.id}-{i}" for i in (3, 2, 1, 0)]
    results = [json.loads(line) for line in api.batch_results(batch.id).read().splitlines()]
    assert [r["custom_id"] for r in results] == ["c0", "c1", "c2", "c3"]
