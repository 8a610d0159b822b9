"""The client commands (`genqueue submit`, `genqueue job get`) against a live API and real workers,
run as the user runs them (a subprocess), and --help on every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import click
import pytest
from click.testing import CliRunner

import config
from api import create_app
from genqueue.cli import main
from genqueue.launcher import genqueue_argv
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
    # Up to 1000 tokens: long on any machine; cancelled once the first piece is printed.
    command = [sys.executable, "-m", "genqueue.cli", "submit", "Write a long story about a lighthouse.", "--stream"]
    process = subprocess.Popen(
        [*command, "--temperature", "0", "--max-tokens", "1000"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        job_id = job_id_of(process.stderr.readline().decode())
        printed = os.read(process.stdout.fileno(), 4096)
        assert printed.strip()
        # The first piece was printed while its job still runs: piece by piece, not at the end.
        with urllib.request.urlopen(f"{smol_api.url}/v1/jobs/{job_id}", timeout=30) as response:
            assert json.load(response)["status"] == "running"
        cancel = urllib.request.Request(f"{smol_api.url}/v1/jobs/{job_id}", method="DELETE")
        assert urllib.request.urlopen(cancel, timeout=30).status == 202
        printed += process.stdout.read()
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.communicate()
    with urllib.request.urlopen(f"{smol_api.url}/v1/jobs/{job_id}?wait=30", timeout=60) as response:
        job = json.load(response)
    assert job["status"] == "cancelled"
    assert printed.decode() == job["result"]["response"] + "\n"


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


def test_job_list_prints_your_jobs_newest_first(tiny_api):
    first = job_id_of(genqueue("submit", "one", "--max-tokens", "2", api_url=tiny_api.url).stderr)
    second = job_id_of(genqueue("submit", "two", "--max-tokens", "3", api_url=tiny_api.url).stderr)
    listed = genqueue("job", "list", "--limit", "2", "--status", "succeeded", api_url=tiny_api.url)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(row[0], row[1], row[3]) for row in rows] == [(second, "succeeded", "3"), (first, "succeeded", "2")]
    bad = genqueue("job", "list", "--batch", "batch_nope", api_url=tiny_api.url)
    assert bad.returncode == 1 and "404 batch_not_found" in bad.stderr


def test_webhooks_secret_prints_a_secret_the_reference_library_accepts():
    from standardwebhooks import Webhook

    result = CliRunner().invoke(main, ["webhooks", "secret"])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("whsec_") and secret != CliRunner().invoke(main, ["webhooks", "secret"]).stdout.strip()
    Webhook(secret)  # decodes as a Standard Webhooks secret
    refused = CliRunner().invoke(main, ["webhooks", "worker"], env={"GENQUEUE_WEBHOOK_SECRET": "nope"})
    assert refused.exit_code == 1 and "whsec_" in refused.output  # no worker starts without a valid secret


def test_version_is_printed():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip().endswith(config.VERSION)


def test_the_url_comes_from_the_flag_then_genqueue_url_then_the_older_genqueue_api_url(tiny_api):
    dead = "http://127.0.0.1:9"

    def detached(*args: str, **env: str) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k not in ("GENQUEUE_URL", "GENQUEUE_API_URL")}
        command = [sys.executable, "-m", "genqueue.cli", "job", "submit", "hi", "--max-tokens", "2", "--detach"]
        return subprocess.run(
            [*command, *args], env={**environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=60
        )

    assert detached(GENQUEUE_URL=tiny_api.url, GENQUEUE_API_URL=dead).returncode == 0
    assert detached(GENQUEUE_API_URL=tiny_api.url).returncode == 0
    assert detached("--url", tiny_api.url, GENQUEUE_URL=dead).returncode == 0
    refused = detached("--url", dead, GENQUEUE_URL=tiny_api.url)
    assert refused.returncode == 1 and f"cannot reach the genqueue API at {dead}" in refused.stderr


def test_detach_prints_only_the_id_and_job_wait_stream_cancel_follow_it(tiny_api):
    queued = genqueue(
        "job", "submit", "Tell me", "--temperature", "0", "--max-tokens", "12", "--detach", api_url=tiny_api.url
    )
    assert queued.returncode == 0 and queued.stderr == ""
    job_id = queued.stdout.strip()
    assert queued.stdout == job_id + "\n" and job_id.startswith("job_")
    waited = genqueue("job", "wait", job_id, api_url=tiny_api.url)
    assert waited.returncode == 0, waited.stderr
    job = json.loads(waited.stdout)
    assert job["id"] == job_id and job["status"] == "succeeded"
    streamed = genqueue("job", "stream", job_id, api_url=tiny_api.url)
    assert streamed.returncode == 0 and streamed.stdout == job["result"]["response"] + "\n"
    again = genqueue("job", "cancel", job_id, api_url=tiny_api.url)
    assert again.returncode == 1 and "409 job_already_ended" in again.stderr


def test_submit_composes_system_and_messages_and_json_prints_the_job(tiny_api, tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "turns.json").write_text(json.dumps(turns))
    args = ("--temperature", "0", "--max-tokens", "8", "--json")
    run = genqueue(
        "submit",
        "And now?",
        "--system",
        "Be brief.",
        "--messages",
        str(tmp_path / "turns.json"),
        *args,
        api_url=tiny_api.url,
    )
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout)
    expected = [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "And now?"}]
    from genqueue.client import Client

    with Client(tiny_api.url) as client:
        direct = client.wait(client.submit({"messages": expected, "temperature": 0, "max_tokens": 8}).id)
    assert job["result"]["response"] == direct.text
    assert job["result"]["usage"] == direct.raw["result"]["usage"]
    lora = genqueue("submit", "hi", "--lora", "nope", api_url=tiny_api.url)
    assert lora.returncode == 1 and "unknown_lora" in lora.stderr and "lora:" in lora.stderr


def test_exit_codes_say_how_a_job_or_batch_ended(tiny_worker, tmp_path):
    # An API on a queue no worker consumes: its jobs stay queued until cancelled.
    server = LiveServer(create_app({"REDIS_URL": redis_url(TINY_DB), "DEFAULT_QUEUE": "gpu", "NO_WORKER_GRACE_S": 0}))
    try:
        job_id = genqueue("submit", "hi", "--detach", api_url=server.url).stdout.strip()
        pending = genqueue("job", "wait", job_id, "--timeout", "0.5", api_url=server.url)
        assert pending.returncode == 4 and json.loads(pending.stdout)["status"] == "queued"
        assert genqueue("job", "cancel", job_id, api_url=server.url).returncode == 0
        cancelled = genqueue("job", "wait", job_id, api_url=server.url)
        assert cancelled.returncode == 3 and "cancelled" in cancelled.stderr

        upload = tmp_path / "two.jsonl"
        upload.write_text("".join(json.dumps({"body": {"prompt": f"p{i}", "max_tokens": 2}}) + "\n" for i in (0, 1)))
        command = [sys.executable, "-m", "genqueue.cli", "batch", "submit", str(upload), "--wait", "--poll", "0.2"]
        env = {**os.environ, "GENQUEUE_URL": server.url}
        process = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        batch_id = process.stderr.readline().split()[1].rstrip(":")  # "batch <id>: 2 requests queued"
        from genqueue.client import Client

        with Client(server.url) as client:  # each request cancelled alone: the batch was not cancelled
            for index in (0, 1):
                assert client.cancel(f"{batch_id}-{index}").status == "cancelled"
        out, err = process.communicate(timeout=60)
        assert process.returncode == 3, err
        assert json.loads(out)["status"] == "completed_with_errors"
        assert "0 succeeded, 0 failed, 2 cancelled" in err
    finally:
        server.stop()


def test_tune_prints_the_sweep_and_caches_the_choice_workers_then_read(tiny_dir, tmp_path):
    from engine import threads

    args = ["tune", "--model", str(tiny_dir), "--rounds", "1", "--tokens", "4", "--max-batch-size", "2"]
    env = {**os.environ, "GENQUEUE_STATE_DIR": str(tmp_path)}
    result = subprocess.run(genqueue_argv(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    configs = threads.candidates(threads.available_cores(), "cpu", 2, full=True)
    rows = result.stdout.splitlines()[1:-1]
    assert [row.split("|")[0].strip() for row in rows] == [threads.label(c) for c in configs]
    workload = threads.Workload(loads=(1, 2), max_batch_size=2)
    read = threads.for_worker(tiny_dir, "cpu", None, workload, tmp_path, calibrate=False)  # what a worker reads
    assert read.source == "tuned" and set(read.measured) == {threads.label(c) for c in configs}
    assert f"chosen: intra_threads {read.intra_threads}, {read.inter_threads} replicas" in result.stdout


def test_a_worker_whose_engine_cannot_start_exits_instead_of_taking_jobs(tiny_dir):
    # Celery has set no logging up when the engine is built: the failure must still be said, and the
    # worker must not go on to consume jobs it cannot run (a supervisor restarts it instead).
    env = {
        **os.environ,
        "GENQUEUE_REDIS_URL": redis_url(TINY_DB),
        "GENQUEUE_MODEL": str(tiny_dir),
        "GENQUEUE_HEARTBEAT_TIMEOUT_S": "20",  # refused by the worker's runtime: at most 15
    }
    worker = subprocess.run(
        genqueue_argv("worker", "--queue", "gpu"), env=env, capture_output=True, text=True, timeout=120
    )
    assert worker.returncode == 1, worker.stderr[-2000:]
    assert "HEARTBEAT_TIMEOUT_S must be 1 to 15 seconds, not 20" in worker.stderr
    assert "could not start its engine" in worker.stderr
