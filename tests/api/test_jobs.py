import json
import time
import urllib.request

import pytest

from tests.conftest import STORE_DB, serve
from tests.helpers import parse_sse, sse_text, wait_job

GREEDY = {"temperature": 0, "max_tokens": 16}
WAIT_SLACK_S = 2  # from a job's end to its ?wait answer: milliseconds, generous for a loaded machine
KEEPALIVE_S = 0.3


def submit(client, **body):
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.json
    return response


def test_submit_answers_202_with_location_then_poll_until_done(client):
    response = submit(client, prompt="Hello there", **GREEDY)
    job = response.json
    assert job["status"] == "queued"
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert len(job["id"]) >= 22  # 144 random bits
    for _ in range(200):
        polled = client.get(response.headers["Location"]).json
        if polled["status"] in ("succeeded", "failed"):
            break
        __import__("time").sleep(0.05)
    assert polled["status"] == "succeeded", polled
    result = polled["result"]
    assert result["usage"]["completion_tokens"] == 16
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + 16
    assert result["tool_calls"] == []
    assert polled["error"] is None
    assert polled["created_at"] <= polled["started_at"] <= polled["finished_at"]


def test_wait_returns_as_soon_as_the_job_ends(client):
    # 400 tokens take the tiny model a while (about a second here): the wait starts long before the end.
    job_id = submit(client, prompt="Hello", temperature=0, max_tokens=400).json["id"]
    asked = time.time()
    job = client.get(f"/v1/jobs/{job_id}?wait=60").json
    answered = time.time()
    assert job["status"] == "succeeded" and job["result"]["usage"]["completion_tokens"] == 400
    finished_at = client.application.extensions["genqueue.jobs"].store.get(job_id).finished_at
    assert asked < finished_at  # it waited for the end...
    assert answered - finished_at < WAIT_SLACK_S  # ...and answered at once when it came, not at the 60 s


def test_submit_with_wait_answers_200_with_the_ended_job_as_soon_as_it_ends(client):
    asked = time.time()
    response = client.post("/v1/jobs?wait=60", json={"prompt": "Hello", "temperature": 0, "max_tokens": 400})
    answered = time.time()
    job = response.json
    assert response.status_code == 200, job
    assert job["status"] == "succeeded" and job["result"]["usage"]["completion_tokens"] == 400
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert client.get(response.headers["Location"]).json == job  # the job as stored, not a copy of another
    finished_at = client.application.extensions["genqueue.jobs"].store.get(job["id"]).finished_at
    assert asked < finished_at and answered - finished_at < WAIT_SLACK_S


def newest_job_id(client) -> str | None:
    return client.get("/v1/jobs?limit=1").json["first_id"]


@pytest.mark.parametrize(
    "wait, stream", [("-1", False), ("abc", False), ("61", False), ("1.5", False), ("", False), ("1", True)]
)
def test_submit_with_a_bad_wait_or_wait_with_stream_is_a_400_naming_it_and_queues_nothing(client, wait, stream):
    before = newest_job_id(client)
    response = client.post(f"/v1/jobs?wait={wait}", json={"prompt": "Hello", "stream": stream, **GREEDY})
    assert response.status_code == 400, response.get_data(as_text=True)
    assert list(response.json["error"]["fields"]) == ["wait"]
    assert newest_job_id(client) == before


@pytest.fixture(scope="module")
def quiet_api():
    """The API over HTTP on a database whose queue no worker consumes, with a short keep-alive interval."""
    server = serve(STORE_DB, SSE_KEEPALIVE_S=KEEPALIVE_S)
    yield server
    server.stop()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/jobs", {"prompt": "quiet", "stream": True}),
        (
            "/v1/chat/completions",
            {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "quiet"}], "stream": True},
        ),
    ],
    ids=["native", "openai"],
)
def test_a_quiet_stream_sends_keep_alive_comments_then_ends_with_its_job(quiet_api, path, body):
    request = urllib.request.Request(
        quiet_api.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # a silence of 5 s fails the test
        lines = (line for line in response if line.strip())
        if path == "/v1/chat/completions":
            assert next(lines).startswith(b"data: ")  # OpenAI's first chunk: the assistant's role
        started = time.monotonic()
        assert [next(lines) for _ in range(3)] == [b": keep-alive\n"] * 3
        # One every KEEPALIVE_S while nothing happens: not sooner (a busy loop), not much later.
        assert 2 * KEEPALIVE_S <= time.monotonic() - started < 3 * KEEPALIVE_S + 4
        cancel = urllib.request.Request(f"{quiet_api.url}/v1/jobs/{response.headers['X-Job-Id']}", method="DELETE")
        assert urllib.request.urlopen(cancel, timeout=10).status == 200
        assert list(lines)[-1] == b"data: [DONE]\n"


def test_wait_is_bounded_and_validated(client):
    job_id = submit(client, prompt="Hello", **GREEDY).json["id"]
    for bad in ("-1", "abc", "61"):
        response = client.get(f"/v1/jobs/{job_id}?wait={bad}")
        assert response.status_code == 400
        assert "wait" in response.json["error"]["fields"]


def test_stream_chunks_concatenate_to_the_stored_response(client):
    job_id = submit(client, prompt="Tell me a story", temperature=0, max_tokens=40).json["id"]
    body = client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True)
    events = parse_sse(body)
    assert events[-1]["data"] == "[DONE]"
    chunks = [e for e in events if e["data"] != "[DONE]"]
    assert [int(e["id"]) for e in chunks] == list(range(1, len(chunks) + 1))
    final = json.loads(chunks[-1]["data"])
    assert final["response"] == "" and final["usage"]["completion_tokens"] == 40
    assert final["finish_reason"] == "length"
    stored = wait_job(client, job_id)["result"]["response"]
    assert sse_text(events) == stored
    assert len(chunks) > 10


def test_a_late_subscriber_gets_every_chunk_from_the_start(client):
    job_id = submit(client, prompt="Late", temperature=0, max_tokens=20).json["id"]
    stored = wait_job(client, job_id)["result"]["response"]
    events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    assert events[0]["id"] == "1"
    assert sse_text(events) == stored


def test_last_event_id_resumes_after_that_event(client):
    job_id = submit(client, prompt="Resume", temperature=0, max_tokens=20).json["id"]
    full = parse_sse(client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    resumed = parse_sse(client.get(f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": "5"}).get_data(as_text=True))
    assert resumed == full[5:]
    assert resumed[0]["id"] == "6"
    bad = client.get(f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json["error"]["fields"]


def test_post_with_stream_true_answers_the_event_stream(client):
    response = client.post("/v1/jobs", json={"prompt": "Stream it", "stream": True, **GREEDY})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    job_id = response.headers["X-Job-Id"]
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    events = parse_sse(response.get_data(as_text=True))
    assert events[-1]["data"] == "[DONE]"
    assert sse_text(events) == wait_job(client, job_id)["result"]["response"]


def test_messages_run_through_the_chat_template(client):
    job = wait_job(
        client,
        submit(
            client, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], **GREEDY
        ).json["id"],
    )
    # The rendered template adds role markers to the two messages: far more tokens than the text.
    assert job["result"]["usage"]["prompt_tokens"] > 10


def test_a_prompt_over_the_context_is_refused_at_submit_and_the_worker_keeps_serving(client):
    refused = client.post("/v1/jobs", json={"prompt": "word " * 600, **GREEDY})
    assert refused.status_code == 400
    assert refused.json["error"]["code"] == "context_length_exceeded"
    assert "context of 512" in refused.json["error"]["message"]
    assert wait_job(client, submit(client, prompt="still there?", **GREEDY).json["id"])["status"] == "succeeded"


def test_unknown_job_is_404(client):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/stream"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json["error"]["code"] == "job_not_found"


def test_a_non_json_body_is_415(client):
    response = client.post("/v1/jobs", data="prompt=hi", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert response.json["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("body", ["{not json", "", "[1, 2]", '"prompt"'])
def test_malformed_json_is_400(client, body):
    response = client.post("/v1/jobs", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["code"] in ("malformed_json", "invalid_request")


@pytest.mark.parametrize(
    "body, field, says",
    [
        ({}, "prompt", "exactly one of prompt or messages"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages", "exactly one"),
        ({"prompt": ""}, "prompt", "between 1 and 131072"),
        ({"prompt": "x" * 131073}, "prompt", "between 1 and 131072"),
        ({"prompt": 5}, "prompt", "Not a valid string"),
        ({"messages": []}, "messages", "Length must be between 1 and 256"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "Must be one of"),
        ({"messages": [{"role": "user"}]}, "messages", "Missing data"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "a", "max_tokens": 2.5}, "max_tokens", "Not a valid integer"),
        ({"prompt": "a", "max_tokens": "12"}, "max_tokens", "Not a valid integer"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens", "Not a valid integer"),
        ({"prompt": "a", "temperature": 5.5}, "temperature", "less than or equal to 5"),
        ({"prompt": "a", "temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "a", "temperature": "hot"}, "temperature", "Not a valid number"),
        ({"prompt": "a", "top_p": 2.1}, "top_p", "less than or equal to 2"),
        ({"prompt": "a", "top_k": 0}, "top_k", "greater than or equal to 1"),
        ({"prompt": "a", "top_k": 51}, "top_k", "less than or equal to 50"),
        ({"prompt": "a", "raw": "yes"}, "raw", "Not a valid boolean"),
        ({"prompt": "a", "stream": 1}, "stream", "Not a valid boolean"),
        ({"messages": [{"role": "user", "content": "b"}], "raw": True}, "raw", "takes a prompt"),
        ({"prompt": "a", "temprature": 1}, "temprature", "Unknown field"),
    ],
)
def test_invalid_fields_are_400_naming_the_field_and_its_limit(client, body, field, says):
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "invalid_request"
    assert field in error["fields"], error
    assert says in json.dumps(error["fields"][field]), error
    assert field in error["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(client, literal):
    response = client.post(
        "/v1/jobs", data=f'{{"prompt": "a", "temperature": {literal}}}', content_type="application/json"
    )
    assert response.status_code == 400
    assert "temperature" in response.json["error"]["fields"]


def test_health_and_readiness(client):
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["status"] == "ready"
    assert any(w["queues"] == ["cpu"] and isinstance(w["running"], int) for w in ready.json["workers"])


def test_unknown_route_and_method_answer_json(client):
    assert client.get("/v1/nothing").json["error"]["code"] == "not_found"
    response = client.put("/v1/jobs")
    assert response.status_code == 405 and response.json["error"]["code"] == "method_not_allowed"


def test_submit_with_wait_answers_202_with_the_job_when_it_has_not_ended_in_time(quiet_api):
    body = json.dumps({"prompt": "quiet"}).encode()
    request = urllib.request.Request(quiet_api.url + "/v1/jobs?wait=1", body, {"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as response:  # nobody consumes this queue
        job = json.load(response)
        assert response.status == 202 and response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert 1 <= time.monotonic() - started < 1 + WAIT_SLACK_S  # it waited its second, then answered
    assert job["status"] == "queued" and job["result"] is None
    with urllib.request.urlopen(f"{quiet_api.url}/v1/jobs/{job['id']}", timeout=10) as response:
        assert json.load(response)["status"] == "queued"  # the client stayed: its job goes on
