"""docker-compose.yml is checked with Debian's docker-compose (no Docker engine runs here)."""

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
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


def test_the_default_stack_is_valid_and_complete():
    services = compose_config()["services"]
    assert {"redis", "model", "api", "worker-cpu"} <= set(services)
    assert services["worker-gpu"]["profiles"] == ["gpu"]  # only with --profile gpu
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["healthcheck"]
    assert services["worker-cpu"]["depends_on"]["model"]["condition"] == "service_completed_successfully"


def test_the_gpu_profile_adds_a_gpu_worker_with_a_device_reservation():
    services = compose_config("--profile", "gpu")["services"]
    gpu = services["worker-gpu"]
    assert "cuda" in gpu["command"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
