"""Odd input is a 4xx that says what is wrong, never a 5xx, on every route (regressions of issue 13:
deep JSON, a 26-digit Last-Event-ID and GET /v1/jobs/<id>:log were each a 500 or a 503)."""

import json

import pytest

from api import create_app
from api.errors import to_api_error
from api.http import MAX_JSON_DEPTH
from genqueue.launcher import free_port
from tests.helpers import parse_sse, wait_job

JSON_ROUTES = [
    "/v1/jobs",
    "/v1/chat/completions",
    "/v1/completions",
    "/ai/run/@cf/meta/llama-2-7b-chat-int8",
    "/client/v4/accounts/acc/ai/run/@cf/meta/llama-2-7b-chat-int8",
    "/v1/batches",
]
# Each is no plain integer; "²" and "١٢" (Arabic-Indic digits) pass str.isdigit(), and int() takes "١٢".
NOT_PLAIN_INTEGERS = ["abc", "-1", "+1", "1.5", "1e3", " 1", "1 ", "0x10", "nan", "inf", "²", "9" * 26]


def nested(depth: int) -> str:
    return '{"prompt": ' + "[" * depth + "]" * depth + "}"


def error_code(response) -> str:
    """The error code in whichever envelope the route answers with."""
    body = response.json
    if "errors" in body:
        return body["errors"][0]["code"]
    return body["error"]["code"]


@pytest.fixture
def offline():
    """The app with Redis unreachable: an answer that needed Redis would be a 503."""
    return create_app({"TESTING": True, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}).test_client()


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])  # parsed then refused; too deep to parse
def test_json_nested_deeper_than_the_limit_is_a_400_on_every_json_route(offline, route, depth):
    response = offline.post(route, data=nested(depth), content_type="application/json")
    assert response.status_code == 400, response.data[:300]
    assert error_code(response) == "json_too_deep"


def test_json_nested_within_the_limit_is_read(offline):
    response = offline.post("/v1/jobs", data=nested(MAX_JSON_DEPTH - 1), content_type="application/json")
    assert response.status_code == 400 and "prompt" in response.json["error"]["fields"]  # a field error: it was read


@pytest.mark.parametrize("line", [nested(100_000), '{"body": ' + "[" * 70 + "]" * 70 + "}"])
def test_a_jsonl_batch_line_nested_too_deep_is_named_in_the_400(client, line):
    response = client.post("/v1/batches", data=line + "\n", content_type="application/jsonl")
    assert response.status_code == 400
    assert "deep" in json.dumps(response.json["error"]["fields"])


def test_batch_metadata_nested_too_deep_is_a_400(offline):
    response = offline.post(
        "/v1/batches?metadata=" + "[" * 5000 + "]" * 5000, data='{"body": {}}\n', content_type="application/jsonl"
    )
    assert response.status_code == 400 and "metadata" in response.json["error"]["fields"]


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_a_body_that_is_not_utf8_is_a_400(offline, route):
    response = offline.post(route, data=b'{"prompt": "\xff\xfe"}', content_type="application/json")
    assert response.status_code == 400


@pytest.mark.parametrize("value", NOT_PLAIN_INTEGERS + ["9007199254740992"])  # 2^53: past the bound
def test_a_last_event_id_that_is_not_a_plain_bounded_integer_is_a_400(offline, value):
    response = offline.get("/v1/jobs/job_" + "a" * 24 + "/stream", headers={"Last-Event-ID": value})
    assert response.status_code == 400
    assert "Last-Event-ID" in response.json["error"]["fields"]


@pytest.mark.parametrize("value", NOT_PLAIN_INTEGERS + ["", "١٢", "61", "60.0"])
def test_a_wait_that_is_not_a_plain_integer_within_max_wait_is_a_400(offline, value):
    response = offline.get("/v1/jobs/job_" + "a" * 24, query_string={"wait": value})
    assert response.status_code == 400
    assert "wait" in response.json["error"]["fields"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/jobs/{id}"),
        ("GET", "/v1/jobs/{id}?wait=5"),
        ("GET", "/v1/jobs/{id}/stream"),
        ("DELETE", "/v1/jobs/{id}"),
    ],
)
@pytest.mark.parametrize(
    "job_id", ["x", "job_short", "job_" + "a" * 24 + ":log", "job_" + "a" * 24 + ":events", "batch_" + "a" * 24]
)
def test_a_string_that_is_no_job_id_is_a_404_without_asking_redis(offline, method, path, job_id):
    response = offline.open(path.format(id=job_id), method=method)
    assert response.status_code == 404  # Redis is unreachable: asking it would have been a 503
    assert response.json["error"]["code"] == "job_not_found"


@pytest.mark.parametrize("path", ["/v1/batches/x", "/v1/batches/batch_x:results", "/v1/batches/x/results"])
def test_a_string_that_is_no_batch_id_is_a_404_without_asking_redis(offline, path):
    response = offline.get(path)
    assert response.status_code == 404 and response.json["error"]["code"] == "batch_not_found"
    assert offline.post("/v1/batches/x/cancel").status_code == 404


def test_listing_after_a_string_that_is_no_batch_id_is_a_400(client):
    response = client.get("/v1/batches?after=x:y")
    assert response.status_code == 400 and "after" in response.json["error"]["fields"]


def test_recursion_and_decode_errors_map_to_400():
    assert to_api_error(RecursionError()).status == 400
    assert to_api_error(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid")).status == 400
    assert to_api_error(json.JSONDecodeError("Expecting value", "x", 0)).status == 400


def test_plain_integers_within_bounds_are_accepted(client):
    job_id = client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 3}).json["id"]
    assert client.get(f"/v1/jobs/{job_id}?wait=60").status_code == 200
    assert wait_job(client, job_id)["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}?wait=0").status_code == 200
    events = parse_sse(client.get(f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": "9007199254740991"}).text)
    assert events[-1]["data"] == "[DONE]" and events[0]["id"] is not None  # past the end: the last event, [DONE]
