"""Shared fixtures: a real Redis, real models (a tiny random Llama and the bundled SmolLM2), real
worker processes, and API clients built from the app factory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.helpers import build_lora_adapter, build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("GENQUEUE_MODELS_DIR", REPO / "models"))
REDIS_BASE_URL = os.environ.get("GENQUEUE_TEST_REDIS", "redis://127.0.0.1:6379")
# Separate Redis databases keep the test workers apart from each other and from a running genqueue.
TINY_DB, SMOL_DB, STORE_DB, E2E_DB, LORA_DB = 15, 14, 13, 12, 11
BATCH_DB = 10  # workers that tests kill or start alone (tests/api/test_batch_recovery.py)
FAULT_DB, IDLE_DB, TINY32_DB = 9, 8, 7  # tests/tasks/test_faults.py, tests/api/test_limits.py, float32 tiny worker
WORKER_START_TIMEOUT_S = 120


def redis_url(db: int) -> str:
    return f"{REDIS_BASE_URL}/{db}"


@pytest.fixture(scope="session", autouse=True)
def clean_redis():
    for db in (TINY_DB, SMOL_DB, STORE_DB, E2E_DB, LORA_DB, BATCH_DB, FAULT_DB, IDLE_DB, TINY32_DB):
        try:
            redis.Redis.from_url(redis_url(db)).flushdb()
        except redis.ConnectionError as exc:
            pytest.exit(f"tests need a Redis server at {REDIS_BASE_URL} (.ci/run starts one): {exc}", 2)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, prepared once and reused by later runs (prepare is idempotent)."""
    from engine.prepare import prepare_model

    return prepare_model(None, MODELS_DIR, progress=lambda line: print(line, file=sys.stderr))


@pytest.fixture(scope="session")
def tiny_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer, converted to int8."""
    from engine.prepare import prepare_model

    work = tmp_path_factory.mktemp("tiny")
    hf_dir = build_tiny_llama(work / "hf", smollm2_dir)
    return prepare_model(hf_dir, work / "models", name="tiny", progress=lambda line: None)


@dataclass(frozen=True)
class LoraModels:
    hf_dir: Path  # the base model, transformers
    adapter_dir: Path  # a PEFT LoRA adapter for it
    base_dir: Path  # the base, prepared (float32, so outputs compare exactly with transformers)
    variant_dir: Path  # the adapter merged in, prepared as the base's variant LORA_NAME


LORA_NAME = "demo"


@pytest.fixture(scope="session")
def lora_models(smollm2_dir, tmp_path_factory) -> LoraModels:
    """A tiny Llama with spread-out logits, a random LoRA adapter, and both prepared as a base and its variant."""
    from engine.prepare import prepare_lora, prepare_model

    work = tmp_path_factory.mktemp("lora")
    hf_dir = build_tiny_llama(work / "hf", smollm2_dir, seed=3, initializer_range=0.3)
    adapter_dir = build_lora_adapter(work / "adapter", hf_dir)
    base_dir = prepare_model(hf_dir, work / "models", name="base", quantization="float32", progress=lambda _: None)
    variant_dir = prepare_lora(base_dir, adapter_dir, LORA_NAME, progress=lambda _: None)
    return LoraModels(hf_dir, adapter_dir, base_dir, variant_dir)


class WorkerProcess:
    def __init__(self, model_dir: Path, db: int, queue: str = "cpu", redis_base: str | None = None, **settings):
        self.url = f"{redis_base or REDIS_BASE_URL}/{db}"
        self.queue = queue
        env = {
            **os.environ,
            "GENQUEUE_REDIS_URL": self.url,
            "GENQUEUE_MODEL": str(model_dir),
            "GENQUEUE_DEFAULT_QUEUE": queue,
            **{f"GENQUEUE_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"worker-{db}-{queue}-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "genqueue.cli", "worker", "--queue", queue, "--loglevel", "INFO"],
            env=env,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.output()}")
            if any(f":{self.process.pid}".encode() in key for key in client.keys("genqueue:worker:*")):
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {WORKER_START_TIMEOUT_S}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def tiny_worker(tiny_dir):
    worker = WorkerProcess(tiny_dir, TINY_DB, concurrency=4, max_batch_size=4)
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def tiny32_worker(tiny_dir):
    """A worker on the tiny model in float32: a job's greedy output does not depend on its batch."""
    worker = WorkerProcess(tiny_dir, TINY32_DB, compute_type="float32", concurrency=8, max_batch_size=8)
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def smol_worker(smollm2_dir):
    worker = WorkerProcess(smollm2_dir, SMOL_DB)
    yield worker
    worker.stop()


def make_client(db: int, **config):
    from api import create_app

    app = create_app({"TESTING": True, "REDIS_URL": redis_url(db), **config})
    return app.test_client()


@pytest.fixture(scope="session")
def lora_worker(lora_models):
    """A worker on the float32 base model of lora_models, which loads its variant next to it."""
    worker = WorkerProcess(lora_models.base_dir, LORA_DB, compute_type="float32", concurrency=4, max_batch_size=4)
    yield worker
    worker.stop()


@pytest.fixture
def lora_client(lora_worker):
    return make_client(LORA_DB)


@pytest.fixture
def client(tiny_worker):
    """An API client whose jobs run on the tiny model's worker."""
    return make_client(TINY_DB)


@pytest.fixture
def smol_client(smol_worker):
    """An API client whose jobs run on the SmolLM2 worker."""
    return make_client(SMOL_DB)


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("redis-server is not installed")
    return path


def serve(db: int, **config):
    """The real app on a free loopback port (werkzeug, threaded), against database db."""
    from api import create_app
    from tests.live import LiveServer

    return LiveServer(create_app({"REDIS_URL": redis_url(db), **config}))


@pytest.fixture(scope="module")
def tiny_api(tiny_worker):
    server = serve(TINY_DB)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smol_api(smol_worker):
    server = serve(SMOL_DB)
    yield server
    server.stop()
