"""Tools on /v1/chat/completions and metadata on every job, driven by the official openai client over
real HTTP (SmolLM2 for real tool calls, the tiny model for shapes)."""

from __future__ import annotations

import json

import openai
import pytest

from api.openai.protocol import answer_content
from api.openai.serving import ContentFilter
from tests.helpers import WEATHER, wait_job, weather_few_shot

TOOLS = [{"type": "function", "function": WEATHER}]
CHAT = [{"role": "user", "content": "Tell me about the sea"}]


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def openai_few_shot(city: str) -> list[dict]:
    """weather_few_shot's turns, with each example call as OpenAI's assistant tool_calls (content null)."""
    turns = []
    for index, turn in enumerate(weather_few_shot(city)):
        if turn["role"] == "assistant":
            call = json.loads(turn["content"].removeprefix("<tool_call>").removesuffix("</tool_call>"))
            function = {"name": call["name"], "arguments": json.dumps(call["arguments"])}
            turn = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"c{index}", "type": "function", "function": function}],
            }
        turns.append(turn)
    return turns


def test_the_model_calls_a_tool_in_openais_shape_sync_and_streamed(smol_api, smol_worker):
    oai = client_for(smol_api)
    args = {"model": "smollm2-135m-instruct", "tools": TOOLS, "temperature": 0, "max_tokens": 40}
    raw = oai.chat.completions.with_raw_response.create(messages=openai_few_shot("Paris"), **args)
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # the reply was nothing but the call
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The assistant turns sent as tool_calls read to the model exactly as the native few-shot's markup.
    from genqueue.client import Client

    with Client(smol_api.url) as native:
        job = native.wait(
            native.submit(
                {"messages": weather_few_shot("Paris"), "tools": [WEATHER], "temperature": 0, "max_tokens": 40}
            ).id
        )
    assert job.result.usage.prompt_tokens == completion.usage.prompt_tokens
    assert job.result.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]

    chunks = list(oai.chat.completions.create(messages=openai_few_shot("Paris"), stream=True, **args))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == ""  # the call's markup is not content, in the stream as in the answer
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    [delta] = deltas
    assert (delta.index, delta.type, delta.function.name) == (0, "function", "get_weather")
    assert json.loads(delta.function.arguments) == {"city": "Paris"} and delta.id.startswith("call_0_job_")
    assert call.id == f"call_0_{raw.headers['X-Job-Id']}"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_offers_no_tools_and_forcing_a_call_is_refused(tiny_api):
    oai = client_for(tiny_api)
    plain = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    offered = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, tools=TOOLS)
    declined = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, tools=TOOLS, tool_choice="none")
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tools are in the prompt
    assert declined.usage.prompt_tokens == plain.usage.prompt_tokens
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, tool_choice=choice)
        assert caught.value.body["param"] == "tool_choice" and "constrained decoding" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="tiny", messages=CHAT, tool_choice="auto")
    assert caught.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "18C"}])
    assert caught.value.body["param"].startswith("messages[0]")  # a tool turn names the call it answers


def test_a_tool_turn_answers_a_call_and_the_job_runs(tiny_api):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C and sunny"},
    ]
    answer = client_for(tiny_api).chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=3)
    assert answer.usage.completion_tokens == 3


@pytest.mark.parametrize(
    "text",
    [
        "plain text, no call",
        'Sure.<tool_call>{"name": "f", "arguments": {}}</tool_call>',
        "<tool_call>{}",
        "a <tool_ca",
    ],
)
@pytest.mark.parametrize("made_calls", [True, False])
def test_streamed_content_adds_up_to_the_answers_content(text, made_calls):
    for size in (1, 3, 7):
        content = ContentFilter(active=True)
        sent = "".join(content.feed(text[i : i + size]) for i in range(0, len(text), size))
        sent += content.finish(made_calls)
        assert sent == (answer_content(text, made_calls) or "")


def test_metadata_is_returned_with_the_job_on_every_route(client, tiny_api):
    labels = {"team": "ml", "run": "nightly"}
    job = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 2, "metadata": labels}).json
    assert job["metadata"] == labels and wait_job(client, job["id"])["metadata"] == labels
    listed = client.get("/v1/jobs?limit=5").json["data"]
    assert next(j for j in listed if j["id"] == job["id"])["metadata"] == labels
    assert (
        wait_job(client, client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 2}).json["id"])["metadata"] == {}
    )

    oai = client_for(tiny_api)
    chat = oai.chat.completions.with_raw_response.create(model="tiny", messages=CHAT, max_tokens=2, metadata=labels)
    assert wait_job(client, chat.headers["X-Job-Id"])["metadata"] == labels
    completion = oai.completions.with_raw_response.create(
        model="tiny", prompt="Hi", max_tokens=2, extra_body={"metadata": labels}
    )
    assert wait_job(client, completion.headers["X-Job-Id"])["metadata"] == labels

    for bad in ({str(i): "v" for i in range(17)}, {"k": 1}, {"": "v"}, ["k"], {"k": "v" * 513}):
        response = client.post("/v1/jobs", json={"prompt": "Hi", "metadata": bad})
        assert (
            response.status_code == 400 and "at most 16 string pairs" in response.json["error"]["fields"]["metadata"][0]
        )
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model="tiny", messages=CHAT, metadata=bad)
        assert caught.value.body["param"] == "metadata"
