"""Every setting, its default and its unit, in one place.

Each setting can be given as a GENQUEUE_<NAME> environment variable (values are parsed as JSON when
they parse, as Flask's from_prefixed_env does) or as a CLI flag. The API reads them through
`app.config.from_prefixed_env("GENQUEUE")`, the worker and CLI through `load()`; both see the same
names and defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

ENV_PREFIX = "GENQUEUE_"

DEFAULTS: dict[str, Any] = {
    # Redis: Celery broker, result backend and the job store, all in one server.
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    # Where prepared models live, and which one workers load (a name under MODELS_DIR, or a path).
    "MODELS_DIR": "models",
    "MODEL": "smollm2-135m-instruct",
    # How long everything a job leaves in Redis (record, chunk log) is kept, counted from its last change.
    "JOB_TTL_S": 24 * 3600,
    # Longest ?wait= a GET may block for.
    "MAX_WAIT_S": 60,
    # How long a synchronous request (the Workers AI-compatible endpoint, OpenAI-compatible calls
    # without stream) waits for its job before answering 504 (the job goes on).
    "SYNC_TIMEOUT_S": 300,
    # Seconds between SSE keep-alive comments on a stream with nothing to send.
    "SSE_KEEPALIVE_S": 15,
    # Queue a job goes to when the request names none and no GPU worker is alive (then: gpu).
    "DEFAULT_QUEUE": "cpu",
    # Worker: device (cpu or cuda), CTranslate2 compute type (None: int8 on cpu, int8_float16 on cuda),
    # threads per engine call (0: CTranslate2 picks), engine replicas.
    "DEVICE": "cpu",
    "COMPUTE_TYPE": None,
    "INTRA_THREADS": 0,
    "INTER_THREADS": 1,
    # Worker: jobs taken at once from the queue, and how many of them one engine call may batch.
    "CONCURRENCY": 16,
    "MAX_BATCH_SIZE": 16,
    # Worker: how long an idle engine waits for more jobs before it starts a batch (seconds); jobs
    # that come later join the running batch while it is young (see tasks/batcher.py).
    "GATHER_WINDOW_S": 0.0,
    # Worker: jobs whose prompts differ in length by more tokens than this run in separate batches
    # (CTranslate2 reads the extra tokens of a longer prompt one step at a time, for the whole batch);
    # also the most steps a batch lets newcomers joining it cost.
    "MAX_LENGTH_SPREAD": 32,
    # Backpressure: past this many jobs waiting in a queue, submissions get 429.
    "MAX_QUEUED_JOBS": 10000,
    # Largest request body the API reads (bytes); larger ones get 413.
    "MAX_REQUEST_BYTES": 4 * 1024 * 1024,
    # Worker: a job still generating after this long stops and fails (seconds).
    "JOB_TIME_LIMIT_S": 600,
    # A job whose worker died is run again up to this many starts in all, then fails.
    "MAX_ATTEMPTS": 3,
    # Redis broker: a delivered job not acknowledged this long (its worker died) is delivered again.
    # Must exceed JOB_TIME_LIMIT_S, or a slow job would be handed out twice.
    "VISIBILITY_TIMEOUT_S": 1800,
    # How often each worker looks for such jobs to deliver again (seconds).
    "REDELIVERY_CHECK_S": 10,
    # Batches: most requests and bytes one batch may hold (beyond them: 413), and how long a batch, its
    # results and its queued items are kept, counted from its last change.
    "BATCH_MAX_ITEMS": 50_000,
    "BATCH_MAX_BYTES": 200 * 1024 * 1024,
    "BATCH_TTL_S": 7 * 24 * 3600,
    # API server.
    "HOST": "127.0.0.1",
    "PORT": 8000,
    # API keys, as SHA-256 hashes ("name:hash" entries) in a list and/or a file; none: an open API,
    # which `genqueue api` binds to 127.0.0.1 only unless OPEN_API_ANY_HOST is true.
    "API_KEYS": None,
    "API_KEYS_FILE": None,
    "OPEN_API_ANY_HOST": False,
    # Where the client commands (genqueue submit, genqueue job) find the API.
    "API_URL": "http://127.0.0.1:8000",
    # The key they send, when the API requires keys (a key itself, not its hash).
    "API_KEY": None,
}

QUEUES = ("cpu", "gpu")
DEVICE_QUEUES = {"cpu": "cpu", "cuda": "gpu"}  # the queue a worker consumes unless told otherwise


def worker_queues(settings: Mapping[str, Any]) -> list[str]:
    """The queues a worker consumes: QUEUES if given, else its device's (cpu: cpu, cuda: gpu)."""
    return list(settings.get("QUEUES") or [DEVICE_QUEUES.get(settings["DEVICE"], settings["DEFAULT_QUEUE"])])


def parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    """DEFAULTS, then GENQUEUE_* variables, then explicit overrides (None means 'not given')."""
    environ = os.environ if environ is None else environ
    settings = dict(DEFAULTS)
    for key, raw in environ.items():
        if key.startswith(ENV_PREFIX):
            settings[key.removeprefix(ENV_PREFIX)] = parse_value(raw)
    settings.update({k.upper(): v for k, v in overrides.items() if v is not None})
    return settings


def model_path(settings: Mapping[str, Any]) -> str:
    """The model directory: MODEL as a path if it is one, else a name under MODELS_DIR."""
    model = str(settings["MODEL"])
    if os.sep in model or model.startswith("."):
        return model
    return os.path.join(str(settings["MODELS_DIR"]), model)
