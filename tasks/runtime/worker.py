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
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from celery import Celery, signals

import config
from engine import EngineError, FinishReason, GenerationRequest, GenerationResult, UnknownLoraError
from engine.batcher import Batcher
from engine.lora import variant_dirs
from engine.model import Model
from engine.threads import ThreadChoice, Workload
from engine.threads import for_worker as threads_for_worker
from engine.tokenizer import read_tokenizer_files
from tasks.runtime.app import GENERATE_TASK, consumed_queues, task_message
from tasks.runtime.cancel import CancelWatcher
from tasks.runtime.heartbeat import Heartbeat
from tasks.runtime.offload import Offload
from tasks.runtime.recovery import Recovery
from tasks.runtime.submission import SubmissionSweeper
from tasks.runtime.writer import ChunkWriter, WriteFailedError
from tasks.store import keys
from tasks.store.jobs import JobRecord, JobStore, Progress
from tasks.store.metrics import MetricsRecorder
from tasks.store.registry import WorkerInfo, WorkerRegistry, beat_interval
from tasks.store.states import JobState
from tasks.store.tokenizers import TokenizerFiles

log = logging.getLogger(__name__)


def release_free_memory() -> None:
    """Give the memory a finished batch freed (its KV cache and activations) back to the system.

    glibc keeps freed blocks for reuse, so an idle worker would otherwise hold on to the peak of its
    largest batch. Called when the engine goes idle, never while it works."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


def choose_threads(settings: Mapping[str, Any]) -> ThreadChoice:
    """The engine threads: the settings', else the cached or measured choice (engine/threads.py)."""
    workload = Workload(
        loads=(1, settings["MAX_BATCH_SIZE"]),
        max_batch_size=settings["MAX_BATCH_SIZE"],
        max_length_spread=settings["MAX_LENGTH_SPREAD"],
    )
    return threads_for_worker(
        config.model_path(settings),
        settings["DEVICE"],
        settings["COMPUTE_TYPE"],
        workload,
        settings["STATE_DIR"],
        settings["INTRA_THREADS"],
        settings["INTER_THREADS"],
        calibrate=bool(settings["TUNE_THREADS"]),
    )


def load_models(settings: Mapping[str, Any], threads: ThreadChoice) -> dict[str | None, Model]:
    """The base model and each LoRA variant recorded with it (a whole merged model each: memory grows
    by one model per variant), keyed by variant name; None is the base."""
    engine_settings = {
        "device": settings["DEVICE"],
        "compute_type": settings["COMPUTE_TYPE"],
        "intra_threads": threads.intra_threads,
        "inter_threads": threads.inter_threads,
        "prefix_cache": settings["PREFIX_CACHE"],
    }
    model_dir = config.model_path(settings)
    base = Model(model_dir, **engine_settings)
    models: dict[str | None, Model] = {None: base}
    for name, path in variant_dirs(model_dir, base.metadata).items():
        models[name] = Model(path, lora=name, **engine_settings)
    return models


def publish_tokenizer(client: redis.Redis, model: Model) -> str | None:
    """Publish the model's tokenizer files for the API's context check at submit; their digest, or
    None if Redis refused them (the API then lets this worker check its jobs, as before)."""
    try:
        return TokenizerFiles(client).publish(read_tokenizer_files(model.model_dir))
    except (OSError, redis.RedisError) as exc:
        log.warning("could not publish the tokenizer files: %s", exc)
        return None


def prepared_at(metadata: Mapping[str, Any]) -> int:
    """When the model was prepared, as Unix time (0 if it did not record it)."""
    try:
        return int(datetime.fromisoformat(str(metadata.get("prepared_at", "")).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


@dataclass
class Outcome:
    """How a job's generation ended: a result (possibly partial), an error, or both."""

    result: GenerationResult | None = None
    error: dict[str, str] | None = None
    timed_out: bool = False
    handed_back: bool = False  # stopped because the worker stops: another worker goes on with it


MAX_HEARTBEAT_TIMEOUT_S = 15  # a lost worker's jobs must run again within seconds, not minutes

# A job thread's unexpected failure: the job fails with this (the details go to the worker's log only).
INTERNAL_ERROR = {"code": "internal_error", "message": "the worker failed while running the job; it is logged"}


class WorkerRuntime:
    """What one worker process holds: the store, the models and the components that serve them."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.queues = set(consumed_queues(config.worker_queues(settings)))
        self.store = JobStore.from_url(settings["REDIS_URL"], settings["JOB_TTL_S"])
        self.threads = choose_threads(settings)
        self.models = load_models(settings, self.threads)
        self.model = self.models[None]
        self.metrics = MetricsRecorder(self.store.redis)
        self.offload = Offload()  # the engine thread's metrics go to Redis from here, never from it
        self.batcher = Batcher(
            self.models,
            max_batch_size=settings["MAX_BATCH_SIZE"],
            gather_window_s=settings["GATHER_WINDOW_S"],
            max_length_spread=settings["MAX_LENGTH_SPREAD"],
            replicas=self.threads.inter_threads,
            on_batch=lambda size: self.offload.call(self.metrics.engine_batch, size),
            on_idle=release_free_memory,
            batch_invariant=bool(settings["BATCH_INVARIANT"]),
        )
        self.writer = ChunkWriter(self.store, retry_for_s=settings["WRITE_RETRY_S"])
        self.cancels = CancelWatcher(self.store.redis)
        self._active: set[str] = set()  # jobs this process is running now
        self._taken: set[threading.Thread] = set()  # threads of jobs taken over by the recovery sweep
        self._active_lock = threading.Lock()
        self.handing_back = threading.Event()  # set once the shutdown grace ran out: running jobs go back
        timeout_s = settings["HEARTBEAT_TIMEOUT_S"]
        if not 1 <= timeout_s <= MAX_HEARTBEAT_TIMEOUT_S:
            raise ValueError(f"HEARTBEAT_TIMEOUT_S must be 1 to {MAX_HEARTBEAT_TIMEOUT_S} seconds, not {timeout_s}")
        registry = WorkerRegistry(self.store.redis)
        running = lambda: len(self._active)  # noqa: E731
        self.heartbeat = Heartbeat(registry, self.info(), running, interval_s=beat_interval(timeout_s), ttl_s=timeout_s)
        self.sweeper = SubmissionSweeper(settings, self.store)  # finishes batch submissions a dead API left
        messages = self.sweeper.app  # its message-building app (it never connects) serves the recovery too
        message_for = lambda job_id, queue: task_message(messages, job_id, queue)  # noqa: E731
        lists = sorted(keys.broker_queue(queue) for queue in self.queues)
        self.recovery = Recovery(
            self.store, registry, self.worker_id, self.take_over, timeout_s / 5, timeout_s, lists, message_for
        )
        if settings["VISIBILITY_TIMEOUT_S"] <= settings["JOB_TIME_LIMIT_S"]:
            log.warning("VISIBILITY_TIMEOUT_S should exceed JOB_TIME_LIMIT_S: long jobs may be delivered twice")

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.worker_id,
            queues=tuple(config.worker_queues(self.settings)),
            model=self.model.name,
            device=self.model.device,
            compute_type=self.model.compute_type,
            loras=tuple(name for name in self.models if name),
            max_context=self.model.max_context,
            created=prepared_at(self.model.metadata),
            tokenizer=publish_tokenizer(self.store.redis, self.model),
            extra={"threads": self.threads.to_view()},  # shown in /readyz to callers with a key
        )

    def start(self) -> WorkerRuntime:
        for component in self._components():
            component.start()
        self.recovery.sweep()  # a restarted worker takes its predecessor's handed-back jobs at once
        return self

    def _components(self) -> tuple:
        """In start order; they stop in the reverse, each after the work it holds."""
        return (self.offload, self.writer, self.batcher, self.cancels, self.heartbeat, self.recovery, self.sweeper)

    def begin_shutdown(self) -> None:
        """SIGTERM: take nothing more over; what still runs after SHUTDOWN_GRACE_S is handed back."""
        self.recovery.stop_taking()
        timer = threading.Timer(self.settings["SHUTDOWN_GRACE_S"], self.handing_back.set)
        timer.daemon = True
        timer.start()

    def stop(self) -> None:
        """End (or hand back) the jobs taken over here, leave the registry, then stop each component
        after the work it holds."""
        self.recovery.stop_taking()
        with self._active_lock:
            threads = list(self._taken)
        deadline = time.monotonic() + self.settings["SHUTDOWN_GRACE_S"]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.handing_back.set()
        for thread in threads:
            thread.join(self.settings["WRITE_RETRY_S"])
        for component in reversed(self._components()):
            component.stop()

    def model_for(self, request: GenerationRequest) -> Model:
        """The base model, or the LoRA variant the request names."""
        model = self.models.get(request.options.lora)
        if model is None:
            known = ", ".join(sorted(name for name in self.models if name)) or "none"
            raise UnknownLoraError(f"unknown lora {request.options.lora!r}; this worker serves: {known}")
        return model

    def run_job(self, job_id: str) -> str | None:
        """Run a delivered job; returns the claim's outcome ('claimed' once it has run). A message
        for a job that has ended, or that another live worker runs ('busy'), is let go: should that
        worker die, the recovery sweep takes the job over by heartbeat."""
        with self._active_lock:
            if job_id in self._active:  # delivered again while this process runs it
                log.info("job %s: already running here", job_id)
                return None
            self._active.add(job_id)
        try:
            claim, attempt = self.store.take(job_id, self.worker_id, self.settings["MAX_ATTEMPTS"])
            if claim != "claimed":
                log.info("job %s: not run (%s)", job_id, claim or "expired")
                return claim
            self._run_claimed(job_id, attempt)
            return claim
        finally:
            with self._active_lock:
                self._active.discard(job_id)

    def take_over(self, job_id: str, holder: str) -> bool | None:
        """The recovery sweep's takeover of a lost worker's job, run on a thread of its own here.
        None when this worker has no room for it now (CONCURRENCY jobs taken over already)."""
        if self.store.queue_of(job_id) not in self.queues:
            return False  # another kind of worker's job (another model or device)
        with self._active_lock:
            if len(self._taken) >= self.settings["CONCURRENCY"]:
                return None
            if job_id in self._active:
                return False
            self._active.add(job_id)
        try:
            claim, attempt = self.store.take(job_id, self.worker_id, self.settings["MAX_ATTEMPTS"], holder=holder)
        except BaseException:
            with self._active_lock:
                self._active.discard(job_id)
            raise
        if claim != "claimed":
            with self._active_lock:
                self._active.discard(job_id)
            if claim is None:  # its record expired: drop it from the running jobs
                self.store.forget_running(job_id)
            return False
        thread = threading.Thread(target=self._run_taken, args=(job_id, attempt), name=f"genqueue-taken-{job_id}")
        with self._active_lock:
            self._taken.add(thread)
        thread.start()
        return True

    def _run_taken(self, job_id: str, attempt: int) -> None:
        try:
            self._run_claimed(job_id, attempt)
        finally:
            with self._active_lock:
                self._active.discard(job_id)
                self._taken.discard(threading.current_thread())

    def _run_claimed(self, job_id: str, attempt: int) -> None:
        """Run a job this worker holds as `attempt`, from where its log stands, to an end written (or
        handed back). Whatever goes wrong ends the job: nothing is left running without a holder."""
        self.cancels.watch(job_id)
        self.writer.hold(job_id, self.worker_id, attempt)
        created_at = time.time()
        try:
            record = self.store.get(job_id)
            if record is None:  # expired between the claim and this read
                return
            created_at = record.created_at
            if record.cancel_requested:  # cancelled before this worker listened for it
                self.cancels.watch(job_id, cancelled=True)
            progress = self.store.progress(job_id)
            log.info("job %s: running (attempt %d, from token %d)", job_id, attempt, len(progress.ids))
            if not progress.seq:
                self.metrics.job_started(record.created_at)
            seq, outcome = self._generate(job_id, record, progress)
            if outcome.handed_back and self.store.release(job_id, self.worker_id, attempt):
                log.info("job %s: handed back", job_id)
                return
            self._finish(job_id, attempt, record, seq, outcome)
        except (WriteFailedError, redis.RedisError) as exc:  # Redis unreachable for WRITE_RETRY_S
            log.warning("job %s: could not write to Redis (%s); handing it back once it answers", job_id, exc)
            self.recovery.release_later(job_id, attempt)
        except Exception:  # a bug: the job fails, safely worded
            log.exception("job %s: the job thread failed", job_id)
            self._end_anyway(job_id, attempt, created_at)
        finally:
            self.cancels.forget(job_id)
            self.writer.forget(job_id)

    def _end_anyway(self, job_id: str, attempt: int, created_at: float) -> None:
        """After an unexpected failure: fail the job with internal_error; if Redis cannot be reached,
        hand it back once it can (a takeover then ends it from its logged tokens)."""
        try:
            self.writer.flush(job_id)
            error, me = INTERNAL_ERROR, self.worker_id
            if self.store.finish(job_id, None, JobState.FAILED, error=error, holder=me, attempt=attempt):
                self.metrics.job_ended(JobState.FAILED.value, created_at, None)
        except Exception:  # noqa: BLE001 - Redis unreachable (or worse): a takeover ends it
            log.exception("job %s: could not fail it; handing it back", job_id)
            self.recovery.release_later(job_id, attempt)

    def _generate(self, job_id: str, record: JobRecord, progress: Progress) -> tuple[int, Outcome]:
        """Run the job's request through the batcher, going on from its logged tokens; (the last seq
        written, how it ended).

        on_chunk and should_stop run on the engine's thread, once per token: they touch no Redis.
        The writer sends the chunks; the cancel watcher listens for cancellations."""
        seq = progress.seq
        deadline = time.monotonic() + self.settings["JOB_TIME_LIMIT_S"]
        outcome = Outcome()
        ids: tuple[int, ...] = ()

        def on_tokens(new: Sequence[int]) -> None:
            nonlocal ids
            ids = tuple(new)

        def on_chunk(text: str) -> None:
            nonlocal seq
            seq += 1
            if seq == 1:
                self.offload.call(self.metrics.first_text, record.created_at, time.time())
            self.writer.append(job_id, seq, text, ids)

        def should_stop() -> bool:
            outcome.timed_out = outcome.timed_out or time.monotonic() >= deadline
            outcome.handed_back = outcome.handed_back or self.handing_back.is_set()
            return (
                outcome.timed_out
                or outcome.handed_back
                or self.cancels.is_cancelled(job_id)
                or self.writer.stopped(job_id)
            )

        try:
            request = GenerationRequest.from_dict(record.request)
            model = self.model_for(request)
            start: Any = model.encode(request)
            if progress.ids or progress.text:
                start = model.resume(start, progress.ids, progress.text)
            if isinstance(start, GenerationResult):  # it had generated all it would: only its end was lost
                outcome.result = start
            else:
                outcome.result = self.batcher.run(start, on_chunk, should_stop, on_tokens)
        except EngineError as exc:
            log.info("job %s: failed: %s", job_id, exc.code)
            outcome.error = {"code": exc.code, "message": str(exc)}
        except (ValueError, KeyError, TypeError) as exc:  # a stored request this version cannot read
            log.exception("job %s: unreadable request", job_id)
            outcome.error = {"code": "invalid_request", "message": str(exc)}
        except Exception:  # noqa: BLE001 - a bug: the job fails, safely worded, and the worker goes on
            log.exception("job %s: generation failed", job_id)
            outcome.error = dict(INTERNAL_ERROR)
        if outcome.handed_back and (outcome.error or self.cancels.is_cancelled(job_id)):
            outcome.handed_back = False  # it ended on its own: write that end
        self.writer.flush(job_id)  # every chunk is logged before the end event
        return seq, outcome

    def _finish(self, job_id: str, attempt: int, record: JobRecord, seq: int, outcome: Outcome) -> None:
        """Write the job's end event and count it; a job another attempt holds now is let go unwritten."""
        if self.writer.taken(job_id):
            log.info("job %s: taken over by another worker; letting it go", job_id)
            return
        result = outcome.result
        if result is not None and outcome.timed_out and not self.cancels.is_cancelled(job_id):
            limit = self.settings["JOB_TIME_LIMIT_S"]
            outcome.error = {"code": "time_limit_exceeded", "message": f"the job ran over its time limit of {limit}s"}
        if outcome.error is not None:
            status = JobState.FAILED
        elif result is not None and result.finish_reason is FinishReason.CANCELLED:
            status = JobState.CANCELLED
        else:
            status = JobState.SUCCEEDED
        usage = result.usage.to_dict() if result is not None else None
        ended = self._retrying(
            lambda: self.store.finish(
                job_id,
                seq + 1,
                status,
                result=result and result.to_dict(),
                error=outcome.error,
                holder=self.worker_id,
                attempt=attempt,
            )
        )
        if not ended:
            log.info("job %s: ended or taken over elsewhere; nothing written", job_id)
            return
        self.metrics.job_ended(status.value, record.created_at, usage)
        detail = outcome.error["code"] if outcome.error else f"{usage and usage['completion_tokens']} tokens"
        log.info("job %s: %s (%s)", job_id, status.value, detail)

    def _retrying(self, write: Callable[[], bool]) -> bool:
        """A write to Redis, tried again while Redis cannot be reached, for up to WRITE_RETRY_S."""
        deadline = time.monotonic() + self.settings["WRITE_RETRY_S"]
        delay = 0.05
        while True:
            try:
                return write()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("writing a job's end failed (%s); trying again", exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def runtime(app: Celery) -> WorkerRuntime:
    """This process's runtime, built and started on first use from the app's settings."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(app.conf.genqueue).start()
        return _runtime


def install(app: Celery) -> Celery:
    """Register the generation task on a worker's app, and load the model when the worker starts."""

    @signals.worker_init.connect(weak=False)
    def load_before_consuming(sender=None, **_kwargs) -> None:
        # threads/solo pools run tasks in this very process: load now, so the first job waits for nothing.
        pool = getattr(sender, "pool_cls", "")
        pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        if "prefork" not in pool_name:
            try:
                runtime(app)
            except Exception:  # noqa: BLE001 - Celery would log it nowhere yet and go on consuming
                traceback.print_exc()
                print("genqueue worker: could not start its engine (above); exiting", file=sys.stderr, flush=True)
                os._exit(1)  # a worker without its engine must not take jobs; a supervisor restarts it

    @signals.worker_ready.connect(weak=False)
    def log_engine(**_kwargs) -> None:
        if _runtime is not None:  # Celery sets logging up after worker_init, where the model loaded
            threads = _runtime.threads
            log.info(
                "engine: %s on %s (%s), intra_threads %d, %d replicas (%s)",
                _runtime.model.name,
                _runtime.model.device,
                _runtime.model.compute_type,
                threads.intra_threads,
                threads.inter_threads,
                threads.source,
            )

    @signals.worker_process_init.connect(weak=False)
    def load_in_child(**_kwargs) -> None:
        runtime(app)  # prefork: each child builds its own model after the fork

    @signals.worker_shutting_down.connect(weak=False)
    def hand_back_after_grace(**_kwargs) -> None:
        if _runtime is not None:
            _runtime.begin_shutdown()

    @signals.worker_shutdown.connect(weak=False)
    def stop_components(**_kwargs) -> None:
        if _runtime is not None:
            _runtime.stop()

    @app.task(name=GENERATE_TASK)
    def generate(job_id: str) -> None:
        runtime(app).run_job(job_id)  # whatever it did, the message is acknowledged

    return app
