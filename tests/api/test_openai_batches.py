"""OpenAI's Batch workflow with the official openai client, end to end over real HTTP against a real
worker: upload the input file, create the batch, poll it, download the output and error files; per
key, checked line by line before anything is queued."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from api.auth import hash_key
from tests.conftest import TINY_DB, serve

KEYS = {"alice": "gq_alice-batch-key", "bob": "gq_bob-batch-key"}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def keyed_api(tiny_worker):
    server = serve(TINY_DB, API_KEYS=",".join(f"{name}:{hash_key(key)}" for name, key in KEYS.items()))
    yield server
    server.stop()


def client_for(server, name: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[name], max_retries=0, timeout=120)


def line(custom_id: str, body: dict, url: str = CHAT, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(entry) + "\n" for entry in lines).encode()


def upload(oai: openai.OpenAI, lines: list[dict]):
    return oai.files.create(file=("requests.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")


def poll(oai: openai.OpenAI, batch_id: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.2)
    raise TimeoutError(batch_id)


def native(server, name: str = "alice"):
    from genqueue.client import Client

    return Client(server.url, KEYS[name])


def test_the_whole_workflow_create_file_create_batch_poll_download(keyed_api):
    oai = client_for(keyed_api)
    questions = {f"q{i}": f"Tell me about number {i}" for i in range(3)}
    lines = [
        line(cid, {"model": "tiny", "messages": [{"role": "user", "content": q}], "max_tokens": 5, "temperature": 0})
        for cid, q in questions.items()
    ]
    source = upload(oai, lines)
    assert (source.object, source.purpose, source.status) == ("file", "batch", "processed")
    assert source.bytes == len(jsonl(lines).replace(b"\n", b"")) and source.filename == "requests.jsonl"
    assert oai.files.retrieve(source.id).id == source.id
    assert oai.files.content(source.id).content == jsonl(lines)

    created = oai.batches.create(
        input_file_id=source.id, endpoint=CHAT, completion_window="24h", metadata={"run": "nightly"}
    )
    assert created.object == "batch" and created.input_file_id == source.id and created.endpoint == CHAT
    assert created.status in ("in_progress", "finalizing", "completed") and created.metadata == {"run": "nightly"}
    batch = poll(oai, created.id)
    assert batch.status == "completed" and batch.error_file_id is None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 3, 0)
    assert batch.created_at <= batch.in_progress_at <= batch.completed_at and batch.usage.output_tokens == 15

    output = [json.loads(text) for text in oai.files.content(batch.output_file_id).text.splitlines()]
    assert [entry["custom_id"] for entry in output] == list(questions)
    with native(keyed_api) as client:
        for entry in output:
            assert entry["error"] is None and entry["response"]["status_code"] == 200
            body = entry["response"]["body"]
            assert body["object"] == "chat.completion" and body["model"] == "tiny"
            job = client.get(entry["response"]["request_id"])  # each request ran as a job of the batch
            assert body["choices"][0]["message"]["content"] == job.text and body["usage"]["completion_tokens"] == 5
    assert oai.files.retrieve(batch.output_file_id).purpose == "batch_output"
    # The native view of the same batch is OpenAI's shape too; its native results still work.
    with native(keyed_api) as client:
        assert client.get_batch(batch.id).raw["output_file_id"] == batch.output_file_id


def test_completions_lines_and_the_error_file(keyed_api):
    oai = client_for(keyed_api)
    lines = [
        line(f"c{i}", {"model": "tiny", "prompt": f"Once {i}", "max_tokens": 3}, url="/v1/completions")
        for i in range(2)
    ]
    batch = poll(
        oai,
        oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/completions", completion_window="24h").id,
    )
    output = [json.loads(text) for text in oai.files.content(batch.output_file_id).text.splitlines()]
    assert [entry["response"]["body"]["object"] for entry in output] == ["text_completion"] * 2


def test_requests_that_did_not_succeed_go_to_the_error_file(tiny_worker):
    # A queue no worker consumes: the requests wait, and are cancelled one by one (the batch is not).
    server = serve(TINY_DB, DEFAULT_QUEUE="gpu", API_KEYS=f"alice:{hash_key(KEYS['alice'])}")
    try:
        oai = client_for(server)
        lines = [
            line(f"r{i}", {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]})
            for i in range(2)
        ]
        created = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint=CHAT, completion_window="24h")
        with native(server) as client:
            for index in range(2):
                assert client.cancel(f"{created.id}-{index}").status == "cancelled"
        batch = poll(oai, created.id)
        assert batch.status == "completed" and batch.output_file_id is None  # OpenAI's completed; none succeeded
        assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 2)
        with native(server) as client:
            assert client.get_batch(created.id).status == "completed"  # the view is OpenAI's: completed
        errors = [json.loads(text) for text in oai.files.content(batch.error_file_id).text.splitlines()]
        assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in errors] == [
            ("r0", None, "cancelled"),
            ("r1", None, "cancelled"),
        ]
        with pytest.raises(openai.BadRequestError):
            oai.files.delete(batch.error_file_id)  # a batch's results expire with it
    finally:
        server.stop()


def test_every_line_is_checked_before_anything_is_queued(keyed_api):
    oai = client_for(keyed_api)
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    lines = [
        line("ok", ok),
        line("wrong-url", ok, url="/v1/completions"),
        line("ok", ok),  # a custom_id used twice
        line("too-long", {**ok, "max_tokens": 100000}),
        line("bad-param", {**ok, "seed": 3}),
        {"custom_id": "no-method", "url": CHAT, "body": ok},
        line("streams", {**ok, "stream": True}),
        line("other-model", {**ok, "model": "gpt-4o"}),
    ]
    before = native(keyed_api).list_batches(1).first_id
    with pytest.raises(openai.BadRequestError) as caught:
        oai.batches.create(input_file_id=upload(oai, lines).id, endpoint=CHAT, completion_window="24h")
    error = caught.value.body
    assert error["code"] == "invalid_batch" and error["param"] == "lines"
    assert "7 of 8 requests are invalid (by line: 2, 3, 4, 5, 6, 7, 8)" in error["message"]
    assert native(keyed_api).list_batches(1).first_id == before

    with pytest.raises(openai.NotFoundError) as caught:  # the model must be served
        other = upload(oai, [line("x", {**ok, "model": "gpt-4o"})])
        oai.batches.create(input_file_id=other.id, endpoint=CHAT, completion_window="24h")
    assert caught.value.body["code"] == "model_not_found" and "tiny" in caught.value.body["message"]
    for bad in ({"endpoint": "/v1/embeddings"}, {"completion_window": "1h"}):
        args = {"input_file_id": upload(oai, [line("x", ok)]).id, "endpoint": CHAT, "completion_window": "24h", **bad}
        with pytest.raises(openai.BadRequestError) as caught:
            oai.batches.create(**args)
        assert caught.value.body["param"] == next(iter(bad))


def test_uploads_are_checked_and_files_are_each_keys_own(keyed_api):
    alice, bob = client_for(keyed_api), client_for(keyed_api, "bob")
    with pytest.raises(openai.BadRequestError) as caught:
        alice.files.create(file=("x.jsonl", io.BytesIO(b'{"custom_id": "a"}\nnot json\n[1]\n')), purpose="batch")
    assert caught.value.body["code"] == "invalid_file" and "by line: 2, 3" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        alice.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"

    mine = upload(alice, [line("x", {"model": "tiny", "prompt": "Hi"})])
    for call in (
        lambda: bob.files.retrieve(mine.id),
        lambda: bob.files.content(mine.id),
        lambda: bob.files.delete(mine.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=mine.id, endpoint=CHAT, completion_window="24h")
    assert mine.id in [f.id for f in alice.files.list()] and mine.id not in [f.id for f in bob.files.list()]
    deleted = alice.files.delete(mine.id)
    assert deleted.deleted is True and deleted.id == mine.id
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(mine.id)


def test_an_upload_over_the_limits_is_413(tiny_worker):
    server = serve(TINY_DB, BATCH_MAX_BYTES=1000, BATCH_MAX_ITEMS=3)
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for lines in ([{"custom_id": "x" * 2000}], [{"i": i} for i in range(4)]):
            with pytest.raises(openai.APIStatusError) as caught:
                oai.files.create(file=("big.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
            assert caught.value.status_code == 413
        assert oai.files.list().data == []  # nothing was kept
    finally:
        server.stop()
