"""Every Redis key and channel genqueue uses, and nothing else names one.

Per job:
- job(id): a hash with the job's state, timestamps, request, result and error;
- job_log(id): a stream of its events (chunks, then one end event), entry ids "<seq>-0", replayable;
- job_channel(id): pub/sub channel carrying each event of job_log as it is appended.

Per batch (see tasks/batches.py): its items are jobs with ids batch_item(batch id, index); besides them
- batch(id): a hash with the batch's state, counts, usage, timestamps and metadata;
- batch_results(id): a hash from item index to that item's result line, written when the item ends;
- owner_batches(owner): a sorted set of an API key owner's batch ids by creation time, for listing.
"""

PREFIX = "genqueue"

# Pub/sub channel on which the API announces cancelled job ids to every worker.
CANCEL_CHANNEL = f"{PREFIX}:cancel"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_log(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:log"


def job_channel(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def broker_queue(queue: str) -> str:
    """The list in which Celery's Redis transport (kombu) keeps a queue's waiting messages."""
    return queue


def idempotency(owner: str, key_digest: str) -> str:
    """Maps an owner's Idempotency-Key (hashed) to the job it created and that request's digest."""
    return f"{PREFIX}:idempotency:{owner}:{key_digest}"


def batch(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def batch_results(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}:results"


def owner_batches(owner: str) -> str:
    return f"{PREFIX}:batches:{owner}"


def batch_item(batch_id: str, index: int) -> str:
    """The job id (not a key) of a batch's index-th item: derived, so no list of ids is stored."""
    return f"{batch_id}-{index}"


def worker(worker_id: str) -> str:
    """A worker's heartbeat hash (queues, model, device); it expires when the worker stops beating."""
    return f"{PREFIX}:worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}:worker:*"
# A sorted set of worker ids scored by the time their heartbeat expires: live workers without a SCAN.
WORKERS = f"{PREFIX}:workers"


# Metrics (tasks/metrics.py): one hash of counters, one hash per histogram. Cumulative, never expire.
METRICS_COUNTERS = f"{PREFIX}:metrics:counters"


def metrics_histogram(name: str) -> str:
    return f"{PREFIX}:metrics:histogram:{name}"


def queue_served(queue: str) -> str:
    """Exists while some worker consuming the queue beats (each heartbeat sets it, with its TTL)."""
    return f"{PREFIX}:queue:{queue}:served"
