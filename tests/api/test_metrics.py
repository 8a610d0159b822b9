"""GET /metrics and /readyz, read from Redis, with figures recorded by real worker processes."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from tasks.store import keys
from tests.conftest import STORE_DB, TINY_DB, make_client
from tests.helpers import wait_job

HISTOGRAMS = ("time_to_first_token_seconds", "job_duration_seconds", "queue_wait_seconds", "engine_batch_size")


def scrape(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


def jobs(samples, state: str) -> float:
    return samples[("genqueue_jobs_total", ("state", state))]


def test_a_job_through_a_real_worker_moves_the_workers_figures(client):
    before = scrape(client)
    submitted = client.post("/v1/jobs", json={"prompt": "Count", "temperature": 0, "max_tokens": 12})
    job = wait_job(client, submitted.json["id"])
    assert job["status"] == "succeeded"
    deadline = time.monotonic() + 10  # the worker records its figures just after it ends the job
    while jobs(after := scrape(client), "succeeded") == jobs(before, "succeeded") and time.monotonic() < deadline:
        time.sleep(0.1)

    def delta(*key) -> float:
        return after[key] - before.get(key, 0)

    assert delta("genqueue_jobs_total", ("state", "queued")) == 1  # recorded by the API
    assert delta("genqueue_jobs_total", ("state", "running")) == 1  # the rest by the worker process
    assert delta("genqueue_jobs_total", ("state", "succeeded")) == 1
    assert delta("genqueue_jobs_total", ("state", "failed")) == 0
    assert (
        delta(
            "genqueue_generated_tokens_total",
        )
        == 12
    )
    assert (
        delta(
            "genqueue_prompt_tokens_total",
        )
        == job["result"]["usage"]["prompt_tokens"]
    )
    for name in HISTOGRAMS:
        assert (
            delta(
                f"genqueue_{name}_count",
            )
            >= 1
        ), name
        assert after[(f"genqueue_{name}_bucket", ("le", "+Inf"))] == after[(f"genqueue_{name}_count",)]
    assert (
        delta(
            "genqueue_job_duration_seconds_sum",
        )
        > 0
    )
    # end to end covers the queue wait and the first token
    assert delta(
        "genqueue_job_duration_seconds_sum",
    ) >= delta(
        "genqueue_time_to_first_token_seconds_sum",
    )
    assert after[("genqueue_workers", ("queue", "cpu"))] >= 1
    assert after[("genqueue_queue_depth", ("queue", "cpu"))] == 0


def test_a_failed_job_counts_as_failed(client, tiny_worker):
    # The API refuses a prompt over the context at submit; one queued past it (as when no worker was
    # up to tell the API the model) fails at the worker.
    import config
    from api.service.jobs import new_job_id
    from engine import GenerationRequest, SamplingOptions
    from tasks.runtime.app import create_celery, task_message
    from tasks.store.jobs import JobStore

    before = scrape(client)
    request = GenerationRequest(prompt="word " * 600, options=SamplingOptions(max_tokens=4))
    job_id = new_job_id()
    message = task_message(create_celery(config.load(REDIS_URL=tiny_worker.url)), job_id, "cpu")
    assert JobStore.from_url(tiny_worker.url).submit(job_id, request.to_dict(), "cpu", "", message).record is not None
    job = wait_job(client, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "context_length_exceeded"
    deadline = time.monotonic() + 10
    while jobs(after := scrape(client), "failed") == jobs(before, "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jobs(after, "failed") - jobs(before, "failed") == 1


def test_waiting_jobs_show_in_queue_depth_and_readiness_says_what_is_missing():
    client = make_client(STORE_DB)  # no worker consumes this database's queues
    client.application.extensions["genqueue.jobs"].store.redis.flushdb()
    for _ in range(2):
        assert client.post("/v1/jobs", json={"prompt": "wait"}).status_code == 202
    assert scrape(client)[("genqueue_queue_depth", ("queue", "cpu"))] == 2
    assert scrape(client)[("genqueue_workers", ("queue", "cpu"))] == 0
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json["missing"] == ["no worker with a loaded model consumes the 'cpu' queue"]
    assert ready.json["queues"]["cpu"] == {"workers": 0, "models": [], "waiting": 2}


def test_readiness_covers_every_queue_that_has_jobs_routed_to_it(client):
    assert client.get("/readyz").json["queues"]["cpu"]["models"] == ["tiny"]
    gpu_client = make_client(TINY_DB, DEFAULT_QUEUE="gpu")  # the tiny worker consumes cpu only
    redis_client = client.application.extensions["genqueue.jobs"].store.redis
    waiting_before = redis_client.llen(keys.broker_queue("gpu"))
    job_id = gpu_client.post("/v1/jobs", json={"prompt": "gpu please"}).json["id"]
    try:
        ready = gpu_client.get("/readyz")  # this API sends its jobs to gpu
        assert ready.status_code == 503
        waiting = waiting_before + 1
        assert ready.json["missing"] == ["no worker with a loaded model consumes the 'gpu' queue"]
        assert ready.json["queues"] == {"gpu": {"workers": 0, "models": [], "waiting": waiting}}
        assert client.get("/readyz").status_code == 200  # the cpu API is served
    finally:
        gpu_client.delete(f"/v1/jobs/{job_id}")  # cancelled: it never runs, wherever its message goes
