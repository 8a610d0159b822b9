"""Hostile input: caps on a request as a whole, text that is not text, oversized batch bodies and lines.
No worker is needed: each is refused before anything is queued."""

import json

import pytest

from tests.conftest import IDLE_DB, make_client
from tests.helpers import WEATHER


@pytest.fixture
def api():
    return make_client(IDLE_DB, BATCH_MAX_JSON_BYTES=4096, BATCH_MAX_LINE_BYTES=512)


def refused(response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.json
    error = response.json["error"]
    if field is not None:
        assert field in error["fields"], error
    return error


def test_a_request_holds_at_most_256_messages_of_131072_characters_together(api):
    many = [{"role": "user", "content": "hi"}] * 257
    refused(api.post("/v1/jobs", json={"messages": many}), 400, "messages")
    long = [{"role": "user", "content": "x" * 70000}, {"role": "user", "content": "y" * 70000}]
    error = refused(api.post("/v1/jobs", json={"messages": long}), 400, "messages")
    assert "140000 characters in all" in str(error["fields"]["messages"])
    assert api.post("/v1/jobs", json={"messages": long[:1]}).status_code == 202  # each alone fits


def test_tools_and_functions_together_are_capped(api):
    big = {**WEATHER, "description": "d" * 20000}
    tools = [big, {**big, "name": "other"}]
    refused(api.post("/v1/jobs", json={"prompt": "hi", "tools": tools}), 400, "tools")
    refused(api.post("/v1/jobs", json={"prompt": "hi", "tools": [WEATHER] * 65}), 400, "tools")
    assert api.post("/v1/jobs", json={"prompt": "hi", "tools": [WEATHER]}).status_code == 202


def test_the_openai_route_caps_its_messages_together_too(api):
    long = [{"role": "user", "content": "x" * 70000}, {"role": "user", "content": "y" * 70000}]
    body = {"model": "tiny", "messages": long}
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json["error"]["param"] == "messages", response.json


@pytest.mark.parametrize(
    "path, text",
    [
        ("/v1/jobs", '{"prompt": "\\ud800 lone"}'),
        ("/v1/batches", '{"requests": [{"custom_id": "\\udfff", "prompt": "hi"}]}'),
        ("/v1/batches", '{"requests": [{"prompt": "hi"}], "metadata": {"k": "\\ud83d"}}'),
    ],
)
def test_a_lone_surrogate_is_refused_wherever_it_is(api, path, text):
    error = refused(api.post(path, data=text, content_type="application/json"), 400)
    assert error["code"] == "invalid_unicode"


def test_a_jsonl_line_with_a_lone_surrogate_is_named_and_nothing_is_queued(api):
    lines = '{"custom_id": "ok", "body": {"prompt": "hi"}}\n{"custom_id": "\\ud800", "body": {"prompt": "hi"}}\n'
    error = refused(api.post("/v1/batches", data=lines, content_type="application/jsonl"), 400)
    assert error["code"] == "invalid_batch" and list(error["fields"]["lines"]) == ["2"]


def test_a_json_batch_body_over_its_cap_is_413_naming_the_setting(api):
    requests = [{"prompt": "x" * 100}] * 50
    error = refused(api.post("/v1/batches", json={"requests": requests}), 413)
    assert error["code"] == "batch_too_large" and "GENQUEUE_BATCH_MAX_JSON_BYTES" in error["message"]
    assert "JSONL" in error["message"]


def test_a_jsonl_line_over_its_cap_is_413_naming_the_line_and_the_setting(api):
    lines = [json.dumps({"custom_id": str(i), "body": {"prompt": "hi"}}) for i in range(3)]
    lines.insert(1, json.dumps({"custom_id": "big", "body": {"prompt": "x" * 600}}))
    error = refused(api.post("/v1/batches", data="\n".join(lines), content_type="application/jsonl"), 413)
    assert "line 2 " in error["message"] and "GENQUEUE_BATCH_MAX_LINE_BYTES" in error["message"]
    small = "\n".join(lines[:1] + lines[2:])
    assert api.post("/v1/batches", data=small, content_type="application/jsonl").status_code == 201
