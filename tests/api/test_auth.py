"""API keys: every route but a pinned public few needs one; each key sees its own work alone; keys are
unique by name and take effect without a restart."""

import time

import pytest

from api.auth import hash_key, parse_entries
from tests.conftest import TINY_DB, make_client
from tests.helpers import wait_job

ALICE, BOB = "gq_alice-secret", "gq_bob-secret"
# Reachable without a key, pinned here (not read from the code under test): health, readiness, the
# playground and its assets, the docs, their stylesheet and the document they render.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/"),
    ("GET", "/playground/static/<path:filename>"),
    ("GET", "/docs"),
    ("GET", "/docs/static/<path:filename>"),
    ("GET", "/openapi.json"),
    ("GET", "/static/<path:filename>"),
}


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nbob:{hash_key(BOB)}\n")
    return path


@pytest.fixture
def keyed(tiny_worker, keys_file):
    return make_client(TINY_DB, API_KEYS=f"alice:{hash_key(ALICE)}", API_KEYS_FILE=str(keys_file))


def error_code(response) -> str:
    """The error code in any of the three envelopes."""
    body = response.json
    if "errors" in body:
        return body["errors"][0]["code"]
    return body["error"]["code"]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def routes(app):
    """(method, rule, a path for it) for every method of every route."""
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for argument in rule.arguments:
            path = path.replace(f"<path:{argument}>", "x").replace(f"<{argument}>", "x")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, rule.rule, path


def test_every_method_of_every_route_but_the_public_ones_needs_a_valid_key(keyed):
    seen = set()
    for method, rule, path in routes(keyed.application):
        seen.add((method, rule))
        anonymous = keyed.open(path, method=method)
        wrong = keyed.open(path, method=method, headers=auth("gq_wrong"))
        if (method, rule) in PUBLIC:
            assert anonymous.status_code not in (401, 403), (method, rule)
            assert wrong.status_code not in (401, 403), (method, rule)
            continue
        assert anonymous.status_code == 401, (method, rule, anonymous.status_code)
        assert error_code(anonymous) == "unauthorized"
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        assert wrong.status_code == 403 and error_code(wrong) == "forbidden", (method, rule)
    assert PUBLIC <= seen  # every pinned route exists
    assert ("POST", "/v1/jobs") in seen and ("GET", "/metrics") in seen


def test_another_tenants_key_finds_none_of_a_job_or_a_batch(keyed):
    job_id = keyed.post("/v1/jobs", json={"prompt": "mine", "max_tokens": 3}, headers=auth(ALICE)).json["id"]
    assert keyed.get(f"/v1/jobs/{job_id}?wait=30", headers=auth(ALICE)).json["status"] == "succeeded"
    batch = keyed.post("/v1/batches", json={"requests": [{"prompt": "b", "max_tokens": 2}]}, headers=auth(ALICE))
    batch_id = batch.json["id"]
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/stream"),
        ("DELETE", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/batches/{batch_id}"),
        ("GET", f"/v1/batches/{batch_id}/results"),
        ("POST", f"/v1/batches/{batch_id}/cancel"),
        ("GET", f"/v1/jobs/{batch_id}-0"),
    ]:
        response = keyed.open(path, method=method, headers=auth(BOB))
        assert response.status_code == 404, (method, path)
    assert batch_id not in [b["id"] for b in keyed.get("/v1/batches", headers=auth(BOB)).json["data"]]
    assert keyed.get(f"/v1/jobs/{job_id}/stream", headers=auth(ALICE)).status_code == 200


def test_the_same_idempotency_key_of_two_tenants_makes_two_jobs(keyed):
    body = {"prompt": "once", "max_tokens": 2}
    headers = {"Idempotency-Key": "retry-1"}
    alice = keyed.post("/v1/jobs", json=body, headers={**headers, **auth(ALICE)}).json["id"]
    bob = keyed.post("/v1/jobs", json=body, headers={**headers, **auth(BOB)}).json["id"]
    assert alice != bob
    assert keyed.post("/v1/jobs", json=body, headers={**headers, **auth(ALICE)}).json["id"] == alice


def test_malformed_authorization_headers_are_401(keyed):
    for header in ("", "Bearer", "Bearer  ", "Basic abc", ALICE):
        assert keyed.get("/v1/jobs/x", headers={"Authorization": header}).status_code == 401


def test_a_key_added_to_or_revoked_from_the_file_counts_without_a_restart(keyed, keys_file):
    carol = "gq_carol-secret"
    assert keyed.get("/v1/models", headers=auth(carol)).status_code == 403
    keys_file.write_text(f"carol:{hash_key(carol)}\n")  # bob revoked, carol added
    deadline = time.monotonic() + 10
    while keyed.get("/v1/models", headers=auth(carol)).status_code != 200:
        assert time.monotonic() < deadline, "the new key was not taken"
        time.sleep(0.2)
    assert keyed.get("/v1/models", headers=auth(BOB)).status_code == 403
    assert keyed.get("/v1/models", headers=auth(ALICE)).status_code == 200  # the variable's key stays


def test_owner_names_are_unique_and_key_entries_are_sha256_hashes():
    assert parse_entries(["", "# comment", f"team:{hash_key('k')}", hash_key("j")])[1].owner == hash_key("j")[:12]
    with pytest.raises(ValueError, match="SHA-256"):
        parse_entries(["plain-text-key"])
    with pytest.raises(ValueError, match="unique.*default"):
        parse_entries([f"default:{hash_key('a')}", f"default:{hash_key('b')}"])
    with pytest.raises(ValueError, match="unique"):
        make_client(TINY_DB, API_KEYS=f"team:{hash_key('a')},team:{hash_key('b')}")


def test_an_open_api_serves_without_keys(client):
    job_id = client.post("/v1/jobs", json={"prompt": "open", "max_tokens": 2}).json["id"]
    assert wait_job(client, job_id)["status"] == "succeeded"
