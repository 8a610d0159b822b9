"""The stack exactly as `make run` starts it: `genqueue run` (API under gunicorn, one worker)."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from genqueue.launcher import free_port
from tests.conftest import E2E_DB, REPO, redis_url
from tests.helpers import parse_sse, sse_text

READY_TIMEOUT_S = 120
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"genqueue-run-webhook-secret-32by").decode()


def http(method: str, url: str, body: dict | None = None, timeout: float = 60):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


@pytest.fixture(scope="module")
def stack(smollm2_dir, tmp_path_factory):
    port = free_port()
    env = {
        **os.environ,
        "GENQUEUE_REDIS_URL": redis_url(E2E_DB),
        "GENQUEUE_PORT": str(port),
        "GENQUEUE_MODELS_DIR": str(smollm2_dir.parent),
        "GENQUEUE_WEBHOOK_SECRET": WEBHOOK_SECRET,  # so it runs a webhook worker too
        "GENQUEUE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    }
    log = open(tmp_path_factory.mktemp("run") / "run.log", "w+")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "genqueue.cli", "run"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        log.seek(0)
        output = log.read()
        if "genqueue is ready" in output:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"genqueue run did not become ready:\n{output}")
        time.sleep(0.3)
    yield url, process, log
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)


def test_run_prints_the_url_and_a_curl_example(stack):
    url, _process, log = stack
    log.seek(0)
    output = log.read()
    assert f"genqueue is ready at {url}" in output
    assert f"curl -sN {url}/v1/jobs" in output


def test_a_job_over_http_answers_paris_and_streams_the_same_text(stack):
    url, _process, _log = stack
    submitted = time.perf_counter()
    with http("POST", f"{url}/v1/jobs", {"prompt": "What is the capital of France?", "temperature": 0}) as r:
        assert r.status == 202
        job_id = json.load(r)["id"]
    with http("GET", f"{url}/v1/jobs/{job_id}?wait=60") as r:
        job = json.load(r)
    elapsed = time.perf_counter() - submitted
    assert job["status"] == "succeeded", job
    assert "Paris" in job["result"]["response"]
    print(f"\nsubmit to result over HTTP: {elapsed * 1000:.0f} ms for {job['result']['usage']}")
    with http("GET", f"{url}/v1/jobs/{job_id}/stream") as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = parse_sse(r.read().decode())
    assert sse_text(events) == job["result"]["response"]


def test_a_live_stream_arrives_while_its_job_runs(stack):
    url, _process, _log = stack
    # Long enough on any machine (up to 1000 tokens); cancelled once the first chunk is in.
    body = {"prompt": "Write a long story about a lighthouse.", "temperature": 0, "max_tokens": 1000, "stream": True}
    with http("POST", f"{url}/v1/jobs", body) as r:
        job_id = r.headers["X-Job-Id"]
        lines = (line for line in r if line.startswith(b"data: "))
        assert b'"response"' in next(lines)
        # The first chunk came while its job still runs: streamed as generated, not buffered to the end.
        with http("GET", f"{url}/v1/jobs/{job_id}") as job:
            assert json.load(job)["status"] == "running"
        with http("DELETE", f"{url}/v1/jobs/{job_id}") as cancel:
            assert cancel.status == 202
        rest = list(lines)
    assert rest[-1] == b"data: [DONE]\n"
    with http("GET", f"{url}/v1/jobs/{job_id}?wait=60") as r:
        job = json.load(r)
    assert job["status"] == "cancelled" and job["result"]["usage"]["completion_tokens"] < 1000


def test_the_openai_client_streams_and_metrics_count_it_under_gunicorn(stack):
    import openai

    url, _process, _log = stack
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    [model] = [m.id for m in client.models.list().data]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    stream = client.chat.completions.create(model=model, messages=question, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in text
    with http("GET", f"{url}/metrics") as r:
        metrics = r.read().decode()
    assert r.headers["X-Request-Id"]
    succeeded = next(line for line in metrics.splitlines() if line.startswith('genqueue_jobs_total{state="succeeded"}'))
    assert float(succeeded.split()[-1]) >= 1


def test_a_webhook_is_delivered_by_the_webhook_worker_it_runs(stack):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from standardwebhooks import Webhook

    url, _process, _log = stack
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(Webhook(WEBHOOK_SECRET).verify(body, dict(self.headers.items())))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        body = {"prompt": "Hi", "max_tokens": 2, "webhook": f"http://127.0.0.1:{receiver.server_port}/hook"}
        with http("POST", f"{url}/v1/jobs", body) as r:
            job_id = json.load(r)["id"]
        deadline = time.monotonic() + 60
        while not received:
            assert time.monotonic() < deadline, "no webhook arrived"
            time.sleep(0.1)
        assert received[0]["type"] == "job.succeeded" and received[0]["data"]["id"] == job_id
    finally:
        receiver.shutdown()


def test_ctrl_c_stops_everything_it_started(stack):
    _url, process, log = stack
    children = child_pids(process.pid)
    assert len(children) == 3  # the worker, the webhook worker and the API
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent`, from /proc (field 4 of /proc/<pid>/stat)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children
