"""The HTTP edge as `genqueue api` serves it (gunicorn, gevent worker), with real sockets: many
followers on few Redis connections, clients that leave, per-client limits, slow clients.

The jobs of EDGE_DB stay queued until a test starts a worker for them, so streams and waits are held
as long as a test needs.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import redis

from api.auth import hash_key
from genqueue import launcher
from tests.conftest import EDGE_DB, REPO, WorkerProcess, redis_url
from tests.helpers import parse_sse, sse_text

KEEPALIVE_S = 1  # how often a held client is looked at
ALICE, BOB = "gq_alice-key", "gq_bob-key"
KEYS = f"alice:{hash_key(ALICE)},bob:{hash_key(BOB)}"
GONE_WITHIN_S = 8 * KEEPALIVE_S  # generous: the machine is shared
HEAD_S = 3  # HEADER_TIMEOUT_S: more than gunicorn's own default (2 s), so the test sees ours


def start_api(**settings) -> launcher.ApiProcess:
    # Jobs stay queued until a test starts a worker: the no-worker refusal is off.
    base = {"redis_url": redis_url(EDGE_DB), "sse_keepalive_s": KEEPALIVE_S, "api_keys_file": ""}
    base["no_worker_grace_s"] = 0
    return launcher.ApiProcess({**base, **settings}, cwd=REPO).wait_ready()


@pytest.fixture(scope="module")
def api():
    redis.Redis.from_url(redis_url(EDGE_DB)).flushdb()
    server = start_api(
        api_keys=KEYS, max_streams_per_client=2, max_waits_per_client=1, header_timeout_s=HEAD_S, body_timeout_s=1
    )
    yield server
    server.stop()


# -- raw HTTP over a socket, so a test can hold, dribble and drop connections -----------------------


def connect(url: str) -> socket.socket:
    parts = urlparse(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def send(
    url: str, method: str, path: str, body: dict | None = None, key: str | None = ALICE, headers=()
) -> socket.socket:
    """Send one HTTP/1.0 request (the answer ends when the server closes) and return its socket."""
    data = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1", *headers]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    sock = connect(url)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    return sock


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and what of the body came with them."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the head: {raw!r}"
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in header_lines)}
    return int(status_line.split()[1]), headers, rest


def read_rest(sock: socket.socket, rest: bytes = b"", timeout_s: float = 60) -> bytes:
    """Everything until the server closes, within timeout_s (else the test fails)."""
    deadline = time.monotonic() + timeout_s
    while True:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"still open after {timeout_s} s; so far: {rest[-300:]!r}")
        if not chunk:
            sock.close()
            return rest
        rest += chunk


def call(url: str, method: str, path: str, body: dict | None = None, key: str | None = ALICE, headers=()):
    """(status, headers, body) of one request."""
    sock = send(url, method, path, body, key, headers)
    status, head, rest = read_head(sock)
    return status, head, read_rest(sock, rest)


def submit(url: str, body: dict | None = None, key: str = ALICE) -> str:
    status, _head, raw = call(url, "POST", "/v1/jobs", body or {"prompt": "hello", "max_tokens": 8}, key)
    assert status == 202, raw
    return json.loads(raw)["id"]


def gauges(url: str) -> dict[str, float]:
    _status, _head, raw = call(url, "GET", "/metrics")
    found = re.findall(r'^genqueue_api_(followers|clients_waiting\{kind="\w+"\}) (\S+)$', raw.decode(), re.M)
    return {name: float(value) for name, value in found}


def wait_until(condition, timeout_s: float, what: str, seen=lambda: None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s: {seen()}"
        time.sleep(0.1)


def job_status(url: str, job_id: str) -> str:
    return json.loads(call(url, "GET", f"/v1/jobs/{job_id}")[2])["status"]


# -- many followers -----------------------------------------------------------------------------------


def test_300_followers_of_a_few_jobs_share_a_few_redis_connections_and_all_end_with_the_result(tiny_dir):
    redis.Redis.from_url(redis_url(EDGE_DB)).flushdb()
    server = start_api(max_streams_per_client=1000, max_waits_per_client=1000, api_keys="")
    worker = None
    try:
        jobs = [
            submit(server.url, {"prompt": f"Story {n}", "max_tokens": 40, "temperature": 0}, key=None) for n in range(3)
        ]
        answers: dict[int, bytes] = {}

        def follow(n: int) -> None:
            job_id = jobs[n % len(jobs)]
            path = f"/v1/jobs/{job_id}/stream" if n % 3 else f"/v1/jobs/{job_id}?wait=60"
            sock = send(server.url, "GET", path, key=None)
            answers[n] = read_rest(sock, timeout_s=120)

        threads = [threading.Thread(target=follow, args=(n,), daemon=True) for n in range(300)]
        for thread in threads:
            thread.start()
        # All 300 held at once (the jobs are queued: no worker yet), on a few Redis connections.
        wait_until(lambda: gauges(server.url).get("followers") == 300, 60, "300 followers")
        api_process = launcher.children(server.pid)[0]
        redis_port = urlparse(redis_url(EDGE_DB)).port
        assert launcher.connections_to(api_process, redis_port) <= 12 + 3  # its pool, the subscription, Celery's
        worker = WorkerProcess(tiny_dir, EDGE_DB, concurrency=4, max_batch_size=4)
        for thread in threads:
            thread.join(timeout=120)
        results = {job_id: json.loads(call(server.url, "GET", f"/v1/jobs/{job_id}", key=None)[2]) for job_id in jobs}
        assert all(job["status"] == "succeeded" for job in results.values())
        for n, raw in answers.items():
            job = results[jobs[n % len(jobs)]]
            status_line, _, body = raw.partition(b"\r\n\r\n")
            assert b" 200 " in status_line.split(b"\r\n")[0]
            if n % 3:
                events = parse_sse(body.decode())
                assert events[-1]["data"] == "[DONE]"
                assert sse_text(events) == job["result"]["response"]
            else:
                assert json.loads(body) == job
        assert gauges(server.url).get("followers") == 0
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def test_a_resume_at_or_past_the_end_sends_the_last_event_and_closes_at_once(api):
    job_id = submit(api.url)
    assert call(api.url, "DELETE", f"/v1/jobs/{job_id}")[0] == 200  # queued: it ends now, cancelled
    whole = parse_sse(call(api.url, "GET", f"/v1/jobs/{job_id}/stream")[2].decode())
    assert [event["id"] for event in whole] == ["1", None] and whole[-1]["data"] == "[DONE]"
    for resume in (1, 2, 10**15):
        started = time.monotonic()
        sock = send(api.url, "GET", f"/v1/jobs/{job_id}/stream", headers=[f"Last-Event-ID: {resume}"])
        status, _head, rest = read_head(sock)
        events = parse_sse(read_rest(sock, rest, timeout_s=5).decode())
        assert status == 200 and time.monotonic() - started < 5
        assert events == whole  # its last event again, then [DONE]


# -- clients that leave -------------------------------------------------------------------------------


def test_a_client_that_leaves_frees_its_follower_and_a_get_stream_never_cancels(api):
    job_id = submit(api.url)
    before = gauges(api.url)
    sock = send(api.url, "GET", f"/v1/jobs/{job_id}/stream")
    wait_until(lambda: gauges(api.url)["followers"] == before["followers"] + 1, 10, "following")
    sock.close()
    wait_until(lambda: gauges(api.url)["followers"] == before["followers"], GONE_WITHIN_S, "let go")
    assert gauges(api.url)['clients_waiting{kind="streams"}'] == 0
    waiting = send(api.url, "GET", f"/v1/jobs/{job_id}?wait=60")
    wait_until(lambda: gauges(api.url)['clients_waiting{kind="waits"}'] == 1, 10, "waiting")
    waiting.close()
    wait_until(lambda: gauges(api.url)['clients_waiting{kind="waits"}'] == 0, GONE_WITHIN_S, "let go")
    assert gauges(api.url)["followers"] == before["followers"]
    assert job_status(api.url, job_id) == "queued"  # neither a stream nor a wait of a job cancels it


def job_ids() -> set[str]:
    client = redis.Redis.from_url(redis_url(EDGE_DB), decode_responses=True)
    return {key.split(":")[2] for key in client.scan_iter("genqueue:job:*") if key.count(":") == 2}


@pytest.mark.parametrize(
    "path, stream",
    [
        ("/v1/jobs", True),
        ("/v1/jobs?wait=60", False),  # submit and wait in one request
        ("/v1/chat/completions", True),
        ("/v1/chat/completions", False),  # synchronous: the request waits for its job
        ("/ai/run/@cf/meta/llama-2-7b-chat-int8", True),
        ("/ai/run/@cf/meta/llama-2-7b-chat-int8", False),
    ],
)
def test_when_the_client_that_submitted_a_job_and_follows_it_leaves_the_job_is_cancelled(api, path, stream):
    body: dict = {"prompt": "hi", "stream": stream}
    if path.startswith("/v1/chat"):
        model = json.loads(call(api.url, "GET", "/v1/models")[2])["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    before = job_ids()
    sock = send(api.url, "POST", path, body)
    kind = "streams" if stream else "waits"
    wait_until(lambda: gauges(api.url)[f'clients_waiting{{kind="{kind}"}}'] == 1, 10, "held", lambda: gauges(api.url))
    (job_id,) = job_ids() - before
    assert job_status(api.url, job_id) == "queued"
    sock.close()
    wait_until(lambda: job_status(api.url, job_id) == "cancelled", GONE_WITHIN_S, "cancelled")


# -- per-client limits --------------------------------------------------------------------------------


def test_streams_and_waits_past_a_clients_limit_get_429_and_other_clients_do_not(api):
    job_id = submit(api.url)
    held = [send(api.url, "GET", f"/v1/jobs/{job_id}/stream") for _ in range(2)]
    for sock in held:
        assert read_head(sock)[0] == 200
    status, head, raw = call(api.url, "GET", f"/v1/jobs/{job_id}/stream")
    assert status == 429 and int(head["retry-after"]) > 0
    assert json.loads(raw)["error"]["code"] == "too_many_streams"
    status, _head, raw = call(api.url, "POST", "/v1/jobs", {"prompt": "hi", "stream": True})
    assert status == 429, raw  # refused before anything is queued
    # Another key has its own limit; a wait is counted apart from streams.
    bob_job = submit(api.url, key=BOB)
    bob = send(api.url, "GET", f"/v1/jobs/{bob_job}/stream", key=BOB)
    assert read_head(bob)[0] == 200
    waiting = send(api.url, "GET", f"/v1/jobs/{job_id}?wait=60")
    wait_until(lambda: gauges(api.url)['clients_waiting{kind="waits"}'] == 1, 10, "waiting")
    status, head, raw = call(api.url, "GET", f"/v1/jobs/{job_id}?wait=5")
    assert status == 429 and json.loads(raw)["error"]["code"] == "too_many_waits"
    before = job_ids()
    status, head, raw = call(api.url, "POST", "/v1/jobs?wait=5", {"prompt": "hi"})
    assert status == 429 and json.loads(raw)["error"]["code"] == "too_many_waits"
    assert job_ids() == before  # refused before anything is queued
    # A stream that ends gives its place back.
    held[0].close()
    wait_until(
        lambda: gauges(api.url)['clients_waiting{kind="streams"}'] == 2, GONE_WITHIN_S, "let go"
    )  # alice 1, bob 1
    again = send(api.url, "GET", f"/v1/jobs/{job_id}/stream")
    assert read_head(again)[0] == 200
    for sock in (held[1], bob, waiting, again):
        sock.close()


# -- slow and hostile clients -----------------------------------------------------------------------


def test_dribbled_headers_and_a_stalled_body_hold_only_their_own_socket_and_not_for_long(api):
    dribble = connect(api.url)
    dribble.sendall(b"GET /healthz HTTP/1.1\r\n")
    stalled = connect(api.url)
    stalled.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + ALICE.encode())
    stalled.sendall(b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"')
    started = time.monotonic()
    closed_at = None
    while closed_at is None and time.monotonic() - started < HEAD_S + 10:
        try:
            dribble.sendall(b"X")  # a byte of a header every 0.2 s
        except OSError:
            closed_at = time.monotonic()
            break
        assert call(api.url, "GET", "/healthz", key=None)[0] == 200  # others are answered meanwhile
        dribble.settimeout(0.2)
        try:
            if dribble.recv(1024) == b"":
                closed_at = time.monotonic()
        except TimeoutError:
            pass
        except OSError:  # reset
            closed_at = time.monotonic()
    assert closed_at is not None, "the dribbling client was not dropped"
    assert HEAD_S - 0.5 < closed_at - started < HEAD_S + 5
    status, _head, rest = read_head(stalled)
    assert status == 408, read_rest(stalled, rest, timeout_s=5)
    assert json.loads(read_rest(stalled, rest, timeout_s=5))["error"]["code"] == "request_timeout"
