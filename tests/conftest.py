"""Shared fixtures: a real Redis, real models (a tiny random Llama and the bundled SmolLM2), real
worker processes, and API clients built from the app factory."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from genqueue import launcher
from tests.helpers import build_lora_adapter, build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("GENQUEUE_MODELS_DIR", REPO / "models"))
# The run's own Redis server on a free port (pytest_configure starts it: a redis-server on PATH, else
# the embedded Valkey; GENQUEUE_REDIS_SERVER chooses), so two runs on one machine, or a genqueue
# running beside the tests, never share data. GENQUEUE_TEST_REDIS names another one.
REDIS_BASE_URL = os.environ.get("GENQUEUE_TEST_REDIS", "")
_own_redis = None
# Separate Redis databases keep the test workers apart from each other.
TINY_DB, SMOL_DB, STORE_DB, E2E_DB, LORA_DB = 15, 14, 13, 12, 11
BATCH_DB = 10  # workers that tests kill or start alone (tests/api/test_batch_recovery.py)
FAULT_DB, IDLE_DB, TINY32_DB = 9, 8, 7  # tests/tasks/test_faults.py, tests/api/test_limits.py, float32 tiny worker
ROUTING_DB = 6  # tests/api/test_routing.py: a cpu and a gpu worker of its own
WEBHOOK_DB = 5  # tests/api/test_webhooks.py: webhook workers the tests kill, and no model worker
HELD_DB, LIMIT_DB = 4, 3  # one-slot worker (tests/api/test_cancel.py), short time limit (tests/api/test_limits.py)
LLAMA2_DB = 2  # tests/api/test_llama2.py: a worker on the Llama-2-chat-format model
EDGE_DB = 1  # tests/api/test_edge.py: jobs stay queued until a test starts a worker
# tests/tasks/test_submission.py, tests/api/test_quotas.py, tests/tasks/test_job_exits.py (a worker runtime
# inside the test process, stopped by each test) and tests/api/test_threads.py (a worker that measures its
# engine threads at start, stopped by its test): one at a time, each test flushing it first
SUBMIT_DB = 0

# Workers the tests start keep CTranslate2's default threads and one replica, as the tests were written
# for (a measured choice could give a worker two replicas); tests/engine/test_threads.py turns it on.
os.environ.setdefault("GENQUEUE_TUNE_THREADS", "false")


def pytest_configure(config) -> None:
    global REDIS_BASE_URL, _own_redis
    if REDIS_BASE_URL or hasattr(config, "workerinput"):
        return
    from genqueue.launcher import RedisServer

    _own_redis = RedisServer()
    REDIS_BASE_URL = _own_redis.url().rsplit("/", 1)[0]
    os.environ["GENQUEUE_TEST_REDIS"] = REDIS_BASE_URL  # for processes the tests start


def pytest_unconfigure(config) -> None:
    if _own_redis is not None:
        _own_redis.stop()


def redis_url(db: int) -> str:
    return f"{REDIS_BASE_URL}/{db}"


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


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory) -> Path:
    """The tiny Llama-2-chat-format model of tests/llama2.py (SentencePiece-style tokenizer, Llama-2's
    chat template, weights shaped to reply REPLY and stop at </s>), converted to int8."""
    from engine.prepare import prepare_model
    from tests.llama2 import build_llama2_chat

    work = tmp_path_factory.mktemp("llama2")
    hf_dir = build_llama2_chat(work / "hf")
    return prepare_model(hf_dir, work / "models", name="llama2-chat", progress=lambda line: None)


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


class WorkerProcess(launcher.WorkerProcess):
    """A real worker process on model_dir, consuming `queue` of database db, ready once it beats."""

    def __init__(self, model_dir: Path, db: int, queue: str = "cpu", redis_base: str | None = None, **settings):
        self.url = f"{redis_base or REDIS_BASE_URL}/{db}"
        self.queue = queue
        settings = {"redis_url": self.url, "model": model_dir, "default_queue": queue, **settings}
        super().__init__(settings, queues=(queue,), cwd=REPO)


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


@pytest.fixture(scope="session")
def llama2_worker(llama2_dir):
    worker = WorkerProcess(llama2_dir, LLAMA2_DB, concurrency=4, max_batch_size=4)
    yield worker
    worker.stop()


# Most API tests queue jobs on databases no worker serves (or on a queue none serves) and read them
# while queued: their apps keep the no-worker refusal off. tests/api/test_quotas.py tests it, with it on.
NO_WORKER_CHECK_OFF = {"NO_WORKER_GRACE_S": 0}


def make_client(db: int, **config):
    from api import create_app

    app = create_app({"TESTING": True, "REDIS_URL": redis_url(db), **NO_WORKER_CHECK_OFF, **config})
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
    """For tests that stop and restart a Redis of their own: skipped where none can be started
    (a run against GENQUEUE_TEST_REDIS alone)."""
    path = launcher.redis_server_binary()
    if path is None:
        pytest.skip("no redis-server binary to start, stop and restart (the other tests use GENQUEUE_TEST_REDIS)")
    return path


def serve(db: int, **config):
    """The real app on a free loopback port (werkzeug, threaded), against database db."""
    from api import create_app
    from tests.live import LiveServer

    return LiveServer(create_app({"REDIS_URL": redis_url(db), **NO_WORKER_CHECK_OFF, **config}))


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
