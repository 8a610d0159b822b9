"""docker-compose.yml is checked with Debian's docker-compose (no Docker engine runs here), and the
Dockerfile's shape (stages, user, what it copies) is read from its text."""

import re
import shutil
import subprocess

import pytest
import yaml

import config
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
    assert "--appendonly yes" in services["redis"]["command"][0]
    assert services["redis"]["healthcheck"]
    assert services["worker-cpu"]["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert services["model"]["build"]["target"] == "prepare"  # torch only where models are prepared
    assert services["api"]["build"]["target"] == services["worker-cpu"]["build"]["target"] == "runtime"
    for name in ("api", "worker-cpu", "model"):
        assert services[name]["environment"]["GENQUEUE_REDIS_URL"] == "redis://redis:6379/0"
        assert services[name]["environment"]["GENQUEUE_REDIS_PASSWORD_FILE"] == "/run/genqueue-secrets/redis_password"
        assert "models:/models" in services[name]["volumes"][0]


@needs_compose
def test_redis_asks_for_a_password_and_refuses_writes_when_full_rather_than_evicting():
    services = compose_config()["services"]
    redis_command = services["redis"]["command"][0]
    assert "requirepass" in redis_command and "--maxmemory-policy noeviction" in redis_command
    assert "--maxmemory " in redis_command and "--appendonly yes" in redis_command
    assert "ports" not in services["redis"]  # reachable by the stack's services only
    assert services["redis"]["depends_on"]["secrets"]["condition"] == "service_completed_successfully"


@needs_compose
def test_the_compose_scripts_make_a_password_and_redis_takes_it(tmp_path, redis_server_binary):
    """The secrets and redis services' shell scripts, run here for real (paths moved into tmp_path)."""
    import redis

    from genqueue.launcher import free_port

    services = compose_config()["services"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()

    def script(service: str) -> str:
        text = services[service]["command"][0].replace("$$", "$").replace("/secrets/", f"{secrets}/")
        return text.replace("/tmp/redis.conf", str(tmp_path / "redis.conf"))

    subprocess.run(["sh", "-c", script("secrets")], check=True, env={"PATH": "/usr/bin:/bin"})
    password = (secrets / "redis_password").read_text()
    assert len(password) == 64 and int(password, 16)  # 32 random bytes, hex
    subprocess.run(["sh", "-c", script("secrets")], check=True, env={"PATH": "/usr/bin:/bin"})
    assert (secrets / "redis_password").read_text() == password  # made once, kept after
    port = free_port()
    command = script("redis").replace("exec redis-server", f"exec {redis_server_binary}")
    command += f" --port {port} --bind 127.0.0.1 --dir {tmp_path} --daemonize yes"
    subprocess.run(["sh", "-c", command], check=True)
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).set("k", "v")
        client = redis.Redis(port=port, password=password)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == 2 * 1024**3
    finally:
        redis.Redis(port=port, password=password).shutdown(nosave=True)


@needs_compose
def test_nothing_open_is_published_beyond_the_hosts_loopback():
    services = compose_config("--profile", "flower", "--profile", "gpu")["services"]
    for name, service in services.items():
        if service.get("environment", {}).get("GENQUEUE_OPEN_API_ANY_HOST") in ("true", True):
            assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", [])), name
    flower = services["flower"]
    assert [str(port).removesuffix("/tcp") for port in flower["ports"]] == ["127.0.0.1:5555:5555"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"] and "exit 1" in flower["command"][0]


@needs_compose
def test_the_api_is_served_by_gevent_workers_with_room_for_many_clients():
    # gevent is `genqueue api`'s default (tests/api/test_edge.py holds 300 clients on it); the compose
    # file keeps it, and lets each process open enough sockets.
    from click.testing import CliRunner

    from genqueue.cli import api as api_command

    assert "[default: gevent]" in CliRunner().invoke(api_command, ["--help"]).output
    api = compose_config()["services"]["api"]
    assert "--worker-class" not in api["command"] and "--threads" not in api["command"]
    assert api["ulimits"]["nofile"]["soft"] >= 65536


@needs_compose
def test_the_gpu_profile_adds_a_prepared_gpu_model_and_a_gpu_worker_with_a_device_reservation():
    services = compose_config("--profile", "gpu")["services"]
    gpu = services["worker-gpu"]
    assert "cuda" in gpu["command"] and gpu["build"]["target"] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["depends_on"]["model-gpu"]["condition"] == "service_completed_successfully"
    assert gpu["environment"]["GENQUEUE_REDIS_URL"] == "redis://redis:6379/0"  # the shared settings, merged
    assert gpu["environment"]["GENQUEUE_REDIS_PASSWORD_FILE"]


@needs_compose
def test_the_gpu_profile_prepares_llama_2_chat_from_a_mounted_directory_for_a_gpu_sized_worker(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA2_CHAT_DIR", "/data/hf/Llama-2-7b-chat-hf")
    services = compose_config("--profile", "gpu")["services"]
    prepare, gpu = services["model-gpu"], services["worker-gpu"]
    command = prepare["command"]
    assert command[:3] == ["genqueue", "model", "prepare"] and prepare["build"]["target"] == "prepare"
    source = command[3]
    assert "/data/hf/Llama-2-7b-chat-hf:" + source + ":ro" in prepare["volumes"]  # the host's snapshot, read-only
    assert command[command.index("--quantization") + 1] == "int8_float16"
    name = command[command.index("--name") + 1]
    assert gpu["environment"]["GENQUEUE_MODEL"] == name  # the worker loads what the profile prepared
    command = gpu["command"]
    device = command[command.index("--device") + 1]
    environment = {k: str(v) for k, v in gpu["environment"].items()}
    secret = tmp_path / "redis_password"  # what the secrets volume holds inside the container
    secret.write_text("pw\n")
    environment["GENQUEUE_REDIS_PASSWORD_FILE"] = str(secret)
    worker = config.load(environment, device=device)  # as the worker reads
    assert (device, worker["COMPUTE_TYPE"], worker["MAX_BATCH_SIZE"]) == ("cuda", "int8_float16", 64)
    assert worker["CONCURRENCY"] >= worker["MAX_BATCH_SIZE"]
    assert any(v.startswith("models:/models") for v in prepare["volumes"] + gpu["volumes"])


@needs_compose
def test_without_llama2_chat_dir_the_snapshot_is_read_from_beside_the_compose_file(monkeypatch):
    monkeypatch.delenv("LLAMA2_CHAT_DIR", raising=False)
    volumes = compose_config("--profile", "gpu")["services"]["model-gpu"]["volumes"]
    assert any(v.startswith(f"{REPO / 'Llama-2-7b-chat-hf'}:") for v in volumes)
    assert "Llama-2-7b-chat-hf" in (REPO / ".dockerignore").read_text().split()  # never sent to a build


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


@needs_compose
def test_the_webhooks_profile_adds_a_webhook_worker_sharing_the_apis_secret():
    services = compose_config("--profile", "webhooks")["services"]
    assert services["webhooks"]["profiles"] == ["webhooks"]  # only with --profile webhooks
    assert services["webhooks"]["command"] == ["genqueue", "webhooks", "worker"]
    assert services["webhooks"]["environment"]["GENQUEUE_REDIS_URL"] == "redis://redis:6379/0"
    for name in ("api", "webhooks"):
        assert "GENQUEUE_WEBHOOK_SECRET" in services[name]["environment"]
