"""Chaos: 300 jobs, 50 of them followed live over HTTP, while a worker is killed (kill -9) three times
at random moments and Redis (AOF) restarts once. Every job ends succeeded, each followed stream's text
is its job's result, no job is left running, no token is counted twice. Bounded by one deadline.

The moments are random in the run's progress (the share of jobs ended), not in seconds, so a loaded
machine moves them with the work; the seed is printed, and GENQUEUE_CHAOS_SEED repeats a run.
"""

from __future__ import annotations

import http.client
import os
import random
import threading
import time
from dataclasses import dataclass, field

import pytest
import redis

from genqueue.client import ApiClientError, Client
from genqueue.launcher import ApiProcess, RedisServer
from tasks.store.jobs import JobStore
from tasks.store.states import JobState
from tests.conftest import REPO, WorkerProcess

JOBS, FOLLOWED, KILLS = 300, 50, 3
DEADLINE_S = 300  # the whole run, chaos included (about 30 s on a quiet 2-core machine)
BODY = {"prompt": "Tell me about the sea.", "temperature": 1.0, "max_tokens": 48}
# A short heartbeat timeout so takeovers come within seconds; batches of four, so a kill hits several.
WORKER = {"heartbeat_timeout_s": 3, "concurrency": 4, "max_batch_size": 4}
# The streams of the jobs followed reconnect (with Last-Event-ID, as EventSource does) when cut.
RECONNECT_S = 0.5


@dataclass
class Followed:
    """What one live reader of a job's stream saw: each chunk once, in order, across reconnects."""

    job_id: str
    text: str = ""
    last_id: int = 0
    ids: list[int] = field(default_factory=list)
    reconnects: int = 0
    ended: bool = False
    error: str | None = None


def follow(url: str, reader: Followed, deadline: float) -> None:
    client = Client(url, timeout_s=30)
    while not reader.ended and time.monotonic() < deadline:
        try:
            for event in client.follow(reader.job_id, reader.last_id):
                if event.event == "error":
                    reader.error = str(event.data)
                    return
                if event.id is not None:
                    reader.ids.append(event.id)
                    reader.last_id = event.id
                reader.text += event.text
                if "usage" in event.data:  # the end
                    reader.ended = True
        except (ApiClientError, OSError, http.client.HTTPException):
            reader.reconnects += 1
            client.close()
            time.sleep(RECONNECT_S)
    client.close()


def statuses(store: JobStore, ids: list[str]) -> list[str | None]:
    with store.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(f"genqueue:job:{job_id}", "status")
        return pipe.execute()


def ended_share(store: JobStore, ids: list[str]) -> float:
    """The share of jobs ended; while Redis is away, no progress (-1)."""
    try:
        found = statuses(store, ids)
    except redis.RedisError:
        return -1.0
    return sum(1 for s in found if s and JobState(s).terminal) / len(ids)


def busiest(store: JobStore, workers: list[WorkerProcess]) -> WorkerProcess:
    """The worker holding the most running jobs (the first one if none holds any yet)."""
    holders = list(store.running().values())
    return max(workers, key=lambda w: sum(1 for h in holders if h.endswith(f":{w.pid}")))


@pytest.fixture
def aof_redis(redis_server_binary, tmp_path):
    servers = [RedisServer(data_dir=tmp_path / "redis", appendonly=True, binary=redis_server_binary)]
    yield servers  # the test replaces servers[0] when it restarts it
    servers[0].stop()


def test_every_job_ends_once_through_worker_kills_and_a_redis_restart(aof_redis, tiny_dir, tmp_path):
    seed = int(os.environ.get("GENQUEUE_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    chance = random.Random(seed)
    print(f"\nchaos seed {seed} (GENQUEUE_CHAOS_SEED repeats it)")
    # Three kills and the restart, at shares of jobs ended, in random order within the run's body.
    moments = sorted(chance.uniform(0.05, 0.75) for _ in range(KILLS + 1))
    restart_at = chance.choice(moments)
    url = aof_redis[0].url(0)
    store = JobStore.from_url(url)
    workers = [WorkerProcess(tiny_dir, 0, redis_base=url.rsplit("/", 1)[0], **WORKER) for _ in range(2)]
    api = ApiProcess({"redis_url": url, "api_keys": "", "api_keys_file": ""}, log_dir=tmp_path, cwd=REPO)
    deadline = time.monotonic() + DEADLINE_S
    events: list[str] = []
    try:
        api.wait_ready()
        client = Client(api.url, timeout_s=30)
        ids = [client.submit({**BODY, "prompt": f"{BODY['prompt']} ({n})"}).id for n in range(JOBS)]
        readers = [Followed(job_id) for job_id in ids[:: JOBS // FOLLOWED]]
        threads = [threading.Thread(target=follow, args=(api.url, r, deadline), daemon=True) for r in readers]
        for thread in threads:
            thread.start()

        for moment in moments:
            while ended_share(store, ids) < moment:
                assert time.monotonic() < deadline, events
                time.sleep(0.05)
            if moment == restart_at:
                aof_redis[0] = aof_redis[0].restart()  # SIGTERM: the AOF is written out, then read back
                events.append(f"redis restarted at {moment:.0%} ended")
                continue
            victim = busiest(store, workers)
            held = sum(1 for h in store.running().values() if h.endswith(f":{victim.pid}"))
            victim.kill()  # SIGKILL: no goodbye, its jobs are taken over by heartbeat
            workers[workers.index(victim)] = WorkerProcess(tiny_dir, 0, redis_base=url.rsplit("/", 1)[0], **WORKER)
            events.append(f"worker killed at {moment:.0%} ended, holding {held} running jobs; restarted")
        print("; ".join(events))

        while ended_share(store, ids) < 1:
            assert time.monotonic() < deadline, (events, [w.output()[-2000:] for w in workers])
            time.sleep(0.1)
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))

        assert statuses(store, ids) == [JobState.SUCCEEDED.value] * JOBS, events
        assert store.running() == {}  # none left running, none held
        short = 0
        for job_id in ids:  # each token logged at most once: a resume that logged twice would pass the usage
            job = client.get(job_id)
            logged, used = len(store.progress(job_id).ids), job.result.usage.completion_tokens
            assert logged <= used, job_id
            # Tokens at the very end that added no text (a special token of the random model decodes to
            # '') have no chunk to be logged with; anywhere else they are logged with the next chunk.
            short += logged < used
        assert short <= JOBS // 20, f"{short} of {JOBS} jobs logged fewer tokens than their usage"
        for reader in readers:
            job = client.get(reader.job_id)
            assert reader.ended and reader.error is None, reader
            assert reader.text == job.result.response, reader
            assert reader.ids == list(range(1, len(reader.ids) + 1)), reader  # every chunk once, in order
        attempts = [store.get(job_id).attempts for job_id in ids]
        print(
            f"{sum(a > 1 for a in attempts)} jobs ran more than once (taken over); "
            f"{sum(r.reconnects for r in readers)} stream reconnects"
        )
        assert max(attempts) > 1, events  # the kills did land on running jobs
    finally:
        api.stop()
        for worker in workers:
            worker.stop()
