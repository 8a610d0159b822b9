"""Every Redis key and channel genqueue uses, and nothing else names one.

Per job:
- job(id): a hash with the job's state, timestamps, request, result and error;
- job_log(id): a stream of its events (chunks, then one end event), entry ids "<seq>-0", replayable;
- job_channel(id): pub/sub channel carrying each event of job_log as it is appended.
"""

PREFIX = "genqueue"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_log(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:log"


def job_channel(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def worker(worker_id: str) -> str:
    """A worker's heartbeat hash (queues, model, device); it expires when the worker stops beating."""
    return f"{PREFIX}:worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}:worker:*"
# A sorted set of worker ids scored by their last heartbeat (unix time), so readers find the workers
# without scanning the keyspace; the heartbeat hashes themselves say which are still alive.
WORKERS = f"{PREFIX}:workers"


# Metrics (tasks/metrics.py): one hash of counters, one hash per histogram. Cumulative, never expire.
METRICS_COUNTERS = f"{PREFIX}:metrics:counters"


def metrics_histogram(name: str) -> str:
    return f"{PREFIX}:metrics:histogram:{name}"


# Celery's broker (kombu's Redis transport) keeps a queue's waiting messages in a list named after
# the queue, plus one list per priority step (3, 6, 9) named queue + "\x06\x16" + step.
BROKER_PRIORITY_STEPS = (0, 3, 6, 9)


def broker_queue_lists(queue: str) -> list[str]:
    return [queue if step == 0 else f"{queue}\x06\x16{step}" for step in BROKER_PRIORITY_STEPS]
