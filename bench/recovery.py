"""How fast a job comes back after `kill -9` of its worker, under `genqueue run` at default settings.

    python bench/recovery.py [--rounds 3] [--max-tokens 256] [--kill-after 16]

Starts a Redis of its own on a free port, then `genqueue run` on it (what `make run` runs: one worker
on the default model and the API, under the supervisor that restarts a crashed child). Each round
streams a long sampled job (POST /v1/jobs with stream: true), and once --kill-after chunks have
arrived, kills the worker holding it with SIGKILL. The supervisor starts a new worker, which takes
the job over once the dead one's heartbeat has expired (GENQUEUE_HEARTBEAT_TIMEOUT_S) and goes on
from its logged tokens. Measured from the kill: the job claimed again (its attempt count rises),
the first new chunk on the same stream, and the job's end. Each round checks that the stream's text
is the stored result and that usage counts each logged token once. Target: running again within
15 s. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench.harness import PROMPTS, model_dir, provenance  # noqa: E402
from genqueue import launcher  # noqa: E402
from genqueue.client import Client  # noqa: E402
from tasks.store import keys  # noqa: E402
from tasks.store.jobs import JobStore  # noqa: E402
from tasks.store.registry import WorkerRegistry  # noqa: E402

TARGET_S = 15.0  # running again within this long after the kill
READY_TIMEOUT_S = 300
ROUND_TIMEOUT_S = 300


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(what: str, ready, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {timeout_s:g}s")
        time.sleep(0.1)


def watch_attempts(store: JobStore, job_id: str, since: int, found: dict, stop: threading.Event) -> None:
    """Note when the job's attempt count first exceeds `since` (a new claim)."""
    while not stop.is_set():
        if int(store.redis.hget(keys.job(job_id), "attempts") or 0) > since:
            found["claimed"] = time.monotonic()
            return
        time.sleep(0.02)


def one_round(url: str, store: JobStore, prompt: str, max_tokens: int, kill_after: int, kill: bool = True) -> dict:
    """Stream a job, kill its worker after kill_after chunks; the times from the kill, in seconds.
    Without `kill`, the baseline: the same times from that chunk on, nothing killed."""
    client = Client(url, timeout_s=60)
    stream = client.stream({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8})
    text, chunks = "", 0
    killed_at = None
    seq_at_kill = 0
    found: dict[str, float] = {}
    stop = threading.Event()
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    for event in stream:
        now = time.monotonic()
        if now > deadline:
            raise SystemExit(f"job {stream.job_id} still streaming after {ROUND_TIMEOUT_S}s")
        text += event.text
        chunks += bool(event.text)
        if killed_at is not None and event.text and event.id and event.id > seq_at_kill and "chunk" not in found:
            found["chunk"] = now
        if killed_at is None and chunks >= kill_after:
            holder = store.redis.hget(keys.job(stream.job_id), "worker") or ""
            attempts = int(store.redis.hget(keys.job(stream.job_id), "attempts") or 0)
            if kill:
                os.kill(int(holder.rsplit(":", 1)[1]), signal.SIGKILL)
            killed_at = time.monotonic()
            seq_at_kill = store.progress(stream.job_id).seq  # what it logged before it died
            args = (store, stream.job_id, attempts, found, stop)
            threading.Thread(target=watch_attempts, args=args, daemon=True).start()
    ended_at = time.monotonic()
    stop.set()
    if killed_at is None:
        raise SystemExit(f"job {stream.job_id} ended after {chunks} chunks, before the kill: lower --kill-after")
    job = client.get(stream.job_id)
    if job.status != "succeeded" or job.text != text:
        raise SystemExit(f"job {job.id}: {job.status}; the stream's text differs from the result: {job.error}")
    logged = store.progress(job.id).ids
    if job.result is None or job.result.usage.completion_tokens != len(logged):
        raise SystemExit(f"job {job.id}: usage {job.result and job.result.usage} but {len(logged)} tokens logged")
    return {
        "claimed": found.get("claimed", float("nan")) - killed_at,
        "chunk": found.get("chunk", float("nan")) - killed_at,
        "end": ended_at - killed_at,
        "tokens": len(logged),
        "before_kill": seq_at_kill,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--kill-after", type=int, default=16, help="chunks streamed before the kill")
    args = parser.parse_args()
    print(f"# genqueue recovery benchmark\n{provenance()}")
    log_dir = Path(tempfile.mkdtemp(prefix="genqueue-recovery-"))
    redis_server = launcher.RedisServer(log_dir=log_dir)
    run = None
    try:
        port = launcher.free_port()
        settings = {
            "redis_url": redis_server.url(),
            "host": "127.0.0.1",
            "port": port,
            "api_keys": "",
            "api_keys_file": "",
            "model": model_dir(),
        }
        run = launcher.Process("run", launcher.genqueue_argv("run"), launcher.settings_env(settings), log_dir)
        url = f"http://127.0.0.1:{port}"
        run.wait_until(lambda: ready(url), READY_TIMEOUT_S, "ready")
        store = JobStore.from_url(redis_server.url())
        registry = WorkerRegistry(store.redis)
        print(f"genqueue run (pid {run.pid}) at {url}; its log: {run.log_path}")
        wait_for("a live worker", lambda: bool(registry.live()), READY_TIMEOUT_S)
        base = one_round(url, store, PROMPTS[0], args.max_tokens, args.kill_after, kill=False)
        print(f"baseline, nothing killed: ended {base['end']:.1f} s after chunk {args.kill_after}")
        rounds = []
        for index in range(args.rounds):
            wait_for("a live worker", lambda: bool(registry.live()), READY_TIMEOUT_S)
            figures = one_round(url, store, PROMPTS[index % len(PROMPTS)], args.max_tokens, args.kill_after)
            rounds.append(figures)
            print(
                f"round {index + 1}: claimed again {figures['claimed']:.1f} s, new chunks {figures['chunk']:.1f} s, "
                f"ended {figures['end']:.1f} s after the kill ({figures['before_kill']} chunks before it, "
                f"{figures['tokens']} tokens, stream == result)",
                flush=True,
            )
        chunk = statistics.median(r["chunk"] for r in rounds)
        print(
            f"median of {len(rounds)}: claimed again {statistics.median(r['claimed'] for r in rounds):.1f} s, "
            f"new chunks {chunk:.1f} s, ended {statistics.median(r['end'] for r in rounds):.1f} s after the kill "
            f"(baseline {base['end']:.1f} s); "
            f"target: running again within {TARGET_S:g} s: {'met' if chunk <= TARGET_S else 'MISSED'}"
        )
        restarts = run.output().count("exited with code")
        print(f"the supervisor restarted the worker {restarts} times; {provenance().splitlines()[1]}")
    except redis.RedisError as exc:
        raise SystemExit(f"Redis failed: {exc}") from exc
    finally:
        if run is not None:
            run.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
