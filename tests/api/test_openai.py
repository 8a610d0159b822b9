"""The OpenAI-compatible endpoints, driven by the official openai client over real HTTP, with a real
worker behind them (the tiny random Llama for shapes and parameters, SmolLM2 for real answers)."""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.conftest import TINY_DB, redis_url
from tests.live import LiveServer

CHAT = [{"role": "user", "content": "Tell me about the sea"}]


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def oai(tiny_api):
    return client_for(tiny_api)


def native_job(server, job_id: str) -> dict:
    with urllib.request.urlopen(f"{server.url}/v1/jobs/{job_id}?wait=30", timeout=60) as response:
        return json.load(response)


def collect(stream) -> tuple[list, str]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, text


# -- models ----------------------------------------------------------------------------------------


def test_models_lists_the_model_the_workers_serve(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].object == "model" and models[0].owned_by == "genqueue"
    assert oai.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        oai.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"


# -- chat completions ------------------------------------------------------------------------------


def test_chat_completion_is_the_native_job_in_openai_shape(oai, tiny_api):
    raw = oai.chat.completions.with_raw_response.create(model="tiny", messages=CHAT, temperature=0, max_tokens=12)
    completion = raw.parse()
    job = native_job(tiny_api, raw.headers["X-Job-Id"])
    assert completion.id == f"chatcmpl-{job['id']}"
    assert completion.object == "chat.completion" and completion.model == "tiny"
    choice = completion.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == job["result"]["response"] and choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_max_completion_tokens_is_max_tokens(oai):
    completion = oai.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_completion_tokens=5)
    assert completion.usage.completion_tokens == 5


def test_chat_stream_sends_role_then_content_then_finish_and_usage_last(oai):
    sync = oai.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=20)
    stream = oai.chat.completions.create(
        model="tiny",
        messages=CHAT,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks, text = collect(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == sync.choices[0].message.content
    assert len(chunks) > 5  # streamed piece by piece, not in one block
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "length" and finish.usage is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_a_stream_without_include_usage_carries_no_usage(oai):
    chunks, _text = collect(oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_stop_ends_the_answer_before_the_stop_string_sync_and_streaming(oai):
    free = oai.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=40)
    text = free.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    stopped = oai.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=40, stop=[stop])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    chunks, streamed = collect(
        oai.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=40, stop=stop, stream=True)
    )
    assert streamed == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- text completions ------------------------------------------------------------------------------


def test_completion_takes_the_prompt_raw_sync_and_streaming(oai, tiny_api):
    raw = oai.completions.with_raw_response.create(
        model="tiny", prompt="Once upon a time", temperature=0, max_tokens=15
    )
    completion = raw.parse()
    job = native_job(tiny_api, raw.headers["X-Job-Id"])
    assert completion.object == "text_completion" and completion.id == f"cmpl-{job['id']}"
    assert completion.choices[0].text == job["result"]["response"]
    assert completion.usage.prompt_tokens == 4  # the raw prompt's own tokens: no chat template around it
    stream = oai.completions.create(
        model="tiny",
        prompt="Once upon a time",
        temperature=0,
        max_tokens=15,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 15


def test_completion_max_tokens_defaults_to_openais_16(oai):
    assert oai.completions.create(model="tiny", prompt="Hello", temperature=0).usage.completion_tokens == 16


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param, says",
    [
        ({"seed": 7}, "seed", "no per-call seed"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "no frequency penalty"),
        ({"presence_penalty": -1}, "presence_penalty", "no presence penalty"),
        ({"n": 2}, "n", "n must be 1"),
        ({"logprobs": True}, "logprobs", "not returned"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
            "tools[0].function.strict",
            "constrained",
        ),
        ({"parallel_tool_calls": False}, "parallel_tool_calls", "cannot be enforced"),
        ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "differ"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "At most 4"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "when stream is true"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "Must be one of"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
            "Only text",
        ),
        ({"messages": []}, "messages", "between 1 and 256"),
    ],
)
def test_unhonourable_or_invalid_parameters_are_openai_shaped_400s(oai, extra, param, says):
    body = {"model": "tiny", "messages": CHAT, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(**body)
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert says in error["message"], error


def test_unknown_arguments_are_refused_by_name(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="tiny", messages=CHAT, extra_body={"temprature": 0})
    assert caught.value.body["param"] == "temprature"
    assert "Unrecognized request argument" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="tiny", prompt="hi", echo=True)
    assert caught.value.body["param"] == "echo"


def test_neutral_values_of_unsupported_parameters_are_accepted(oai):
    completion = oai.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=2,
        n=1,
        frequency_penalty=0,
        presence_penalty=0.0,
        logprobs=False,
        seed=None,
        user="someone",
    )
    assert completion.usage.completion_tokens == 2


def test_an_unknown_model_is_a_404_listing_the_served_ones(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert caught.value.body["code"] == "model_not_found" and "tiny" in caught.value.body["message"]


def test_a_job_that_cannot_run_is_a_400_in_sync_and_an_error_event_in_a_stream(oai):
    too_long = [{"role": "user", "content": "word " * 600}]  # over the tiny model's 512-token context
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="tiny", messages=too_long, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.APIError, match="context of 512"):
        collect(oai.chat.completions.create(model="tiny", messages=too_long, max_tokens=4, stream=True))


def test_non_json_bodies_get_the_openai_error_shape(tiny_api):
    request = urllib.request.Request(
        f"{tiny_api.url}/v1/chat/completions", data=b"{oops", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert json.load(caught.value)["error"]["type"] == "invalid_request_error"


# -- the real model --------------------------------------------------------------------------------


def test_smollm2_answers_paris_and_a_stop_string_cuts_it_exactly(smol_api):
    oai = client_for(smol_api)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    [model] = [m.id for m in oai.models.list().data]
    answer = oai.chat.completions.create(model=model, messages=question, temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.choices[0].finish_reason == "stop"
    cut = oai.chat.completions.create(model=model, messages=question, temperature=0, stop=["Paris"])
    assert cut.choices[0].message.content == text[: text.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"
    _chunks, streamed = collect(
        oai.chat.completions.create(model=model, messages=question, temperature=0, stop=["Paris"], stream=True)
    )
    assert streamed == cut.choices[0].message.content


def test_a_sync_request_that_waits_too_long_is_a_504_and_its_job_goes_on():
    from tests.conftest import STORE_DB, make_client

    client = make_client(STORE_DB, SYNC_TIMEOUT_S=0.3)  # no worker consumes this database's queue
    [model] = client.get("/v1/models").json["data"]
    assert model["id"] == "smollm2-135m-instruct"  # the configured model, while no worker is up
    response = client.post("/v1/chat/completions", json={"model": model["id"], "messages": CHAT})
    assert response.status_code == 504
    assert response.json["error"]["code"] == "timeout"
    job_id = response.json["error"]["message"].split()[1]
    assert client.get(f"/v1/jobs/{job_id}").json["status"] == "queued"


def test_with_api_keys_the_openai_client_sends_its_key_and_errors_keep_openais_shape(tiny_worker):
    from api import create_app
    from api.auth import hash_key

    key = "gq_openai-test-key"
    server = LiveServer(create_app({"REDIS_URL": redis_url(TINY_DB), "API_KEYS": f"team:{hash_key(key)}"}))
    try:
        keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)
        assert keyed.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2).usage.completion_tokens == 2
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="gq_wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            wrong.models.list()
        assert caught.value.body["code"] == "forbidden" and caught.value.body["type"] == "invalid_request_error"
    finally:
        server.stop()


# -- the sampling extras of vLLM, TGI and llama.cpp -------------------------------------------------


def stored_options(job_id: str) -> dict:
    from tasks.store.jobs import JobStore

    return JobStore.from_url(redis_url(TINY_DB)).get(job_id).request["options"]


def native_text(server, body: dict) -> str:
    request = urllib.request.Request(
        f"{server.url}/v1/jobs", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return native_job(server, json.load(response)["id"])["result"]["response"]


def test_top_k_and_repetition_penalty_reach_the_engine_through_extra_body(oai, tiny_api):
    prompt = "The sea is"
    raw = oai.completions.with_raw_response.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, extra_body={"top_k": 1}
    )
    options = stored_options(raw.headers["X-Job-Id"])
    assert options["top_k"] == 1 and options["temperature"] == 1.0
    greedy = native_text(tiny_api, {"prompt": prompt, "raw": True, "max_tokens": 12, "temperature": 0})
    assert raw.parse().choices[0].text == greedy  # top_k 1 samples from one token: the greedy answer

    penalized = oai.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=12, temperature=0, extra_body={"repetition_penalty": 1.8}
    )
    assert stored_options(penalized.headers["X-Job-Id"])["repetition_penalty"] == 1.8
    native = native_text(tiny_api, {"messages": CHAT, "max_tokens": 12, "temperature": 0, "repetition_penalty": 1.8})
    plain = native_text(tiny_api, {"messages": CHAT, "max_tokens": 12, "temperature": 0})
    assert penalized.parse().choices[0].message.content == native != plain  # the engine applied it

    unlimited = oai.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=2, extra_body={"top_k": -1, "min_p": 0, "ignore_eos": False}
    )
    assert stored_options(unlimited.headers["X-Job-Id"])["top_k"] is None  # -1 (and 0): no limit, as vLLM's


@pytest.mark.parametrize(
    "extra, param, says",
    [
        ({"min_p": 0.05}, "min_p", "no min-p"),
        ({"typical_p": 0.9}, "typical_p", "no typical"),
        ({"min_tokens": 4}, "min_tokens", "min_length applies to a whole engine call"),
        ({"ignore_eos": True}, "ignore_eos", "end-of-turn"),
        ({"repeat_penalty": 1.1}, "repeat_penalty", "use repetition_penalty"),
        ({"guided_json": {"type": "object"}}, "guided_json", "constrained decoding"),
        ({"use_beam_search": True}, "use_beam_search", "beam search"),
        ({"top_k": 51}, "top_k", "Must be 1 to 50"),
        ({"top_k": -2}, "top_k", "Must be 1 to 50"),
        ({"top_k": 1.5}, "top_k", "Not a valid integer"),
        ({"repetition_penalty": 0}, "repetition_penalty", "must be above 0"),
        ({"repetition_penalty": 2.5}, "repetition_penalty", "less than or equal to 2"),
    ],
)
def test_extras_the_engine_cannot_honour_are_refused_by_name(oai, extra, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body=extra)
    assert caught.value.body["param"] == param, caught.value.body
    assert says in caught.value.body["message"], caught.value.body


def test_a_sync_request_whose_job_is_cancelled_is_a_409():
    from tasks.store import keys
    from tests.conftest import STORE_DB, make_client

    client = make_client(STORE_DB)  # no worker consumes this database's queue: the job waits, queued
    store = client.application.extensions["genqueue.jobs"].store
    marker = f"cancel me {secrets.token_hex(8)}"
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": marker}]}
    answered = []
    waiting = threading.Thread(target=lambda: answered.append(client.post("/v1/chat/completions", json=body)))
    waiting.start()
    job_id, deadline = None, time.monotonic() + 30
    while job_id is None:  # the waiting request's job, found by its prompt
        assert time.monotonic() < deadline
        for key in store.redis.scan_iter(keys.job("job_*"), count=1000):
            if marker in (store.redis.hget(key, "request") or ""):
                job_id = store.redis.hget(key, "id")
        time.sleep(0.05)
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    waiting.join(timeout=30)
    [response] = answered
    assert response.status_code == 409, response.json
    error = response.json["error"]
    assert (
        error["code"] == "job_cancelled"
        and job_id in error["message"]
        and set(error)
        == {
            "message",
            "type",
            "param",
            "code",
        }
    )
