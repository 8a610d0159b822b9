"""The worker side: the model loaded once per worker process, and the generation task.

The model is built after any fork (CTranslate2 and CUDA hang in a forked child): at worker start for
the threads and solo pools, in each child for prefork. Jobs of all the worker's threads share it
through one Batcher. The LoRA variants recorded in the model's genqueue.json load next to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import signals

from engine import EngineError, FinishReason, GenerationRequest, Model, UnknownLoraError
from engine.lora import variant_dirs
from genqueue import config
from tasks import keys
from tasks.app import GENERATE_TASK, celery_app
from tasks.batcher import Batcher
from tasks.cancel import CancelWatcher
from tasks.metrics import MetricsRecorder
from tasks.states import JobState
from tasks.store import JobRecord, JobStore
from tasks.writer import ChunkWriter

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5
HEARTBEAT_TTL_S = 15


def release_free_memory() -> None:
    """Give the memory a finished batch freed (its KV cache and activations) back to the system.

    glibc keeps freed blocks for reuse, so an idle worker would otherwise hold on to the peak of its
    largest batch. Called when the engine goes idle, never while it works."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


class WorkerRuntime:
    """What one worker process holds: the store, the model and the batcher that feeds it."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings
        self.store = JobStore.from_url(settings["REDIS_URL"], settings["JOB_TTL_S"])
        engine_settings = {
            "device": settings["DEVICE"],
            "compute_type": settings["COMPUTE_TYPE"],
            "intra_threads": settings["INTRA_THREADS"],
            "inter_threads": settings["INTER_THREADS"],
        }
        model_dir = config.model_path(settings)
        self.model = Model(model_dir, **engine_settings)
        # Each LoRA variant is a whole merged model: memory grows by one model per variant.
        self.models: dict[str | None, Model] = {None: self.model}
        for name, path in variant_dirs(model_dir, self.model.metadata).items():
            self.models[name] = Model(path, lora=name, **engine_settings)
        self.metrics = MetricsRecorder(self.store.redis)
        self.batcher = Batcher(
            self.models,
            max_batch_size=settings["MAX_BATCH_SIZE"],
            gather_window_s=settings["GATHER_WINDOW_S"],
            max_length_spread=settings["MAX_LENGTH_SPREAD"],
            replicas=settings["INTER_THREADS"],
            on_batch=self.metrics.engine_batch,
            on_idle=release_free_memory,
        )
        self.writer = ChunkWriter(self.store)
        self.cancels = CancelWatcher(self.store.redis)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._active: set[str] = set()  # jobs this process is running now
        self._active_lock = threading.Lock()
        if settings["VISIBILITY_TIMEOUT_S"] <= settings["JOB_TIME_LIMIT_S"]:
            log.warning("VISIBILITY_TIMEOUT_S should exceed JOB_TIME_LIMIT_S: long jobs may be delivered twice")
        threading.Thread(target=self._heartbeat, name="genqueue-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        """Announce this worker, its queues and model, so readiness checks can see it."""
        queues = config.worker_queues(self.settings)
        fields = {
            "queues": ",".join(queues),
            "model": self.model.name,
            "device": self.model.device,
            "compute_type": self.model.compute_type,
            "loras": ",".join(name for name in self.models if name),
        }
        while True:
            try:
                now = time.time()
                with self.store.redis.pipeline() as pipe:
                    pipe.hset(keys.worker(self.worker_id), mapping={**fields, "running": len(self._active)})
                    pipe.expire(keys.worker(self.worker_id), HEARTBEAT_TTL_S)
                    pipe.zadd(keys.WORKERS, {self.worker_id: now + HEARTBEAT_TTL_S})
                    pipe.zremrangebyscore(keys.WORKERS, "-inf", now)  # workers that stopped beating
                    for queue in queues:  # the API routes jobs to the GPU queue while this key lives
                        pipe.set(keys.queue_served(queue), self.worker_id, ex=HEARTBEAT_TTL_S)
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            time.sleep(HEARTBEAT_INTERVAL_S)

    def model_for(self, request: GenerationRequest) -> Model:
        """The base model, or the LoRA variant the request names."""
        model = self.models.get(request.options.lora)
        if model is None:
            known = ", ".join(sorted(name for name in self.models if name)) or "none"
            raise UnknownLoraError(f"unknown lora {request.options.lora!r}; this worker serves: {known}")
        return model

    def run_job(self, job_id: str) -> str | None:
        """Run a delivered job. Returns 'busy' when another live worker holds it (look again later),
        else the claim's outcome ('claimed' once it has run)."""
        with self._active_lock:
            if job_id in self._active:  # delivered again while this process runs it
                log.info("job %s: already running here", job_id)
                return None
            self._active.add(job_id)
        try:
            claim = self.store.claim(job_id, self.worker_id, self.settings["MAX_ATTEMPTS"])
            if claim != "claimed":
                log.info("job %s: not run (%s)", job_id, claim or "expired")
                return claim
            self.cancels.watch(job_id)
            try:
                record = self.store.get(job_id)
                if record.cancel_requested:  # cancelled before this worker listened for it
                    self.cancels.watch(job_id, cancelled=True)
                log.info("job %s: running (attempt %d)", job_id, record.attempts)
                self.metrics.job_started(record.created_at)
                self._generate(job_id, record)
            finally:
                self.cancels.forget(job_id)
                self.writer.forget(job_id)
            return claim
        finally:
            with self._active_lock:
                self._active.discard(job_id)

    def _generate(self, job_id: str, record: JobRecord) -> None:
        # on_chunk and should_stop run on the engine's thread, once per token: they touch no Redis.
        # The writer sends the chunks; the cancel watcher listens for cancellations.
        seq = 0
        deadline = time.monotonic() + self.settings["JOB_TIME_LIMIT_S"]
        timed_out = False

        def on_chunk(text: str) -> None:
            nonlocal seq
            seq += 1
            if seq == 1:
                self.metrics.first_text(record.created_at)
            self.writer.append(job_id, seq, text)

        def should_stop() -> bool:
            nonlocal timed_out
            timed_out = timed_out or time.monotonic() >= deadline
            return timed_out or self.cancels.is_cancelled(job_id) or self.writer.stopped(job_id)

        error = None
        try:
            request = GenerationRequest.from_dict(record.request)
            result = self.batcher.run(self.model_for(request).encode(request), on_chunk, should_stop)
        except EngineError as exc:
            log.info("job %s: failed: %s", job_id, exc.code)
            result, error = None, {"code": exc.code, "message": str(exc)}
        except (ValueError, KeyError, TypeError) as exc:  # a stored request this version cannot read
            log.exception("job %s: unreadable request", job_id)
            result, error = None, {"code": "invalid_request", "message": str(exc)}
        self.writer.flush(job_id)  # every chunk is logged before the end event
        if error is not None:
            if self.store.finish(job_id, seq + 1, JobState.FAILED, error=error):
                self.metrics.job_ended(JobState.FAILED.value, record.created_at)
            return
        if timed_out and not self.cancels.is_cancelled(job_id):
            limit = self.settings["JOB_TIME_LIMIT_S"]
            error = {"code": "time_limit_exceeded", "message": f"the job ran over its time limit of {limit}s"}
            if self.store.finish(job_id, seq + 1, JobState.FAILED, result=result.to_dict(), error=error):
                self.metrics.job_ended(JobState.FAILED.value, record.created_at, result.usage.to_dict())
            log.info("job %s: failed: time limit", job_id)
            return
        status = JobState.CANCELLED if result.finish_reason is FinishReason.CANCELLED else JobState.SUCCEEDED
        if self.store.finish(job_id, seq + 1, status, result=result.to_dict()):
            self.metrics.job_ended(status.value, record.created_at, result.usage.to_dict())
        log.info("job %s: %s (%d tokens)", job_id, status.value, result.usage.completion_tokens)


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(celery_app.conf.genqueue)
        return _runtime


@signals.worker_init.connect
def _load_before_consuming(sender=None, **_kwargs) -> None:
    # threads/solo pools run tasks in this very process: load now, so the first job waits for nothing.
    pool = getattr(sender, "pool_cls", "")
    pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" not in pool_name:
        runtime()


@signals.worker_process_init.connect
def _load_in_child(**_kwargs) -> None:
    runtime()  # prefork: each child builds its own model after the fork


@celery_app.task(name=GENERATE_TASK, bind=True, max_retries=None)
def generate(self, job_id: str) -> None:
    if runtime().run_job(job_id) == "busy":
        # Another worker holds the job and its heartbeat is fresh. Look again once that heartbeat
        # would have expired: by then the job has ended, or its worker is gone and we take it over.
        raise self.retry(countdown=HEARTBEAT_TTL_S)
