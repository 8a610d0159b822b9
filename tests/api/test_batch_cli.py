"""`genqueue batch submit --wait` and `genqueue batch results` against a live API and the tiny worker."""

import json
import os
import subprocess
import sys
import threading

import pytest
from werkzeug.serving import make_server

from api import create_app
from api.auth import hash_key
from tests.conftest import REPO, TINY_DB, redis_url

KEY = "gq_batch-cli"


@pytest.fixture
def api_url(tiny_worker):
    app = create_app({"REDIS_URL": redis_url(TINY_DB), "API_KEYS": f"cli:{hash_key(KEY)}"})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def genqueue(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GENQUEUE_API_KEY": KEY}
    command = [sys.executable, "-m", "genqueue.cli", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_submit_waits_with_a_progress_bar_then_results_are_written_in_order(api_url, tmp_path):
    upload = tmp_path / "requests.jsonl"
    lines = [{"custom_id": f"r{i}", "body": {"prompt": f"Count to {i}", "max_tokens": 6}} for i in range(6)]
    upload.write_text("".join(json.dumps(line) + "\n" for line in lines))

    run = genqueue("batch", "submit", str(upload), "--wait", "--poll", "0.2", "-m", "team=ml", "--url", api_url)
    assert run.returncode == 0, run.stderr
    batch = json.loads(run.stdout)
    assert batch["status"] == "completed" and batch["metadata"] == {"team": "ml"}
    assert batch["request_counts"] == {"total": 6, "completed": 6, "failed": 0, "cancelled": 0}
    progress = run.stderr.replace("\r", "\n")
    assert "6/6" in progress and "tokens/s=" in progress  # done/total, throughput; tqdm's ETA sits between

    out = tmp_path / "out.jsonl"
    run = genqueue("batch", "results", batch["id"], "-o", str(out), "--url", api_url)
    assert run.returncode == 0, run.stderr
    assert "6 results" in run.stderr and "completed" in run.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["custom_id"]) for r in results] == [(i, f"r{i}") for i in range(6)]
    assert all(r["result"]["usage"]["completion_tokens"] == 6 for r in results)

    listed = genqueue("batch", "list", "--url", api_url)
    assert listed.stdout.startswith(f"{batch['id']}\tcompleted\t6/6")


def test_a_refused_file_prints_the_bad_lines_and_fails(api_url, tmp_path):
    upload = tmp_path / "bad.jsonl"
    upload.write_text('{"body": {"prompt": "ok"}}\n{"body": {"prompt": "x", "temperature": "hot"}}\n')
    run = genqueue("batch", "submit", str(upload), "--url", api_url)
    assert run.returncode == 1
    assert "1 of 2 requests are invalid" in run.stderr
    assert "lines.2.body.temperature: Not a valid number." in run.stderr
    run = genqueue("batch", "get", "batch_nope", "--url", api_url)
    assert run.returncode == 1 and "404 batch_not_found" in run.stderr
