"""What a browser or an anonymous caller can reach: headers, trusted hosts, readiness and metrics."""

import pytest

from api.auth import hash_key
from tests.conftest import TINY_DB, make_client

KEY = "gq_team-secret"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_pages_may_load_only_their_own_assets_and_never_be_framed(client, path):
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "text/html"
    policy = dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    html = response.get_data(as_text=True)
    assert "<script>" not in html and " style=" not in html and "<style" not in html  # nothing inline to allow


def test_every_response_says_nosniff_and_loads_nothing(client):
    for response in (client.get("/healthz"), client.get("/v1/jobs/nope"), client.post("/v1/jobs", data="x")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_an_open_api_answers_only_to_loopback_host_names(client):
    """DNS rebinding: a page of evil.example whose name resolves to 127.0.0.1 reaches the open API
    with Host: evil.example; it must be refused."""
    for host in ("localhost:8000", "127.0.0.1:8000", "localhost"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example"):
        refused = client.post("/v1/jobs", json={"prompt": "x"}, headers={"Host": host})
        assert refused.status_code == 400 and refused.json["error"]["code"] == "bad_request", host


def test_trusted_hosts_can_be_configured_and_keys_lift_the_loopback_default(tiny_worker):
    named = make_client(TINY_DB, TRUSTED_HOSTS="api.example.com, .internal")
    assert named.get("/healthz", headers={"Host": "api.example.com"}).status_code == 200
    assert named.get("/healthz", headers={"Host": "gq.internal"}).status_code == 200
    assert named.get("/healthz", headers={"Host": "localhost"}).status_code == 400
    keyed = make_client(TINY_DB, API_KEYS=f"team:{hash_key(KEY)}")
    assert keyed.get("/healthz", headers={"Host": "api.example.com"}).status_code == 200


def test_readiness_tells_an_anonymous_caller_only_the_status_and_what_is_missing(tiny_worker):
    keyed = make_client(TINY_DB, API_KEYS=f"team:{hash_key(KEY)}")
    anonymous = keyed.get("/readyz")
    assert anonymous.status_code == 200 and anonymous.json == {"status": "ready", "missing": []}
    detailed = keyed.get("/readyz", headers=auth(KEY)).json
    assert detailed["workers"][0]["model"] == "tiny" and detailed["redis"] == "ok"
    down = make_client(TINY_DB, API_KEYS=f"team:{hash_key(KEY)}", REDIS_URL="redis://127.0.0.1:1/0")
    refused = down.get("/readyz")
    assert refused.status_code == 503 and refused.json == {"status": "unavailable", "missing": ["Redis is unreachable"]}
    assert down.get("/readyz", headers=auth(KEY)).json["redis"].startswith("unreachable: ")  # with the cause


def test_metrics_take_their_own_token_when_one_is_set(tiny_worker):
    guarded = make_client(TINY_DB, API_KEYS=f"team:{hash_key(KEY)}", METRICS_TOKEN="scrape-me")
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers=auth(KEY)).status_code == 403  # an API key is not the token
    scraped = guarded.get("/metrics", headers=auth("scrape-me"))
    assert scraped.status_code == 200 and b"genqueue_jobs_total" in scraped.data
    assert b"team" not in scraped.data  # no figure names a tenant
    keyed = make_client(TINY_DB, API_KEYS=f"team:{hash_key(KEY)}")
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/metrics", headers=auth(KEY)).status_code == 200
