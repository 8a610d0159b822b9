"""The HTTP edge under many waiting clients: N SSE streams and N long-polls held on running jobs.

    python bench/edge.py [--streams 2000] [--polls 2000] [--jobs 16] [--max-tokens 1024]
                         [--worker-class gevent|gthread] [--threads 4200] [--url URL --redis-url URL]

Without --url it starts what `make run` starts, through genqueue/launcher.py: Redis, one worker on
the default model and the API (`genqueue api`), all on loopback, the per-client limits raised to
hold the clients (they all come from 127.0.0.1). With --url it measures a running API instead (give
its Redis with --redis-url; start it with GENQUEUE_MAX_STREAMS_PER_CLIENT and _WAITS_ above N).

Steps, every one bounded: submit the jobs; measure `/healthz` and `POST /v1/jobs` latency with no
client held (the baseline, in this run); open the streams (GET /v1/jobs/<id>/stream) and the
long-polls (GET ?wait=60 until the job ends), spread over the jobs (by default as many as the worker runs
at once, long enough to outlast the window, so every held client follows a running job); once the
API holds them all (its /metrics) and --settle seconds more, measure the same latencies again for
--window seconds (from a separate process, so this one's load of reading streams is not in the
numbers), with the API's RSS and its Redis connections; then read every stream and poll to its end
and check each against the job's stored result.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import PROMPTS, git_state, load_average, machine, model_dir, percentile, print_table, rss_mib  # noqa: E402
from genqueue import launcher  # noqa: E402
from tasks.store import keys  # noqa: E402

CONNECT_BATCH = 200  # connections opened at once
HELD_TIMEOUT_S = 180  # for every client to be held
END_TIMEOUT_S = 900  # for every job, stream and poll to end
PROBE_TIMEOUT_S = 10  # a probe request slower than this counts as failed
PROBE_INTERVAL_S = 0.05
POLL_WAIT_S = 60
TARGETS = {"healthz_p99_ms": 50, "post_p99_ms": 100, "rss_mib": 300, "redis_connections": 20}


# -- the probe: latencies, from a process of its own ----------------------------------------------


def probe(url: str, seconds: float, results) -> None:
    """Alternate GET /healthz and POST /v1/jobs (a 1-token job) for `seconds`; every second read the
    API's held clients from /metrics. Puts {"healthz": [ms], "post": [ms], "failed": n, "held": [...]}."""
    parts = urlparse(url)
    connections = {
        name: http.client.HTTPConnection(parts.hostname, parts.port, timeout=PROBE_TIMEOUT_S)
        for name in ("healthz", "post", "metrics")
    }
    body = json.dumps({"prompt": "Hi", "max_tokens": 1, "raw": True})
    times: dict[str, list[float]] = {"healthz": [], "post": []}
    held, failed = [], 0
    deadline = time.monotonic() + seconds
    next_metrics = 0.0
    while time.monotonic() < deadline:
        for name, method, path, payload in (("healthz", "GET", "/healthz", None), ("post", "POST", "/v1/jobs", body)):
            started = time.perf_counter()
            try:
                conn = connections[name]
                conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status not in (200, 202):
                    raise RuntimeError(response.status)
                times[name].append((time.perf_counter() - started) * 1000)
            except (OSError, http.client.HTTPException, RuntimeError):
                failed += 1
                connections[name].close()
        if time.monotonic() >= next_metrics:
            next_metrics = time.monotonic() + 1
            held.append(read_held(connections["metrics"]))
        time.sleep(PROBE_INTERVAL_S)
    results.put({**times, "failed": failed, "held": [h for h in held if h]})


def read_held(conn: http.client.HTTPConnection) -> dict[str, float] | None:
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        conn.close()
        return None
    found = re.findall(r'^genqueue_api_clients_waiting\{kind="(\w+)"\} (\S+)$', text, re.M)
    return {kind: float(value) for kind, value in found}


def run_probe(url: str, seconds: float) -> dict:
    results: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=probe, args=(url, seconds, results), daemon=True)
    process.start()
    outcome = results.get(timeout=seconds + 60)
    process.join(timeout=10)
    return outcome


# -- the held clients: raw HTTP/1.0 on asyncio (no chunked encoding; the answer ends at close) -----


async def get(host: str, port: int, path: str, opened: asyncio.Semaphore, timeout_s: float) -> tuple[int, bytes]:
    """(status, body) of one GET over HTTP/1.0, read to the connection's close (0: no answer)."""
    try:
        async with opened:  # connections are opened CONNECT_BATCH at a time
            reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            raw = await asyncio.wait_for(reader.read(-1), timeout_s)
        finally:
            writer.close()
    except (OSError, TimeoutError):
        return 0, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    return (int(head.split(b" ", 2)[1]) if head else 0), body


async def stream(host: str, port: int, job_id: str, opened: asyncio.Semaphore) -> dict:
    status, body = await get(host, port, f"/v1/jobs/{job_id}/stream", opened, END_TIMEOUT_S)
    events = [block for block in body.decode().split("\n\n") if block and not block.startswith(":")]
    datas = [line[len("data: ") :] for block in events for line in block.splitlines() if line.startswith("data: ")]
    text = "".join(json.loads(d).get("response", "") for d in datas if d != "[DONE]")
    return {"job_id": job_id, "status": status, "done": datas[-1:] == ["[DONE]"], "text": text}


async def poll(host: str, port: int, job_id: str, opened: asyncio.Semaphore) -> dict:
    """GET ?wait= again and again until the job has ended, as a long-polling client does."""
    deadline = time.monotonic() + END_TIMEOUT_S
    while True:
        status, body = await get(host, port, f"/v1/jobs/{job_id}?wait={POLL_WAIT_S}", opened, POLL_WAIT_S + 30)
        job = json.loads(body) if status == 200 else {}
        if status != 200 or job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return {"job_id": job_id, "status": status, "job": job}


async def hold_clients(
    url: str,
    job_ids: list[str],
    streams: int,
    polls: int,
    window_s: float,
    settle_s: float,
    api_pid: int,
    redis_url: str,
):
    parts = urlparse(url)
    host, port = parts.hostname, parts.port
    redis_port = urlparse(redis_url).port or 6379
    opened = asyncio.Semaphore(CONNECT_BATCH)
    tasks = [asyncio.create_task(stream(host, port, job_ids[i % len(job_ids)], opened)) for i in range(streams)]
    tasks += [asyncio.create_task(poll(host, port, job_ids[i % len(job_ids)], opened)) for i in range(polls)]
    loop = asyncio.get_running_loop()
    opened_at = time.monotonic()
    # Wait until the API holds them all (its /metrics), then probe while they are held.
    deadline = time.monotonic() + HELD_TIMEOUT_S
    while True:
        held = await loop.run_in_executor(None, held_now, url)
        if held.get("streams", 0) >= streams and held.get("waits", 0) >= polls:
            break
        if time.monotonic() > deadline:
            print(f"\nnot all held: the API held {held} after {HELD_TIMEOUT_S} s; measuring what it holds")
            break
        await asyncio.sleep(0.5)
    print(f"all held {time.monotonic() - opened_at:.0f} s after the first was opened; settling {settle_s:g} s")
    await asyncio.sleep(settle_s)  # the burst of arrivals (each reads its job) is not what the window measures
    samples: list[tuple[float, int]] = []

    async def sample() -> None:
        while True:
            samples.append((rss_mib(api_pid)[0], launcher.connections_to(api_pid, redis_port)))
            await asyncio.sleep(1)

    sampler = asyncio.create_task(sample())
    logged = logged_events(redis_url, job_ids)
    measured = await loop.run_in_executor(None, run_probe, url, window_s)
    measured["chunks_per_s"] = (logged_events(redis_url, job_ids) - logged) / window_s
    sampler.cancel()
    results = await asyncio.gather(*tasks)
    return measured, samples, results


def logged_events(redis_url: str, job_ids: list[str]) -> int:
    """The events in the jobs' logs now: how fast they grow is the load the followers fan out."""
    client = redis.Redis.from_url(redis_url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.xlen(keys.job_log(job_id))
            return sum(pipe.execute())
    finally:
        client.close()


def held_now(url: str) -> dict[str, float]:
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=PROBE_TIMEOUT_S)
    try:
        return read_held(conn) or {}
    finally:
        conn.close()


# -- the stack ------------------------------------------------------------------------------------


def submit_jobs(url: str, count: int, max_tokens: int) -> list[str]:
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    ids = []
    for i in range(count):
        body = {"prompt": PROMPTS[i % len(PROMPTS)] + f" (part {i})", "max_tokens": max_tokens, "temperature": 0.7}
        conn.request("POST", "/v1/jobs", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        job = json.loads(response.read())
        if response.status != 202:
            raise SystemExit(f"submitting failed: {response.status} {job}")
        ids.append(job["id"])
    conn.close()
    return ids


def stored_results(url: str, job_ids: list[str]) -> dict[str, dict]:
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=POLL_WAIT_S + 30)
    jobs = {}
    for job_id in job_ids:
        deadline = time.monotonic() + END_TIMEOUT_S
        while True:
            conn.request("GET", f"/v1/jobs/{job_id}?wait={POLL_WAIT_S}")
            job = json.loads(conn.getresponse().read())
            if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
                break
        jobs[job_id] = job
    conn.close()
    return jobs


def api_worker_pid(url: str, master_pid: int | None) -> int:
    """The gunicorn worker process serving url (the API's one worker process)."""
    if master_pid is None:
        port = urlparse(url).port
        master_pid = listening_pid(port)
    workers = launcher.children(master_pid)
    if len(workers) != 1:
        raise SystemExit(f"expected one API worker process under {master_pid}, found {workers}")
    return workers[0]


def listening_pid(port: int) -> int:
    """The lowest pid holding the socket that listens on port (a gunicorn master)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                holders.add(int(fd.parts[2]))
        except OSError:
            continue
    if not holders:
        raise SystemExit(f"no process listens on port {port}")
    return min(holders)


# -- the report ----------------------------------------------------------------------------------


def ms(values: list[float]) -> list[str]:
    if not values:
        return ["-"] * 4
    return [f"{percentile(values, q):.1f}" for q in (50, 90, 99)] + [f"{max(values):.1f}"]


def verdict(value: float, target: float) -> str:
    return f"<= {target}: {'met' if value <= target else 'missed'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=16, help="jobs the clients are spread over (a CPU worker runs 16)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="of each job: enough to outlast the window")
    parser.add_argument("--window", type=float, default=20, help="seconds of probing while the clients are held")
    parser.add_argument("--baseline", type=float, default=8, help="seconds of probing with no client held")
    parser.add_argument("--settle", type=float, default=10, help="seconds between all held and the window")
    parser.add_argument("--worker-class", choices=["gevent", "gthread"], default="gevent")
    parser.add_argument("--threads", type=int, default=4200, help="gthread: threads of the API process")
    parser.add_argument("--url", help="measure the API running there instead of starting one")
    parser.add_argument("--redis-url", default=os.environ.get("GENQUEUE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    print(f"# genqueue edge benchmark: python bench/edge.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}; {git_state()}; load average at start: {load_average()}")

    processes: list[launcher.Process] = []
    try:
        if args.url:
            url, redis_url, master = args.url, args.redis_url, None
        else:
            log_dir = Path(tempfile.mkdtemp(prefix="genqueue-edge-"))
            redis_server = launcher.RedisServer(log_dir=log_dir)
            processes.append(redis_server)
            limit = max(args.streams, args.polls) + 100
            settings = {
                "redis_url": redis_server.url(),
                "api_keys": "",
                "api_keys_file": "",
                "model": model_dir(),
                "max_streams_per_client": limit,
                "max_waits_per_client": limit,
            }
            processes.append(launcher.WorkerProcess(settings, log_dir=log_dir))
            server = ["--worker-class", args.worker_class]
            server += ["--threads", str(args.threads)] if args.worker_class == "gthread" else []
            api = launcher.ApiProcess(settings, log_dir=log_dir, extra_args=tuple(server))
            processes.append(api)
            api.wait_ready("/readyz")
            url, redis_url, master = api.url, redis_server.url(), api.pid
        pid = api_worker_pid(url, master)
        redis_port = urlparse(redis_url).port or 6379
        print(f"API: {url} ({args.worker_class if not args.url else 'running'}), worker process {pid}")

        job_ids = submit_jobs(url, args.jobs, args.max_tokens)
        baseline = run_probe(url, args.baseline)
        idle_rss, idle_connections = rss_mib(pid)[0], launcher.connections_to(pid, redis_port)
        started = time.monotonic()
        measured, samples, results = asyncio.run(
            hold_clients(url, job_ids, args.streams, args.polls, args.window, args.settle, pid, redis_url)
        )
        stored = stored_results(url, job_ids)
        elapsed = time.monotonic() - started
        load_end = load_average()
    finally:
        for process in reversed(processes):
            process.stop()

    streams = [r for r in results if "text" in r]
    polls = [r for r in results if "job" in r]
    streams_ok = sum(
        r["status"] == 200 and r["done"] and r["text"] == (stored[r["job_id"]].get("result") or {}).get("response")
        for r in streams
    )
    polls_ok = sum(r["status"] == 200 and r["job"] == stored[r["job_id"]] for r in polls)
    succeeded = sum(job["status"] == "succeeded" for job in stored.values())
    rss_max = max(s[0] for s in samples) if samples else float("nan")
    connections_max = max(s[1] for s in samples) if samples else -1
    held_min = (
        {kind: min(h.get(kind, 0) for h in measured["held"]) for kind in ("streams", "waits")}
        if measured["held"]
        else {}
    )

    p99 = {
        f"{name} {phase}": percentile(run[name], 99) if run[name] else float("nan")
        for name in ("healthz", "post")
        for phase, run in (("idle", baseline), ("held", measured))
    }
    all_held = held_min.get("streams", 0) >= args.streams and held_min.get("waits", 0) >= args.polls
    if not all_held:  # some jobs ended within the window: it measured fewer clients than the targets name
        print(f"\nnot all clients were held through the window (fewest {held_min}): no verdict on latency")

    def judged(value: float, target: float) -> str:
        return verdict(value, target) if all_held else "n/a: not all held"

    rows = [
        ["GET /healthz, nothing held", *ms(baseline["healthz"]), ""],
        [
            "GET /healthz, clients held",
            *ms(measured["healthz"]),
            judged(p99["healthz held"], TARGETS["healthz_p99_ms"]),
        ],
        ["POST /v1/jobs, nothing held", *ms(baseline["post"]), ""],
        ["POST /v1/jobs, clients held", *ms(measured["post"]), judged(p99["post held"], TARGETS["post_p99_ms"])],
    ]
    ratio = [
        f"p99 held / nothing held: /healthz {p99['healthz held'] / p99['healthz idle']:.2f}, "
        f"POST {p99['post held'] / p99['post idle']:.2f}; "
        f"failed probes: {baseline['failed']} nothing held, {measured['failed']} held"
    ]
    print_table(
        f"Latency (ms) while {args.streams} SSE streams and {args.polls} long-polls are held on {args.jobs} jobs "
        f"({args.window:g} s window; {len(measured['healthz'])} probes each)",
        ["request", "p50", "p90", "p99", "max", "target"],
        rows,
        ratio,
    )
    print_table(
        "The API process and the clients",
        ["measure", "value", "target"],
        [
            [
                "held during the window (fewest seen, /metrics)",
                f"{held_min.get('streams', 0):.0f} streams, {held_min.get('waits', 0):.0f} waits",
                "",
            ],
            [
                "chunks logged per second in the window, all jobs / sent to streams",
                f"{measured['chunks_per_s']:.0f} / {measured['chunks_per_s'] * args.streams / args.jobs:.0f}",
                "",
            ],
            [
                "API worker RSS, MiB (nothing held / peak held)",
                f"{idle_rss:.0f} / {rss_max:.0f}",
                verdict(rss_max, TARGETS["rss_mib"]),
            ],
            [
                "Redis connections of the API (nothing held / most held)",
                f"{idle_connections} / {connections_max}",
                verdict(connections_max, TARGETS["redis_connections"]),
            ],
            ["streams ended with [DONE], text equal to the stored result", f"{streams_ok} / {len(streams)}", "all"],
            ["long-polls ended with the stored job", f"{polls_ok} / {len(polls)}", "all"],
            ["jobs succeeded", f"{succeeded} / {len(stored)}", "all"],
        ],
        [f"{elapsed:.0f} s from opening the clients to the last check; load average at the end: {load_end}"],
    )
    if streams_ok != len(streams) or polls_ok != len(polls):
        print("polls that did not end as the stored job:", dict(Counter(poll_mismatch(r, stored) for r in polls)))
        raise SystemExit("some streams or polls did not end as the stored job")


def poll_mismatch(result: dict, stored: dict) -> str:
    """Why a long-poll's last answer is not the stored job ('' if it is), for the failure's summary."""
    job, want = result["job"], stored[result["job_id"]]
    if result["status"] != 200:
        return f"HTTP {result['status']}"
    if job.get("status") != want.get("status"):
        return f"ended its wait with the job {job.get('status')}"
    return "fields differ: " + ",".join(sorted(k for k in want if job.get(k) != want.get(k))) if job != want else ""


if __name__ == "__main__":
    main()
