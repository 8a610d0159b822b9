"""Each parameter of the request body, shown to take effect through a real worker (or refused)."""

import json

import pytest

from engine import GenerationRequest, Model, SamplingOptions
from tests.conftest import TINY_DB, make_client
from tests.helpers import WEATHER, generate, parse_sse, wait_job, weather_few_shot


def run(client, **body) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.json
    job = wait_job(client, response.json["id"])
    assert job["status"] == "succeeded", job
    return job["result"]


def test_temperature_0_is_deterministic_and_sampling_is_not(client):
    greedy = [run(client, prompt="Once upon a time", temperature=0, max_tokens=24)["response"] for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = {run(client, prompt="Once upon a time", temperature=1.5, max_tokens=24)["response"] for _ in range(3)}
    assert len(sampled) > 1 and greedy[0] not in sampled


def test_top_k_1_and_a_tiny_top_p_are_greedy_even_at_a_high_temperature(client):
    greedy = run(client, prompt="The sea", temperature=0, max_tokens=24)["response"]
    assert run(client, prompt="The sea", temperature=1.5, top_k=1, max_tokens=24)["response"] == greedy
    assert run(client, prompt="The sea", temperature=1.5, top_p=0.000001, max_tokens=24)["response"] == greedy
    assert run(client, prompt="The sea", temperature=1.5, top_p=0, max_tokens=24)["response"] == greedy
    # ...where the same temperature without them samples away from the greedy answer.
    assert run(client, prompt="The sea", temperature=1.5, max_tokens=24)["response"] != greedy


def test_max_tokens_bounds_the_completion(client):
    for n in (1, 5, 17):
        result = run(client, prompt="Count", temperature=0, max_tokens=n)
        assert result["usage"]["completion_tokens"] == n
        assert result["finish_reason"] == "length"


def test_repetition_penalty_is_ctranslate2s(client, tiny_dir):
    plain = run(client, prompt="hello", temperature=0, max_tokens=12)["response"]
    penalized = run(client, prompt="hello", temperature=0, max_tokens=12, repetition_penalty=2)["response"]
    assert penalized != plain
    expected = generate(
        Model(tiny_dir),
        GenerationRequest(prompt="hello", options=SamplingOptions(temperature=0, max_tokens=12, repetition_penalty=2)),
    )
    assert penalized == expected.response


def test_raw_skips_the_chat_template(client):
    templated = run(client, prompt="hello", temperature=0, max_tokens=2)["usage"]["prompt_tokens"]
    raw = run(client, prompt="hello", raw=True, temperature=0, max_tokens=2)["usage"]["prompt_tokens"]
    assert raw < 5 < templated


def test_zero_frequency_and_presence_penalties_are_accepted_as_no_ops(client):
    plain = run(client, prompt="hi", temperature=0, max_tokens=8)["response"]
    same = run(client, prompt="hi", temperature=0, max_tokens=8, frequency_penalty=0, presence_penalty=0.0)
    assert same["response"] == plain


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("seed", 42, "no per-request seed"),
        ("frequency_penalty", 0.5, "only 0 (no penalty) is accepted"),
        ("presence_penalty", 2, "only 0 (no penalty) is accepted"),
        ("repetition_penalty", 0, "must be above 0"),
    ],
)
def test_parameters_the_engine_cannot_honour_are_refused_saying_why(client, field, value, says):
    response = client.post("/v1/jobs", json={"prompt": "hi", field: value})
    assert response.status_code == 400
    assert says in " ".join(response.json["error"]["fields"][field])


def test_tools_are_rendered_into_the_prompt_and_random_output_never_fails_the_job(client):
    without = run(client, prompt="Weather in Paris?", temperature=1, max_tokens=20)
    flat = run(client, prompt="Weather in Paris?", tools=[WEATHER], temperature=1, max_tokens=20)
    wrapped = run(
        client,
        prompt="Weather in Paris?",
        tools=[{"type": "function", "function": WEATHER}],
        temperature=1,
        max_tokens=20,
    )
    assert flat["usage"]["prompt_tokens"] == wrapped["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 40
    assert flat["tool_calls"] == [] and flat["usage"]["completion_tokens"] == 20


def test_functions_are_rendered_into_the_prompt(client):
    without = run(client, prompt="Add 2 and 3", temperature=0, max_tokens=4)
    functions = [{"name": "add", "code": "export default (a, b) => a + b"}]
    with_functions = run(client, prompt="Add 2 and 3", functions=functions, temperature=0, max_tokens=4)
    assert with_functions["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 20


def test_the_real_model_calls_a_tool_through_the_queue_and_the_stream_carries_it(smol_client):
    messages = weather_few_shot("Paris")
    body = {"messages": messages, "tools": [WEATHER], "temperature": 0, "max_tokens": 40}
    job_id = smol_client.post("/v1/jobs", json=body).json["id"]
    result = wait_job(smol_client, job_id)["result"]
    assert result["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert result["finish_reason"] == "stop"
    events = parse_sse(smol_client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    assert json.loads(events[-2]["data"])["tool_calls"] == result["tool_calls"]


def test_an_unknown_lora_is_refused_listing_what_the_workers_serve(client):
    response = client.post("/v1/jobs", json={"prompt": "hi", "lora": "nope"})
    assert response.status_code == 400
    assert "the workers serve: none" in response.json["error"]["fields"]["lora"][0]


TOOL_OK = WEATHER


@pytest.mark.parametrize(
    "body, field, says",
    [
        ({"seed": 0}, "seed", "greater than or equal to 1"),
        ({"seed": 10000000000}, "seed", "less than or equal to 9999999999"),
        ({"seed": 1.5}, "seed", "Not a valid integer"),
        ({"repetition_penalty": 2.5}, "repetition_penalty", "less than or equal to 2"),
        ({"repetition_penalty": "1"}, "repetition_penalty", "Not a valid number"),
        ({"frequency_penalty": -1}, "frequency_penalty", "greater than or equal to 0"),
        ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
        ({"lora": ""}, "lora", "between 1 and 256"),
        ({"lora": 3}, "lora", "Not a valid string"),
        ({"functions": [{"name": "f"}]}, "functions", "Missing data for required field"),
        ({"functions": {"name": "f", "code": "x"}}, "functions", "Not a valid list"),
        ({"tools": [5]}, "tools", "Not a valid tool"),
        ({"tools": [{"name": "t"}]}, "tools", "Missing data for required field"),
        ({"tools": [{**TOOL_OK, "name": ""}]}, "tools", "Shorter than minimum length 1"),
        ({"tools": [{**TOOL_OK, "extra": 1}]}, "tools", "Unknown field"),
        ({"tools": [{"type": "function"}]}, "tools", "Missing data for required field"),
        ({"tools": [{"type": "tool", "function": TOOL_OK}]}, "tools", "Must be one of: function"),
        ({"tools": [{**TOOL_OK, "parameters": {"type": "object"}}]}, "tools", "Missing data"),
        ({"raw": True, "tools": [TOOL_OK]}, "raw", "tools and functions need the chat template"),
        ({"top_p": -0.5}, "top_p", "greater than or equal to 0"),
        ({"messages": [{"role": "user", "content": "x" * 131073}]}, "messages", "Longer than maximum length 131072"),
    ],
)
def test_invalid_new_fields_are_400_naming_the_field(client, body, field, says):
    body = {"prompt": "a", **body} if "messages" not in body else body
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert field in error["fields"], error
    assert says in json.dumps(error["fields"][field]), error


@pytest.mark.parametrize("field", ["repetition_penalty", "frequency_penalty", "presence_penalty", "top_p"])
def test_non_finite_penalties_are_400(client, field):
    response = client.post("/v1/jobs", data=f'{{"prompt": "a", "{field}": NaN}}', content_type="application/json")
    assert response.status_code == 400 and field in response.json["error"]["fields"]


def test_a_worker_fails_a_job_for_a_lora_it_does_not_have(tiny_worker):
    # With no worker up the API cannot check the name; the worker that takes the job does.
    import config
    from api.service.jobs import new_job_id
    from tasks.runtime.app import create_celery, task_message
    from tasks.store.jobs import JobStore

    store = JobStore.from_url(tiny_worker.url)
    request = GenerationRequest(prompt="hi", options=SamplingOptions(lora="nope", max_tokens=4))
    job_id = new_job_id()
    message = task_message(create_celery(config.load(REDIS_URL=tiny_worker.url)), job_id, "cpu")
    assert store.submit(job_id, request.to_dict(), "cpu", "", message).record is not None  # no limits checked
    job = wait_job(make_client(TINY_DB), job_id)
    assert job["status"] == "failed"
    assert job["error"] == {"code": "unknown_lora", "message": "unknown lora 'nope'; this worker serves: none"}
