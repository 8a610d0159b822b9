"""The worker side: the model loaded once per worker process, and the generation task.

The model is built after any fork (CTranslate2 and CUDA hang in a forked child): at worker start for
the threads and solo pools, in each child for prefork. Jobs of all the worker's threads share it
through one Batcher. The LoRA variants recorded in the model's genqueue.json load next to it.
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

from engine import EngineError, FinishReason, GenerationRequest, Model, UnknownLoraError
from engine.lora import variant_dirs
from genqueue import config
from tasks import keys
from tasks.app import GENERATE_TASK, celery_app
from tasks.batcher import Batcher
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
        self.batcher = Batcher(self.models, settings["MAX_BATCH_SIZE"], settings["GATHER_WINDOW_S"])
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
            "loras": ",".join(name for name in self.models if name),
        }
        while True:
            try:
                now = time.time()
                with self.store.redis.pipeline() as pipe:
                    pipe.hset(keys.worker(self.worker_id), mapping=fields)
                    pipe.expire(keys.worker(self.worker_id), HEARTBEAT_TTL_S)
                    pipe.zadd(keys.WORKERS, {self.worker_id: now + HEARTBEAT_TTL_S})
                    pipe.zremrangebyscore(keys.WORKERS, "-inf", now)  # workers that stopped beating
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
        seq = 0

        def on_chunk(text: str) -> None:
            nonlocal seq
            seq += 1
            self.store.append_chunk(job_id, seq, text)

        try:
            request = GenerationRequest.from_dict(record.request)
            result = self.batcher.run(self.model_for(request).encode(request), on_chunk)
        except EngineError as exc:
            log.info("job %s: failed: %s", job_id, exc.code)
            self.store.finish(job_id, seq + 1, JobState.FAILED, error={"code": exc.code, "message": str(exc)})
            return
        except (ValueError, KeyError, TypeError) as exc:  # a stored request this version cannot read
            log.exception("job %s: unreadable request", job_id)
            self.store.finish(job_id, seq + 1, JobState.FAILED, error={"code": "invalid_request", "message": str(exc)})
            return
        status = JobState.CANCELLED if result.finish_reason is FinishReason.CANCELLED else JobState.SUCCEEDED
        self.store.finish(job_id, seq + 1, status, result=result.to_dict())
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
    runtime().run_job(job_id)
