"""Every Redis key and channel genqueue uses, and nothing else names one.

Per job:
- job(id): a hash with the job's state, timestamps, request, result and error;
- job_log(id): a stream of its events (chunks, then one end event), entry ids "<seq>-0", replayable;
- job_channel(id): pub/sub channel carrying each event of job_log as it is appended.
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


def worker(worker_id: str) -> str:
    """A worker's heartbeat hash (queues, model, device); it expires when the worker stops beating."""
    return f"{PREFIX}:worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}:worker:*"


def queue_served(queue: str) -> str:
    """Exists while some worker consuming the queue beats (each heartbeat sets it, with its TTL)."""
    return f"{PREFIX}:queue:{queue}:served"
