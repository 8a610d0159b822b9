"""The worker side: the model loaded once per worker process, and the generation task.

The model is built after any fork (CTranslate2 and CUDA hang in a forked child): at worker start for
the threads and solo pools, in each child for prefork. Jobs of all the worker's threads share it
through one Batcher.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import signals

from engine import EngineError, FinishReason, GenerationRequest, Model
from genqueue import config
from tasks import keys
from tasks.app import GENERATE_TASK, celery_app
from tasks.batcher import Batcher
from tasks.metrics import MetricsRecorder
from tasks.states import JobState
from tasks.store import JobStore

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5
HEARTBEAT_TTL_S = 15


class WorkerRuntime:
    """What one worker process holds: the store, the model and the batcher that feeds it."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings
        self.store = JobStore.from_url(settings["REDIS_URL"], settings["JOB_TTL_S"])
        self.model = Model(
            config.model_path(settings),
            device=settings["DEVICE"],
            compute_type=settings["COMPUTE_TYPE"],
            intra_threads=settings["INTRA_THREADS"],
            inter_threads=settings["INTER_THREADS"],
        )
        self.metrics = MetricsRecorder(self.store.redis)
        self.batcher = Batcher(
            self.model, settings["MAX_BATCH_SIZE"], settings["GATHER_WINDOW_S"], self.metrics.engine_batch
        )
        self.running = 0  # jobs this process runs now, announced in the heartbeat
        self._running_lock = threading.Lock()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        threading.Thread(target=self._heartbeat, name="genqueue-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        """Announce this worker, its queues and model, so readiness checks can see it."""
        queues = ",".join(self.settings.get("QUEUES") or [self.settings["DEFAULT_QUEUE"]])
        fields = {
            "queues": queues,
            "model": self.model.name,
            "device": self.model.device,
            "compute_type": self.model.compute_type,
        }
        while True:
            try:
                with self.store.redis.pipeline() as pipe:
                    pipe.hset(keys.worker(self.worker_id), mapping={**fields, "running": self.running})
                    pipe.expire(keys.worker(self.worker_id), HEARTBEAT_TTL_S)
                    pipe.zadd(keys.WORKERS, {self.worker_id: time.time()})
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            time.sleep(HEARTBEAT_INTERVAL_S)

    def run_counted(self, job_id: str) -> None:
        """run_job, counted in `running` while it runs."""
        with self._running_lock:
            self.running += 1
        try:
            self.run_job(job_id)
        finally:
            with self._running_lock:
                self.running -= 1

    def run_job(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None:
            log.warning("job %s: expired before it ran", job_id)
            return
        if record.status.terminal:
            log.info("job %s: already %s, not run", job_id, record.status.value)
            return
        if not self.store.mark_running(job_id):
            return
        log.info("job %s: running", job_id)
        self.metrics.job_started(record.created_at)
        seq = 0

        def on_chunk(text: str) -> None:
            nonlocal seq
            seq += 1
            if seq == 1:
                self.metrics.first_text(record.created_at)
            self.store.append_chunk(job_id, seq, text)

        try:
            request = GenerationRequest.from_dict(record.request)
            result = self.batcher.run(self.model.encode(request), on_chunk)
        except EngineError as exc:
            log.info("job %s: failed: %s", job_id, exc.code)
            if self.store.finish(job_id, seq + 1, JobState.FAILED, error={"code": exc.code, "message": str(exc)}):
                self.metrics.job_ended(JobState.FAILED.value, record.created_at)
            return
        except (ValueError, KeyError, TypeError) as exc:  # a stored request this version cannot read
            log.exception("job %s: unreadable request", job_id)
            error = {"code": "invalid_request", "message": str(exc)}
            if self.store.finish(job_id, seq + 1, JobState.FAILED, error=error):
                self.metrics.job_ended(JobState.FAILED.value, record.created_at)
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


@celery_app.task(name=GENERATE_TASK)
def generate(job_id: str) -> None:
    runtime().run_counted(job_id)
