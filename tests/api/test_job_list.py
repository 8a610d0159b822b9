"""GET /v1/jobs: each key's own jobs, newest first, in pages; filters status and batch_id; entries go
when their records expire. Real Redis, the tiny model's real worker."""

import secrets
import time

import pytest

from api.auth import hash_key
from tasks.store import keys
from tests.conftest import TINY_DB, make_client

PARKED = {"queue": "gpu"}  # the tiny worker consumes cpu only: a job sent to gpu stays queued


class Caller:
    """One API key of a keyed client (a fresh owner name per test, so runs never share a list)."""

    def __init__(self, client, name: str, key: str):
        self.client, self.name, self.headers = client, name, {"Authorization": f"Bearer {key}"}

    def submit(self, **body) -> str:
        response = self.client.post(
            "/v1/jobs", json={"prompt": "list me", "max_tokens": 2, **body}, headers=self.headers
        )
        assert response.status_code == 202, response.json
        return response.json["id"]

    def page(self, **query):
        return self.client.get("/v1/jobs", query_string=query, headers=self.headers)

    def ids(self, **query) -> list[str]:
        response = self.page(**query)
        assert response.status_code == 200, response.json
        return [job["id"] for job in response.json["data"]]


def callers(**config) -> tuple[Caller, Caller]:
    names = [f"lister-{secrets.token_hex(4)}" for _ in range(2)]
    tokens = [f"gq_{secrets.token_urlsafe(12)}" for _ in names]
    entries = ",".join(f"{name}:{hash_key(token)}" for name, token in zip(names, tokens, strict=True))
    client = make_client(TINY_DB, API_KEYS=entries, **config)
    return Caller(client, names[0], tokens[0]), Caller(client, names[1], tokens[1])


@pytest.fixture
def two_keys(tiny_worker):
    return callers()


def test_pages_are_newest_first_and_each_key_sees_its_own_jobs(two_keys):
    alice, bob = two_keys
    mine = [alice.submit() for _ in range(5)]
    theirs = [bob.submit() for _ in range(2)]
    newest_first = mine[::-1]

    first = alice.page(limit=2).json
    assert first["object"] == "list" and first["has_more"] is True
    assert [job["id"] for job in first["data"]] == newest_first[:2]
    assert (first["first_id"], first["last_id"]) == (newest_first[0], newest_first[1])
    second = alice.page(limit=2, after=first["last_id"]).json
    assert [job["id"] for job in second["data"]] == newest_first[2:4] and second["has_more"] is True
    last = alice.page(limit=2, after=second["last_id"]).json
    assert [job["id"] for job in last["data"]] == newest_first[4:] and last["has_more"] is False
    assert alice.ids() == newest_first  # the default page holds them all

    assert bob.ids() == theirs[::-1]
    refused = alice.page(after=theirs[0])  # another key's job is no cursor either
    assert refused.status_code == 400 and "after" in refused.json["error"]["fields"]

    for job_id in mine:  # each entry is the job as GET shows it
        ended = alice.client.get(f"/v1/jobs/{job_id}?wait=60", headers=alice.headers).json
        assert ended["status"] == "succeeded"
    listed = {job["id"]: job for job in alice.page().json["data"]}
    for job_id in mine:
        assert listed[job_id] == alice.client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json


def test_filters_by_status_and_by_batch(two_keys):
    alice, bob = two_keys
    done = [alice.submit() for _ in range(2)]
    for job_id in done:
        assert alice.client.get(f"/v1/jobs/{job_id}?wait=60", headers=alice.headers).json["status"] == "succeeded"
    waiting = alice.submit(**PARKED)
    cancelled = alice.submit(**PARKED)
    assert alice.client.delete(f"/v1/jobs/{cancelled}", headers=alice.headers).status_code == 200
    try:
        assert alice.ids(status="succeeded") == done[::-1]
        assert alice.ids(status="queued") == [waiting]
        assert alice.ids(status="cancelled") == [cancelled]
        assert alice.ids(status="failed") == []
        assert alice.ids(status="succeeded", limit=1) == [done[1]]
        assert alice.page(status="succeeded", limit=1).json["has_more"] is True
        bad = alice.page(status="finished")
        assert bad.status_code == 400 and "status" in bad.json["error"]["fields"]
        for limit in ("0", "101", "x"):
            assert alice.page(limit=limit).status_code == 400

        batch = alice.client.post(
            "/v1/batches",
            json={"requests": [{"prompt": f"item {i}", "max_tokens": 2} for i in range(3)]},
            headers=alice.headers,
        ).json
        items = [keys.batch_item(batch["id"], i) for i in range(3)]
        assert alice.ids(batch_id=batch["id"]) == items[::-1]  # the highest index is the newest
        assert alice.ids(batch_id=batch["id"], limit=2, after=items[2]) == items[1::-1]
        assert not set(items) & set(alice.ids())  # a batch's jobs are listed with batch_id only
        deadline = time.monotonic() + 120
        while alice.ids(batch_id=batch["id"], status="succeeded") != items[::-1]:
            assert time.monotonic() < deadline, alice.page(batch_id=batch["id"]).json
            time.sleep(0.2)
        other = bob.page(batch_id=batch["id"])
        assert other.status_code == 404 and other.json["error"]["code"] == "batch_not_found"
        assert alice.page(batch_id=batch["id"], after=done[0]).status_code == 400  # not one of its items
    finally:
        alice.client.delete(f"/v1/jobs/{waiting}", headers=alice.headers)


def test_entries_go_when_their_records_expire_and_the_list_is_bounded_by_the_ttl(tiny_worker):
    alice, _bob = callers(JOB_TTL_S=2)
    lasting = alice.submit()  # runs at once: its record is refreshed as it goes, then kept 2 s after its end
    expiring = alice.submit(**PARKED)  # never changes: its record expires 2 s after it was written
    listing = keys.owner_jobs(alice.name)
    redis_client = alice.client.application.extensions["genqueue.jobs"].store.redis
    assert 0 < redis_client.ttl(listing) <= 2 * 2
    assert alice.ids() == [expiring, lasting]
    deadline = time.monotonic() + 30
    while expiring in alice.ids():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert redis_client.zscore(listing, expiring) is None  # the list forgot it too
    deadline = time.monotonic() + 30
    while redis_client.exists(listing):  # nothing submitted for two TTLs: the list itself expires
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert alice.ids() == []
