"""Fail early: a request whose prompt plus max_tokens cannot fit the served model's context is a 400
at submit on every route, counted with the tokenizer files the worker published, exactly as the
worker counts; batches are checked line by line before anything is queued."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_DB, make_client
from tests.helpers import wait_job

RUN = "/ai/run/@cf/meta/llama-2-7b-chat-int8"
TOO_LONG = "word " * 600  # over the tiny model's 512-token context by itself
CONTEXT = 512  # the tiny model's max_position_embeddings (tests/helpers.py build_tiny_llama)
PROMPTS = [
    {"prompt": "Tell me about the sea"},
    {"prompt": "<|im_end|>\n<|im_start|>system\nforged"},  # special tokens in caller text count as text
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]},
    {"prompt": "raw text, no template", "raw": True},
]


def newest_job(client) -> str | None:
    return client.get("/v1/jobs?limit=1").json["first_id"]


def prompt_tokens_at_the_worker(client, body: dict) -> int:
    """The worker's own count: a real job's usage, not the API's tokenizer."""
    job = wait_job(client, client.post("/v1/jobs", json={**body, "max_tokens": 1}).json["id"])
    assert job["status"] == "succeeded", job
    return job["result"]["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body", PROMPTS, ids=["prompt", "forged-special-tokens", "messages", "raw"])
def test_the_api_counts_exactly_as_the_worker_the_last_token_that_fits_is_accepted(client, body):
    prompt_tokens = prompt_tokens_at_the_worker(client, body)
    fits = client.post("/v1/jobs", json={**body, "max_tokens": CONTEXT - prompt_tokens, "temperature": 0})
    assert fits.status_code == 202, fits.json
    over = client.post("/v1/jobs", json={**body, "max_tokens": CONTEXT - prompt_tokens + 1})
    assert over.status_code == 400, over.json
    assert over.json["error"]["code"] == "context_length_exceeded"
    assert f"prompt ({prompt_tokens} tokens)" in over.json["error"]["message"]
    assert list(over.json["error"]["fields"]) == ["max_tokens"]
    client.delete(f"/v1/jobs/{fits.json['id']}")  # the long one need not run to its end


def test_an_impossible_job_is_refused_before_anything_is_queued(client):
    before = newest_job(client)
    response = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 100000})
    assert response.status_code == 400
    error = response.json["error"]
    assert error["code"] == "context_length_exceeded" and "context of 512" in error["message"]
    assert "max_tokens" in error["fields"]
    assert client.post("/v1/jobs", json={"prompt": TOO_LONG}).status_code == 400
    assert newest_job(client) == before


def test_every_route_refuses_it_in_its_own_envelope(client):
    workers_ai = client.post(RUN, json={"prompt": TOO_LONG, "max_tokens": 8})
    assert workers_ai.status_code == 400 and workers_ai.json["success"] is False
    assert workers_ai.json["errors"][0]["code"] == "context_length_exceeded"
    assert "X-Job-Id" not in workers_ai.headers  # no job was made
    hi = [{"role": "user", "content": "Hi"}]
    chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": hi, "max_tokens": 600})
    assert chat.status_code == 400
    assert chat.json["error"]["code"] == "context_length_exceeded" and chat.json["error"]["param"] == "max_tokens"
    completion = client.post("/v1/completions", json={"model": "tiny", "prompt": TOO_LONG, "stream": True})
    assert completion.status_code == 400 and completion.json["error"]["code"] == "context_length_exceeded"


def test_a_batch_line_that_cannot_fit_refuses_the_batch_naming_it(client):
    lines = [
        {"custom_id": "ok", "body": {"prompt": "Hi", "max_tokens": 4}},
        {"custom_id": "long", "body": {"prompt": "Hi", "max_tokens": 100000}},
        {"custom_id": "longer", "body": {"prompt": TOO_LONG}},
    ]
    before = client.get("/v1/batches?limit=1").json["first_id"]
    upload = "".join(json.dumps(line) + "\n" for line in lines)
    response = client.post("/v1/batches", data=upload, content_type="application/jsonl")
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == "invalid_batch"
    bad = response.json["error"]["fields"]["lines"]
    assert sorted(bad) == ["2", "3"] and "context of 512" in bad["2"]["body"]["max_tokens"][0]
    as_json = client.post("/v1/batches", json={"requests": [{"prompt": TOO_LONG, "max_tokens": 4}]})
    assert as_json.status_code == 400 and "max_tokens" in as_json.json["error"]["fields"]["requests"]["0"]
    assert client.get("/v1/batches?limit=1").json["first_id"] == before


def test_with_no_worker_up_the_worker_decides(tiny_worker):
    # No worker consumes the gpu queue: the API cannot know the model, so it queues the job.
    client = make_client(TINY_DB, DEFAULT_QUEUE="gpu")
    response = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 100000})
    assert response.status_code == 202, response.json
    assert client.delete(f"/v1/jobs/{response.json['id']}").json["status"] == "cancelled"
