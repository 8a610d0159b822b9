"""The webhook worker: delivers the outbox's events (tasks/store/webhooks.py) with a Celery task.

`genqueue webhooks worker` runs it, a Celery worker of its own that consumes the `webhooks` queue
alone and loads no model: a slow or dead receiver holds one of its threads, never a model worker's
job slot or its engine. In it, a sweeper thread hands each due event to the task `genqueue.webhook`
(at most two per delivery thread waiting in the queue, so a backlog stays in the outbox), and the
task makes one attempt: a 2xx answer delivers the event; anything else, a timeout or no connection
schedules the next attempt, RETRY_FACTOR times later than the last, until WEBHOOK_MAX_ATTEMPTS.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery, signals

from tasks.runtime.app import WEBHOOK_TASK, WEBHOOKS_QUEUE
from tasks.runtime.delivery import HostUnresolved, WebhookRefused, check_url, post, secret_key
from tasks.store import keys
from tasks.store.batches import BatchStore
from tasks.store.jobs import JobStore
from tasks.store.metrics import MetricsRecorder
from tasks.store.views import batch_view, iso, job_view
from tasks.store.webhooks import WebhookEvent, WebhookOutbox

log = logging.getLogger(__name__)

RETRY_FACTOR = 4  # each wait between attempts is this many times the one before
SWEEP_INTERVAL_S = 0.25  # how often the sweeper looks for due events
QUEUED_PER_THREAD = 2  # events the sweeper lets wait in the Celery queue per delivery thread


def retry_delay_s(settings: Mapping[str, Any], attempts: int) -> float:
    """The wait after the attempts-th failed attempt: WEBHOOK_RETRY_BASE_S, then RETRY_FACTOR times more each time."""
    return float(settings["WEBHOOK_RETRY_BASE_S"]) * RETRY_FACTOR ** (attempts - 1)


def lease_s(settings: Mapping[str, Any]) -> float:
    """How long a handed-out event stays with its task: its wait in the queue and its attempt, with room."""
    return (QUEUED_PER_THREAD + 1) * float(settings["WEBHOOK_TIMEOUT_S"]) + 5


class WebhookRuntime:
    """What one webhook worker process holds: the stores, the outbox, the signing key and the sweeper."""

    def __init__(self, app: Celery, settings: Mapping[str, Any]):
        self.app = app
        self.settings = settings
        self.key = secret_key(settings["WEBHOOK_SECRET"])  # a worker without a valid secret does not start
        self.jobs = JobStore.from_url(settings["REDIS_URL"], settings["JOB_TTL_S"])
        self.batches = BatchStore(self.jobs, settings["BATCH_TTL_S"])
        self.outbox = WebhookOutbox(self.jobs.redis)
        self.metrics = MetricsRecorder(self.jobs.redis)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="genqueue-webhook-sweeper", daemon=True)

    def start(self) -> WebhookRuntime:
        self._sweeper.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sweeper.join(5)

    # -- the sweeper ----------------------------------------------------------------------------------

    def _sweep(self) -> None:
        room = QUEUED_PER_THREAD * int(self.settings["WEBHOOK_CONCURRENCY"])
        while not self._stop.wait(SWEEP_INTERVAL_S):
            try:
                waiting = int(self.jobs.redis.llen(keys.broker_queue(WEBHOOKS_QUEUE)))
                for message_id, dispatch in self.outbox.claim(room - waiting, lease_s(self.settings)):
                    self.app.send_task(
                        WEBHOOK_TASK, args=[message_id, dispatch], queue=WEBHOOKS_QUEUE, ignore_result=True
                    )
            except Exception as exc:  # noqa: BLE001 - Redis away or the like: the events wait, due, for the next sweep
                log.warning("webhook sweep failed: %s", exc)
                self._stop.wait(1)

    # -- one attempt ----------------------------------------------------------------------------------

    def deliver(self, message_id: str, dispatch: int) -> str:
        """One attempt at an event, if it is still this dispatch's: what became of it (for the log)."""
        event = self.outbox.get(message_id)
        if event is None or event.dispatch != dispatch:
            return "superseded"  # delivered already, or handed out again since
        body = event.body or self._body(event)
        if body is None:
            return self._give_up(event, f"its {event.kind} {event.subject} has expired")
        status: int | str
        try:
            target = check_url(event.url, self.settings)
        except HostUnresolved as exc:  # it may resolve later: a failed attempt
            status = str(exc)
        except WebhookRefused as exc:
            return self._give_up(event, str(exc))
        else:
            try:
                status = post(target, self.key, event.id, int(time.time()), body, self.settings["WEBHOOK_TIMEOUT_S"])
            except OSError as exc:
                status = f"{type(exc).__name__}: {exc}"
        delivered = isinstance(status, int) and 200 <= status < 300
        self.metrics.webhook_attempt(delivered)
        if delivered:
            self.outbox.delivered(event.id)
            log.info("webhook %s (%s): delivered (%s)", event.id, event.type, status)
            return "delivered"
        attempts = event.attempts + 1
        left = self.outbox.failed(
            event, int(self.settings["WEBHOOK_MAX_ATTEMPTS"]), retry_delay_s(self.settings, attempts)
        )
        if left < 0:
            self.metrics.webhook_abandoned()
            log.warning("webhook %s (%s): attempt %d failed (%s); given up", event.id, event.type, attempts, status)
            return "abandoned"
        log.info("webhook %s (%s): attempt %d failed (%s); retried", event.id, event.type, attempts, status)
        return "failed"

    def _body(self, event: WebhookEvent) -> bytes | None:
        """The event's body, built from its job or batch as GET shows it now, and kept for every retry."""
        if event.kind == "batch":
            batch = self.batches.get(event.subject)
            data = batch_view(batch) if batch is not None else None
        else:
            job = self.jobs.get(event.subject)
            data = job_view(job) if job is not None else None
        if data is None:
            return None
        body = json.dumps({"type": event.type, "timestamp": iso(event.timestamp), "data": data}, ensure_ascii=False)
        return self.outbox.set_body(event.id, body.encode())

    def _give_up(self, event: WebhookEvent, why: str) -> str:
        self.outbox.give_up(event.id)
        self.metrics.webhook_abandoned()
        log.warning("webhook %s (%s): given up: %s", event.id, event.type, why)
        return "abandoned"


_runtime: WebhookRuntime | None = None
_runtime_lock = threading.Lock()


def runtime(app: Celery) -> WebhookRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WebhookRuntime(app, app.conf.genqueue).start()
        return _runtime


def install(app: Celery) -> Celery:
    """Register the webhook task on a webhook worker's app, and run the sweeper while it runs."""

    @signals.worker_init.connect(weak=False)
    def start_sweeping(**_kwargs) -> None:
        runtime(app)

    @signals.worker_shutdown.connect(weak=False)
    def stop_sweeping(**_kwargs) -> None:
        if _runtime is not None:
            _runtime.stop()

    @app.task(name=WEBHOOK_TASK)
    def deliver(message_id: str, dispatch: int) -> None:
        try:
            runtime(app).deliver(message_id, dispatch)
        except redis.RedisError as exc:  # the event stays leased and comes back when the lease runs out
            log.warning("webhook %s: not attempted, Redis unavailable: %s", message_id, exc)

    return app
