"""Job and engine figures kept in Redis, so /metrics shows every worker's, wherever it runs.

Counters live in one hash (a field per counter and label value), each histogram in a hash of its
own (a field per bucket, plus count and sum). Redis increments are atomic, so any number of worker
processes on any machines add into one set of figures, and the API exposes them (api/metrics.py).
They are cumulative, like Prometheus counters; they start again from zero only if Redis loses them.

Recording never fails a job: a Redis error here is logged and the figure is lost.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis

from tasks.store import keys
from tasks.store.states import JobState

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]  # upper bounds, ascending; +Inf is implied


@dataclass(frozen=True)
class Counter:
    name: str
    help: str
    label: str | None = None
    label_values: tuple[str, ...] = ()  # exposed as 0 before anything is counted


JOBS = Counter(
    "jobs", "Jobs that reached each state (queued: submitted; running: each start).", "state", tuple(JobState)
)
GENERATED_TOKENS = Counter("generated_tokens", "Completion tokens generated.")
PROMPT_TOKENS = Counter("prompt_tokens", "Prompt tokens of finished jobs.")
WEBHOOK_ATTEMPTS = Counter(
    "webhook_attempts",
    "Webhook delivery attempts, by outcome (delivered: a 2xx answer; failed: anything else, retried).",
    "outcome",
    ("delivered", "failed"),
)
WEBHOOKS_ABANDONED = Counter(
    "webhooks_abandoned",
    "Webhook events given up: every attempt failed, or their address became refused or their job expired.",
)
COUNTERS = (JOBS, GENERATED_TOKENS, PROMPT_TOKENS, WEBHOOK_ATTEMPTS, WEBHOOKS_ABANDONED)

TIME_TO_FIRST_TOKEN = Histogram(
    "time_to_first_token_seconds", "From submission to the job's first streamed text.", LATENCY_BUCKETS
)
JOB_DURATION = Histogram("job_duration_seconds", "End to end: from submission to the job's end.", LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("queue_wait_seconds", "From submission to a worker starting the job.", LATENCY_BUCKETS)
BATCH_SIZE = Histogram("engine_batch_size", "Jobs in each engine call.", (1, 2, 4, 8, 16, 32, 64, 128))
HISTOGRAMS = (TIME_TO_FIRST_TOKEN, JOB_DURATION, QUEUE_WAIT, BATCH_SIZE)


def counter_field(counter: Counter, label_value: str | None) -> str:
    return counter.name if label_value is None else f"{counter.name}:{label_value}"


def _bucket_field(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class MetricsRecorder:
    """Adds figures to Redis; one per process is enough (it holds no state but the client)."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    # -- writers -------------------------------------------------------------------------------

    def count(self, counter: Counter, amount: float = 1, label_value: str | None = None) -> None:
        self._safely(lambda pipe: pipe.hincrbyfloat(keys.METRICS_COUNTERS, counter_field(counter, label_value), amount))

    def observe(self, histogram: Histogram, value: float) -> None:
        bound = next((b for b in histogram.buckets if value <= b), math.inf)

        def write(pipe) -> None:
            key = keys.metrics_histogram(histogram.name)
            pipe.hincrby(key, _bucket_field(bound), 1)
            pipe.hincrby(key, "count", 1)
            pipe.hincrbyfloat(key, "sum", value)

        self._safely(write)

    def job_started(self, created_at: float) -> None:
        self.count(JOBS, label_value="running")
        self.observe(QUEUE_WAIT, max(0.0, time.time() - created_at))

    def first_text(self, created_at: float, at: float | None = None) -> None:
        """The job's first text came at `at` (now if None): recorded later than it came, off the engine's thread."""
        self.observe(TIME_TO_FIRST_TOKEN, max(0.0, (time.time() if at is None else at) - created_at))

    def job_ended(self, state: str, created_at: float, usage: dict | None = None) -> None:
        self.count(JOBS, label_value=state)
        self.observe(JOB_DURATION, max(0.0, time.time() - created_at))
        if usage:
            self.count(GENERATED_TOKENS, usage["completion_tokens"])
            self.count(PROMPT_TOKENS, usage["prompt_tokens"])

    def webhook_attempt(self, delivered: bool) -> None:
        self.count(WEBHOOK_ATTEMPTS, label_value="delivered" if delivered else "failed")

    def webhook_abandoned(self) -> None:
        self.count(WEBHOOKS_ABANDONED)

    def engine_batch(self, size: int) -> None:
        self.observe(BATCH_SIZE, size)

    def _safely(self, write) -> None:
        try:
            with self.redis.pipeline(transaction=True) as pipe:  # one figure's fields change together
                write(pipe)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics not recorded: %s", exc)

    # -- readers -------------------------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        """Every counter field (name, or name:label) with its value."""
        return {field: float(value) for field, value in self.redis.hgetall(keys.METRICS_COUNTERS).items()}

    def counter_values(self, counter: Counter, counters: dict[str, float] | None = None) -> dict[str | None, float]:
        """One counter's values by label value (None for an unlabelled counter), from counters() or
        the given result of it."""
        values: dict[str | None, float] = {}
        for field, value in (self.counters() if counters is None else counters).items():
            name, _, label_value = field.partition(":")
            if name == counter.name:
                values[label_value if counter.label else None] = value
        return values

    def histogram(self, histogram: Histogram) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (upper bound, count) pairs ending with +Inf, and the sum of observations."""
        raw = self.redis.hgetall(keys.metrics_histogram(histogram.name))
        cumulative, running = [], 0.0
        for bound in (*histogram.buckets, math.inf):
            running += float(raw.get(_bucket_field(bound), 0))
            cumulative.append((_bucket_field(bound), running))
        return cumulative, float(raw.get("sum", 0))
