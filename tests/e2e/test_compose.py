"""docker-compose.yml is checked with Debian's docker-compose (no Docker engine runs here), and the
Dockerfile's shape (stages, user, what it copies) is read from its text."""

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose is not installed (.ci/run installs it)"
)


def compose_config(*args: str) -> dict:
    result = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), *args, "config"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@needs_compose
def test_the_default_stack_is_valid_and_complete():
    services = compose_config()["services"]
    assert {"redis", "model", "api", "worker-cpu"} <= set(services)
    assert services["worker-gpu"]["profiles"] == ["gpu"]  # only with --profile gpu
    assert services["flower"]["profiles"] == ["flower"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["healthcheck"]
    assert services["worker-cpu"]["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert services["model"]["build"]["target"] == "prepare"  # torch only where models are prepared
    assert services["api"]["build"]["target"] == services["worker-cpu"]["build"]["target"] == "runtime"
    for name in ("api", "worker-cpu", "model"):
        assert services[name]["environment"]["GENQUEUE_REDIS_URL"] == "redis://redis:6379/0"
        assert "models:/models" in services[name]["volumes"][0]


def test_the_api_is_served_by_gthread_workers_that_keep_streams_open():
    # gunicorn's sync workers would hold one stream per process and kill it at --timeout.
    from click.testing import CliRunner

    from genqueue.cli import api

    help_text = CliRunner().invoke(api, ["--help"]).output
    assert "gthread" in help_text and "--threads" in help_text
    assert '"gthread"' in (REPO / "genqueue" / "cli.py").read_text()


@needs_compose
def test_the_gpu_profile_adds_a_prepared_gpu_model_and_a_gpu_worker_with_a_device_reservation():
    services = compose_config("--profile", "gpu")["services"]
    gpu = services["worker-gpu"]
    assert "cuda" in gpu["command"] and gpu["build"]["target"] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["depends_on"]["model-gpu"]["condition"] == "service_completed_successfully"
    assert "int8_float16" in services["model-gpu"]["command"]
    assert gpu["environment"]["GENQUEUE_MODEL"] == "smollm2-135m-instruct-int8_float16"
    assert gpu["environment"]["GENQUEUE_REDIS_URL"] == "redis://redis:6379/0"  # the shared settings, merged


@needs_compose
def test_the_redis_url_and_default_queue_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("GENQUEUE_REDIS_URL", "redis://:secret@queue-host:6379/0")
    monkeypatch.setenv("GENQUEUE_DEFAULT_QUEUE", "gpu")
    services = compose_config()["services"]
    assert services["api"]["environment"]["GENQUEUE_REDIS_URL"] == "redis://:secret@queue-host:6379/0"
    assert services["api"]["environment"]["GENQUEUE_DEFAULT_QUEUE"] == "gpu"


def dockerfile_stages() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text()
    parts = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].split(" AS ")[-1].strip(): part for part in parts}


def test_the_dockerfile_is_multi_stage_non_root_and_bakes_in_no_model():
    stages = dockerfile_stages()
    assert {"build", "prepare", "gpu", "runtime"} <= set(stages)
    assert list(stages)[-1] == "runtime"  # the default target
    for name in ("prepare", "gpu", "runtime"):
        stage = stages[name]
        assert "COPY --from=build" in stage, name  # only the built virtual environment is copied in
    assert "USER genqueue" in stages["base"]
    assert "USER root" not in (REPO / "Dockerfile").read_text()
    assert "torch" not in stages["build"]  # the runtime image has no torch
    assert "models" in (REPO / ".dockerignore").read_text().split()
