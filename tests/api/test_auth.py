"""API keys: every endpoint but health needs one; a job is visible to its own key alone."""

import pytest

from api.auth import hash_key, parse_entries
from tests.conftest import TINY_DB, make_client
from tests.helpers import wait_job

ALICE, BOB = "gq_alice-secret", "gq_bob-secret"


@pytest.fixture
def keyed(tiny_worker, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nbob:{hash_key(BOB)}\n")
    return make_client(TINY_DB, API_KEYS=f"alice:{hash_key(ALICE)}", API_KEYS_FILE=str(keys_file))


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_endpoint_but_health_needs_a_key(keyed):
    app = keyed.application
    checked = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        method = sorted(rule.methods - {"HEAD", "OPTIONS"})[0]
        path = rule.rule
        for argument in rule.arguments:
            path = path.replace(f"<{argument}>", "x").replace(f"<path:{argument}>", "x")
        response = keyed.open(path, method=method)
        if getattr(view, "genqueue_public", False) or rule.endpoint == "static":
            assert response.status_code not in (401, 403), path
        else:
            assert response.status_code == 401, (method, path, response.status_code)
            assert response.json["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            bad = keyed.open(path, method=method, headers=auth("gq_wrong"))
            assert bad.status_code == 403, (method, path)
            checked.append(path)
    assert "/v1/jobs" in checked and "/v1/jobs/x/stream" in checked
    assert keyed.get("/healthz").status_code == 200


def test_a_job_is_visible_to_its_own_key_alone(keyed):
    job_id = keyed.post("/v1/jobs", json={"prompt": "mine", "max_tokens": 3}, headers=auth(ALICE)).json["id"]
    job = keyed.get(f"/v1/jobs/{job_id}?wait=30", headers=auth(ALICE))
    assert job.status_code == 200 and job.json["status"] == "succeeded"
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/stream"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ]:
        response = keyed.open(path, method=method, headers=auth(BOB))
        assert response.status_code == 404, (method, path)
        assert response.json["error"]["code"] == "job_not_found"
    assert keyed.get(f"/v1/jobs/{job_id}/stream", headers=auth(ALICE)).status_code == 200


def test_malformed_authorization_headers_are_401(keyed):
    for header in ("", "Bearer", "Bearer  ", "Basic abc", ALICE):
        assert keyed.get("/v1/jobs/x", headers={"Authorization": header}).status_code == 401


def test_an_open_api_keeps_jobs_apart_from_keyed_ones(client):
    # Without keys everything works unauthenticated (bound to loopback by `genqueue api`).
    job_id = client.post("/v1/jobs", json={"prompt": "open", "max_tokens": 2}).json["id"]
    assert wait_job(client, job_id)["status"] == "succeeded"


def test_key_entries_must_be_sha256_hashes():
    assert parse_entries(["", "# comment", f"team:{hash_key('k')}", hash_key("j")])[1].owner == hash_key("j")[:12]
    with pytest.raises(ValueError, match="SHA-256"):
        parse_entries(["plain-text-key"])
