"""GET /metrics: Prometheus text format, with every worker's figures, read from Redis at each scrape.

Workers record into Redis (tasks/metrics.py) because they may run on other machines; a custom
collector turns those hashes, the broker's queue lengths and the workers' heartbeats into metrics.
A second one adds the waiting clients of the API process that answers the scrape.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from api.auth import bearer_token, public, refuse, require_key
from api.openapi import document
from api.schemas import ErrorSchema
from api.waiting import STREAMS, WAITS, HeldClients
from config import QUEUES
from tasks.store.followers import Fanout
from tasks.store.jobs import JobStore
from tasks.store.metrics import COUNTERS, HISTOGRAMS, MetricsRecorder
from tasks.store.registry import WorkerRegistry
from tasks.store.webhooks import WebhookOutbox

bp = Blueprint("metrics", __name__)

PREFIX = "genqueue_"


class RedisCollector(Collector):
    """Reads, at each scrape, the figures every process recorded in Redis."""

    def __init__(self, store: JobStore, registry: WorkerRegistry):
        self.store = store
        self.registry = registry
        self.recorder = MetricsRecorder(store.redis)
        self.outbox = WebhookOutbox(store.redis)

    def collect(self):
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Jobs waiting in each queue for a worker.", labels=["queue"])
        for queue in QUEUES:
            depth.add_metric([queue], self.store.queue_depth(queue))
        yield depth

        live = self.registry.live()
        workers = GaugeMetricFamily(PREFIX + "workers", "Live workers with a loaded model, by queue.", labels=["queue"])
        running = GaugeMetricFamily(
            PREFIX + "jobs_running", "Jobs live workers are running, by queue.", labels=["queue"]
        )
        for queue in QUEUES:
            serving = [w for w in live if w.serves(queue)]
            workers.add_metric([queue], len(serving))
            running.add_metric([queue], sum(w.running for w in serving))
        yield workers
        yield running

        pending = GaugeMetricFamily(
            PREFIX + "webhooks_pending", "Webhook events waiting for delivery (due, being attempted, or to be retried)."
        )
        pending.add_metric([], self.outbox.pending())
        yield pending

        values = self.recorder.counters()
        for counter in COUNTERS:
            labels = [counter.label] if counter.label else []
            family = CounterMetricFamily(PREFIX + counter.name, counter.help, labels=labels)
            recorded = self.recorder.counter_values(counter, values)
            zeros = dict.fromkeys(counter.label_values if counter.label else [None], 0.0)  # a series from the start
            for label_value, value in sorted({**zeros, **recorded}.items(), key=str):
                family.add_metric([label_value] if counter.label else [], value)
            yield family

        for histogram in HISTOGRAMS:
            buckets, total = self.recorder.histogram(histogram)
            family = HistogramMetricFamily(PREFIX + histogram.name, histogram.help)
            family.add_metric([], buckets, total)
            yield family


class EdgeCollector(Collector):
    """This API process's waiting clients: each process of a server answers for itself."""

    def __init__(self, fanout: Fanout, held: HeldClients):
        self.fanout = fanout
        self.held = held

    def collect(self):
        followers = GaugeMetricFamily(
            PREFIX + "api_followers", "Followers of job events (streams and waits) in this API process."
        )
        followers.add_metric([], self.fanout.count())
        yield followers
        held = GaugeMetricFamily(
            PREFIX + "api_clients_waiting", "Streams and waits held in this API process, by kind.", labels=["kind"]
        )
        for kind in (STREAMS, WAITS):
            held.add_metric([kind], self.held.total(kind))
        yield held


def check_scraper() -> None:
    """The metrics token when one is configured (compared in constant time), else the API's keys."""
    expected = current_app.config.get("METRICS_TOKEN")
    if not expected:
        require_key()
        return
    token = bearer_token()
    if token is None or not hmac.compare_digest(token.encode(), str(expected).encode()):
        refuse(token, "metrics token")


def init_app(app) -> None:
    registry = CollectorRegistry(auto_describe=False)
    jobs = app.extensions["genqueue.jobs"]
    registry.register(RedisCollector(jobs.store, jobs.registry))
    registry.register(EdgeCollector(jobs.followers.fanout, app.extensions["genqueue.held"]))
    app.extensions["genqueue.metrics_registry"] = registry
    app.register_blueprint(bp)


@bp.get("/metrics")
@public
@document(
    "Prometheus metrics of the whole deployment (every worker's figures, read from Redis)",
    description=(
        "With GENQUEUE_METRICS_TOKEN set, the scraper sends it as a bearer token (API keys are not "
        "accepted); without it, an API key when keys are on. No figure is per tenant."
    ),
    tags=["Operations"],
    responses={
        200: ("Prometheus text exposition format", None, "text/plain"),
        401: ("No token or key", ErrorSchema),
        403: ("A wrong token or key", ErrorSchema),
    },
)
def metrics():
    check_scraper()
    registry = current_app.extensions["genqueue.metrics_registry"]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
