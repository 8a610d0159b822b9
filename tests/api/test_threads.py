"""A worker's engine thread choice, made at its start, is what /readyz shows a caller with a key."""

from __future__ import annotations

from api.auth import hash_key
from engine.threads import ChoiceCache, ThreadChoice, cache_key
from tests.conftest import SUBMIT_DB, WorkerProcess, make_client

KEY = "gq_threads-secret"


def test_a_worker_runs_with_the_cached_choice_and_readyz_shows_it_to_key_holders_only(tiny_dir, tmp_path):
    ChoiceCache(tmp_path).put(cache_key(tiny_dir, "cpu", "int8", 4), ThreadChoice(1, 2, "tuned", {"1x2": {"1": 9.0}}))
    make_client(SUBMIT_DB).application.extensions["genqueue.jobs"].store.redis.flushdb()  # shared, see conftest
    worker = WorkerProcess(tiny_dir, SUBMIT_DB, tune_threads=True, state_dir=tmp_path, max_batch_size=4)
    try:
        client = make_client(SUBMIT_DB, API_KEYS=f"team:{hash_key(KEY)}")
        assert client.get("/readyz").json == {"status": "ready", "missing": []}
        workers = client.get("/readyz", headers={"Authorization": f"Bearer {KEY}"}).json["workers"]
        assert [w["extra"]["threads"] for w in workers] == [
            {"intra_threads": 1, "inter_threads": 2, "source": "tuned", "measured": {"1x2": {"1": 9.0}}, "seconds": 0.0}
        ]
        line = "engine: tiny on cpu (int8), intra_threads 1, 2 replicas (tuned)"
        # the heartbeat starts with the engine; Celery logs the line later, once its own logging is set up
        worker.wait_until(lambda: line in worker.output(), timeout_s=30, what="the engine line in its log")
    finally:
        worker.stop()
