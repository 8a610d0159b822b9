"""GET /metrics: Prometheus text format, with every worker's figures, read from Redis at each scrape.

Workers record into Redis (tasks/metrics.py) because they may run on other machines; a custom
collector turns those hashes, the broker's queue lengths and the workers' heartbeats into metrics.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from api.health import live_workers
from api.openapi import document
from genqueue import config
from tasks.metrics import COUNTERS, HISTOGRAMS, MetricsRecorder
from tasks.store import JobStore

bp = Blueprint("metrics", __name__)

PREFIX = "genqueue_"


class RedisCollector(Collector):
    """Reads, at each scrape, the figures every process recorded in Redis."""

    def __init__(self, store: JobStore):
        self.store = store
        self.redis = store.redis
        self.recorder = MetricsRecorder(store.redis)

    def collect(self):
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Jobs waiting in each queue for a worker.", labels=["queue"])
        for queue in config.QUEUES:
            depth.add_metric([queue], self.store.queue_depth(queue))
        yield depth

        heartbeats = live_workers(self.redis)
        workers = GaugeMetricFamily(PREFIX + "workers", "Live workers with a loaded model, by queue.", labels=["queue"])
        running = GaugeMetricFamily(
            PREFIX + "jobs_running", "Jobs live workers are running, by queue.", labels=["queue"]
        )
        for queue in config.QUEUES:
            serving = [w for w in heartbeats if queue in w.get("queues", "").split(",")]
            workers.add_metric([queue], len(serving))
            running.add_metric([queue], sum(int(w.get("running", 0)) for w in serving))
        yield workers
        yield running

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


def init_app(app) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(app.extensions["genqueue.store"]))
    app.extensions["genqueue.metrics_registry"] = registry
    app.register_blueprint(bp)


@bp.get("/metrics")
@document(
    "Prometheus metrics of the whole deployment (every worker's figures, read from Redis)",
    tags=["Operations"],
    responses={200: ("Prometheus text exposition format", None, "text/plain")},
)
def metrics():
    registry = current_app.extensions["genqueue.metrics_registry"]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
