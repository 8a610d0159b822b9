"""Llama-2-chat's format through the whole stack: HTTP, the queue, a real worker process on the tiny
Llama-2-format model (tests/llama2.py), and back, on the native and the Workers AI routes.

The model replies REPLY to every chat prompt and stops at </s> by itself; prompt token counts are
checked against transformers' apply_chat_template on the same conversation."""

import json
import threading

import pytest

from engine.tools import Tool, system_prompt_section
from genqueue.client import Client
from tests.conftest import LLAMA2_DB, make_client, serve
from tests.helpers import WEATHER, parse_sse, sse_text, wait_job
from tests.llama2 import REPLY, REPLY_PIECES

RUN = "/ai/run/@cf/meta/llama-2-7b-chat-int8"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello, how can I help you today?"},
    {"role": "user", "content": "Tell me about Rome"},
]


@pytest.fixture
def llama2_client(llama2_worker):
    return make_client(LLAMA2_DB)


@pytest.fixture(scope="module")
def reference(llama2_dir):
    """transformers' tokenizer with the model's template: an independent count of prompt tokens."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(llama2_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = json.loads((llama2_dir / "tokenizer_config.json").read_text())["chat_template"]
    return lambda messages: len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def finished(client, body: dict) -> dict:
    job = wait_job(client, client.post("/v1/jobs", json={"temperature": 0, "max_tokens": 64, **body}).json["id"])
    assert job["status"] == "succeeded", job
    return job


def chunks_of(client, job_id: str) -> list[str]:
    events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    return [json.loads(e["data"])["response"] for e in events if e["data"] not in (None, "[DONE]")]


@pytest.mark.parametrize(
    "body, messages",
    [
        ({"prompt": "What is the capital of France?"}, [{"role": "user", "content": "What is the capital of France?"}]),
        ({"messages": [SYSTEM, TURNS[0]]}, [SYSTEM, TURNS[0]]),
        ({"messages": TURNS}, TURNS),
        ({"messages": [SYSTEM, *TURNS]}, [SYSTEM, *TURNS]),
    ],
    ids=["prompt", "system", "multi-turn", "system-multi-turn"],
)
def test_chat_requests_get_the_whole_reply_ending_at_eos(llama2_client, reference, body, messages):
    job = finished(llama2_client, body)
    result = job["result"]
    assert result["response"] == REPLY and result["finish_reason"] == "stop" and result["tool_calls"] == []
    assert result["usage"] == {
        "prompt_tokens": reference(messages),
        "completion_tokens": len(REPLY_PIECES),
        "total_tokens": reference(messages) + len(REPLY_PIECES),
    }
    chunks = chunks_of(llama2_client, job["id"])
    assert len(chunks) > len(REPLY_PIECES) // 2 and not any("\ufffd" in chunk for chunk in chunks)
    assert "".join(chunks) == REPLY


def test_a_raw_prompt_gets_one_bos_and_goes_on_from_its_last_token(llama2_client):
    result = finished(llama2_client, {"prompt": "Hello", "raw": True})["result"]
    assert result["usage"]["prompt_tokens"] == 2  # <s> ▁Hello
    assert result["response"] == REPLY.removeprefix("Hello") and result["finish_reason"] == "stop"


def test_tools_are_offered_in_the_system_block_and_the_call_is_read_back(llama2_client, reference):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    result = finished(llama2_client, {"messages": [SYSTEM, question], "tools": [WEATHER]})["result"]
    assert result["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    system = {"role": "system", "content": f"{SYSTEM['content']}\n\n{system_prompt_section([Tool.from_dict(WEATHER)])}"}
    assert result["usage"]["prompt_tokens"] == reference([system, question])


@pytest.mark.parametrize(
    "stop, response, tokens",  # tokens: the generation ends at the piece that completes the stop string
    [
        (["wörld"], "Hello, ", 6),
        (["👋", "nowhere"], "Hello, wörld! ", 12),
        ("</tool_call>", REPLY.removesuffix("</tool_call>"), 19),
    ],
)
def test_stop_strings_end_the_reply_and_the_stream_never_shows_them(llama2_client, stop, response, tokens):
    job = finished(llama2_client, {"prompt": "Hi", "stop": stop})
    assert job["result"]["response"] == response and job["result"]["finish_reason"] == "stop"
    assert job["result"]["usage"]["completion_tokens"] == tokens
    assert "".join(chunks_of(llama2_client, job["id"])) == response


def test_max_tokens_cuts_the_reply_between_whole_characters(llama2_client):
    result = finished(llama2_client, {"prompt": "Hi", "max_tokens": 5})["result"]
    assert (result["response"], result["finish_reason"], result["usage"]["completion_tokens"]) == (
        "Hello, wö",
        "length",
        5,
    )


def test_concurrent_jobs_each_get_the_whole_reply(llama2_client):
    prompts = ["Hi", "What is the capital of France?", "Tell me about Rome", "Write a short poem about the sea"]
    ids = [llama2_client.post("/v1/jobs", json={"prompt": p, "temperature": 0}).json["id"] for p in prompts]
    results = [wait_job(llama2_client, job_id)["result"] for job_id in ids]
    assert [r["response"] for r in results] == [REPLY] * len(prompts)


def test_workers_ai_route_answers_and_streams_the_reply(llama2_client, reference):
    body = {"messages": [SYSTEM, *TURNS], "temperature": 0}
    answer = llama2_client.post(RUN, json=body)
    assert answer.status_code == 200 and answer.json["success"] is True
    assert answer.json["result"] == {
        "response": REPLY,
        "tool_calls": [],
        "usage": {
            "prompt_tokens": reference([SYSTEM, *TURNS]),
            "completion_tokens": len(REPLY_PIECES),
            "total_tokens": reference([SYSTEM, *TURNS]) + len(REPLY_PIECES),
        },
        "finish_reason": "stop",
    }
    streamed = llama2_client.post(RUN, json={**body, "stream": True})
    assert streamed.status_code == 200 and sse_text(parse_sse(streamed.get_data(as_text=True))) == REPLY


def test_workers_ai_route_refuses_turns_out_of_order_in_its_envelope(llama2_client):
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}]}
    answer = llama2_client.post(RUN, json=body)
    assert answer.status_code == 400 and answer.json["success"] is False
    error = answer.json["errors"][0]
    assert error["code"] == "chat_template_error" and "alternate" in error["message"]


def test_a_stream_read_over_http_while_the_job_runs_joins_to_the_reply(llama2_worker):
    server = serve(LLAMA2_DB)
    try:
        client = Client(server.url)
        texts: list[str] = []
        body = {"prompt": "Hi", "temperature": 0}
        thread = threading.Thread(target=lambda: texts.extend(e.text for e in client.stream(body)))
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive() and "".join(texts) == REPLY
    finally:
        server.stop()
