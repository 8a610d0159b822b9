"""The client commands (`genqueue submit`, `genqueue job get`) against a live API and real workers,
run as the user runs them (a subprocess), and --help on every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from genqueue.cli import main
from tests.conftest import REPO, TINY_DB, redis_url
from tests.live import LiveServer


def genqueue(*args: str, api_url: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GENQUEUE_API_URL": api_url}
    return subprocess.run(
        [sys.executable, "-m", "genqueue.cli", *args],
        env=env,
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def job_id_of(stderr: str) -> str:
    return next(line.split()[1] for line in stderr.splitlines() if line.startswith("job "))


def test_submit_prints_the_text_and_job_get_the_job(tiny_api):
    done = genqueue("submit", "Tell me", "--temperature", "0", "--max-tokens", "8", api_url=tiny_api.url)
    assert done.returncode == 0, done.stderr
    job_id = job_id_of(done.stderr)
    got = genqueue("job", "get", job_id, "--wait", "10", api_url=tiny_api.url)
    assert got.returncode == 0, got.stderr
    job = json.loads(got.stdout)
    assert job["status"] == "succeeded" and job["result"]["usage"]["completion_tokens"] == 8
    assert done.stdout == job["result"]["response"] + "\n"


def test_submit_stream_prints_the_same_text_and_stop_applies(tiny_api):
    args = ("--temperature", "0", "--max-tokens", "30")
    full = genqueue("submit", "Tell me", *args, api_url=tiny_api.url).stdout.removesuffix("\n")
    streamed = genqueue("submit", "Tell me", "--stream", *args, api_url=tiny_api.url)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == full + "\n"
    stop = full[10:13]
    stopped = genqueue("submit", "-", "--stream", "--stop", stop, *args, api_url=tiny_api.url, stdin="Tell me")
    assert stopped.stdout == full[: full.find(stop)] + "\n"


def test_the_api_url_comes_from_the_flag_too(tiny_api):
    detached = genqueue("submit", "hi", "--detach", "--api-url", tiny_api.url, api_url="http://127.0.0.1:9")
    assert detached.returncode == 0, detached.stderr
    assert len(detached.stdout.strip()) >= 22


def test_errors_are_one_clear_line_and_a_failing_exit_status(tiny_api):
    missing = genqueue("job", "get", "nope", api_url=tiny_api.url)
    assert missing.returncode == 1 and "HTTP 404 job_not_found" in missing.stderr
    invalid = genqueue("submit", "hi", "--max-tokens", "0", api_url=tiny_api.url)
    assert invalid.returncode == 1 and "max_tokens: Must be greater than or equal to 1" in invalid.stderr
    failed = genqueue("submit", "word " * 600, api_url=tiny_api.url)
    assert failed.returncode == 1 and "context_length_exceeded" in failed.stderr
    down = genqueue("submit", "hi", api_url="http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach the genqueue API at http://127.0.0.1:9" in down.stderr


def test_submit_stream_prints_tokens_as_they_arrive(smol_api):
    env = {**os.environ, "GENQUEUE_API_URL": smol_api.url}
    command = [sys.executable, "-m", "genqueue.cli", "submit", "Write a story about a lighthouse.", "--stream"]
    process = subprocess.Popen(
        [*command, "--temperature", "0", "--max-tokens", "60"], env=env, cwd=REPO, stdout=subprocess.PIPE
    )
    arrivals = []
    while piece := os.read(process.stdout.fileno(), 4096):
        arrivals.append((time.perf_counter(), piece))
    assert process.wait(timeout=60) == 0
    # 60 tokens of SmolLM2 take seconds on this machine: printed piece by piece, not at the end.
    assert len(arrivals) > 10
    assert arrivals[-1][0] - arrivals[0][0] > 0.5


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *all_commands(main)], ids=lambda p: " ".join(p) or "genqueue")
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "-h, --help" in result.output


def test_client_commands_send_the_api_key_when_the_api_requires_one(tiny_worker):
    from api import create_app
    from api.auth import hash_key

    key = "gq_cli-test-key"
    server = LiveServer(create_app({"REDIS_URL": redis_url(TINY_DB), "API_KEYS": f"cli:{hash_key(key)}"}))
    try:
        refused = genqueue("submit", "hi", "--max-tokens", "2", api_url=server.url)
        assert refused.returncode == 1 and "HTTP 401 unauthorized" in refused.stderr
        done = genqueue("submit", "hi", "--max-tokens", "2", "--api-key", key, api_url=server.url)
        assert done.returncode == 0, done.stderr
        env_key = subprocess.run(
            [sys.executable, "-m", "genqueue.cli", "job", "get", job_id_of(done.stderr)],
            env={**os.environ, "GENQUEUE_API_URL": server.url, "GENQUEUE_API_KEY": key},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(env_key.stdout)["status"] == "succeeded"
    finally:
        server.stop()
