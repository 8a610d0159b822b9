"""The Workers AI-compatible endpoint: Cloudflare's envelope, its stream, and its errors."""

import pytest

from tests.conftest import TINY_DB, make_client
from tests.helpers import parse_sse, sse_text, wait_job

RUN = "/ai/run/@cf/meta/llama-2-7b-chat-int8"
ACCOUNT_RUN = "/client/v4/accounts/0123456789abcdef/ai/run/@cf/meta/llama-2-7b-chat-int8"


@pytest.mark.parametrize("path", [RUN, ACCOUNT_RUN])
def test_run_answers_the_finished_generation_in_cloudflares_envelope(client, path):
    response = client.post(path, json={"prompt": "Hello", "temperature": 0, "max_tokens": 9})
    assert response.status_code == 200, response.json
    body = response.json
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    result = body["result"]
    assert set(result) == {"response", "tool_calls", "usage", "finish_reason"}
    assert result["usage"]["completion_tokens"] == 9 and result["finish_reason"] == "length"
    # It ran as a job of the queue: the jobs API has the same result.
    job = wait_job(client, response.headers["X-Job-Id"])
    assert job["result"] == result


def test_the_same_body_gives_the_same_answer_as_the_jobs_api(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 12}
    via_run = client.post(RUN, json=body).json["result"]
    via_jobs = wait_job(client, client.post("/v1/jobs", json=body).json["id"])["result"]
    assert via_run == via_jobs


def test_stream_true_answers_the_jobs_sse_stream(client):
    response = client.post(ACCOUNT_RUN, json={"prompt": "Stream", "stream": True, "temperature": 0, "max_tokens": 10})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = parse_sse(response.get_data(as_text=True))
    assert events[-1]["data"] == "[DONE]"
    job = wait_job(client, response.headers["X-Job-Id"])
    assert sse_text(events) == job["result"]["response"]


@pytest.mark.parametrize(
    "body, field",
    [({}, "prompt"), ({"prompt": "a", "seed": 7}, "seed"), ({"prompt": "a", "top_k": 99}, "top_k")],
)
def test_invalid_bodies_are_400_in_the_envelope(client, body, field):
    response = client.post(RUN, json=body)
    assert response.status_code == 400
    assert response.json["success"] is False and response.json["result"] is None
    error = response.json["errors"][0]
    assert error["code"] == "invalid_request" and field in error["fields"] and field in error["message"]


def test_non_json_and_malformed_bodies_are_errors_in_the_envelope(client):
    response = client.post(RUN, data="prompt=hi", content_type="text/plain")
    assert response.status_code == 415 and response.json["errors"][0]["code"] == "unsupported_media_type"
    response = client.post(RUN, data="{oops", content_type="application/json")
    assert response.status_code == 400 and response.json["errors"][0]["code"] == "malformed_json"


def test_a_job_the_model_refuses_is_a_400_in_the_envelope(client):
    response = client.post(RUN, json={"prompt": "word " * 600, "max_tokens": 8})
    assert response.status_code == 400
    assert response.json["success"] is False
    assert response.json["errors"][0]["code"] == "context_length_exceeded"
    assert response.json["errors"][0]["fields"] == {"max_tokens": [response.json["errors"][0]["message"]]}


def test_a_job_that_does_not_end_in_time_is_a_504_and_goes_on(tiny_worker):
    impatient = make_client(TINY_DB, SYNC_TIMEOUT_S=0.01)
    response = impatient.post(RUN, json={"prompt": "Long", "temperature": 0, "max_tokens": 200})
    assert response.status_code == 504
    assert response.json["errors"][0]["code"] == "timeout"
    job = wait_job(impatient, response.headers["X-Job-Id"])
    assert job["status"] == "succeeded" and job["result"]["usage"]["completion_tokens"] == 200


def test_other_methods_are_refused(client):
    assert client.get(RUN).status_code == 405


def test_the_served_models_own_name_runs_it_too(client):
    body = {"prompt": "Hello", "temperature": 0, "max_tokens": 6}
    by_name = client.post("/ai/run/tiny", json=body)
    assert by_name.status_code == 200, by_name.json
    assert by_name.json["result"] == client.post(RUN, json=body).json["result"]
    account = client.post("/client/v4/accounts/abc/ai/run/tiny", json=body)
    assert account.status_code == 200 and account.json["success"] is True


@pytest.mark.parametrize("path", ["/ai/run/@cf/meta/llama-3-8b-instruct", "/client/v4/accounts/abc/ai/run/@cf/x/y"])
def test_a_model_not_served_is_a_clear_error_in_the_envelope_naming_the_served_ones(client, path):
    response = client.post(path, json={"prompt": "Hello"})
    assert response.status_code == 404
    assert response.json["success"] is False and response.json["result"] is None
    error = response.json["errors"][0]
    assert error["code"] == "model_not_found"
    assert "serves: tiny, @cf/meta/llama-2-7b-chat-int8" in error["message"]


def test_anything_under_ai_answers_in_cloudflares_envelope(client):
    for response in (client.get("/ai/run/@cf/meta/llama-3-8b-instruct"), client.post("/ai/models/search")):
        assert response.status_code in (404, 405)
        assert response.json["success"] is False and response.json["errors"][0]["code"] in (
            "not_found",
            "method_not_allowed",
        )
