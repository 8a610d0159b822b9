"""The file store on a real Redis: its listing pages past files that have expired."""

import pytest

from tasks.store import keys
from tasks.store.files import FileStore
from tasks.store.jobs import JobStore
from tests.conftest import STORE_DB, redis_url


@pytest.fixture
def files():
    jobs = JobStore.from_url(redis_url(STORE_DB), ttl_s=120)
    jobs.redis.flushdb()
    return FileStore(jobs, ttl_s=600)


def test_a_page_is_full_and_says_more_follow_when_a_file_in_it_has_expired(files):
    for n in range(5):
        files.create(f"f{n}", "alice", "batch", f"f{n}.jsonl", [b'{"n": %d}' % n])
    files.create("g0", "bob", "batch", "g0.jsonl", [b"{}"])
    files.redis.delete(keys.file("f3"))  # expired: its entry in the listing is still there
    page, more = files.list("alice", 2)
    assert [f.id for f in page] == ["f4", "f2"] and more
    page, more = files.list("alice", 2, after="f2")
    assert [f.id for f in page] == ["f1", "f0"] and not more
    assert files.redis.zrange(keys.owner_files("alice"), 0, -1) == ["f0", "f1", "f2", "f4"]  # f3 forgotten
    assert [f.id for f in files.list("bob", 10)[0]] == ["g0"]
    with pytest.raises(KeyError):
        files.list("alice", 2, after="g0")
