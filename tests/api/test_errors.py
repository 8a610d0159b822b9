"""One error table, three envelopes: the same failure answers alike on every surface, in its shape."""

import pytest

from api import create_app
from api.errors import job_failure
from genqueue.launcher import free_port

BODY = {"prompt": "hi", "max_tokens": 2}
ROUTES = {
    "native": ("/v1/jobs", BODY),
    "openai": ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    "cloudflare": ("/ai/run/@cf/meta/llama-2-7b-chat-int8", BODY),
}


def shape(envelope: str, body: dict) -> tuple[str, str]:
    """(code, message) read from a body of the given envelope; fails if the body is another shape."""
    if envelope == "native":
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "fields"}
        return body["error"]["code"], body["error"]["message"]
    if envelope == "openai":
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]["code"], body["error"]["message"]
    assert body["success"] is False and body["result"] is None and body["messages"] == []
    return body["errors"][0]["code"], body["errors"][0]["message"]


@pytest.mark.parametrize("envelope", ROUTES)
def test_redis_unreachable_is_a_503_in_each_surfaces_own_envelope(envelope):
    path, body = ROUTES[envelope]
    client = create_app({"TESTING": True, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}).test_client()
    response = client.post(path, json=body)
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert shape(envelope, response.json)[0] == "queue_unavailable"


@pytest.mark.parametrize("envelope", ROUTES)
def test_a_body_that_is_not_json_is_a_415_in_each_surfaces_own_envelope(envelope, client):
    path, _body = ROUTES[envelope]
    response = client.post(path, data="hi", content_type="text/plain")
    assert response.status_code == 415
    assert shape(envelope, response.json)[0] == "unsupported_media_type"


@pytest.mark.parametrize(
    "code, status",
    [
        ("context_length_exceeded", 400),
        ("chat_template_error", 400),
        ("unknown_lora", 400),
        ("invalid_request", 400),
        ("engine_error", 500),
        ("time_limit_exceeded", 500),
        ("attempts_exhausted", 500),
    ],
)
def test_a_failed_jobs_error_code_decides_its_status_on_every_surface(code, status):
    error = job_failure("job_x", "failed", {"code": code, "message": "why"})
    assert (error.status, error.code, error.message, error.headers["X-Job-Id"]) == (status, code, "why", "job_x")
    assert job_failure("job_x", "cancelled", None).status == 409
