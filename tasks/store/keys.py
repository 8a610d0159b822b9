"""Every Redis key and channel genqueue uses, and nothing else names one.

Per job:
- job(id): a hash with the job's state, timestamps, request, result and error;
- job_log(id): a stream of its events (chunks, then one end event), entry ids "<seq>-0", replayable;
- job_channel(id): pub/sub channel carrying each event of job_log as it is appended;
- job_tokens(id): the token ids of the logged chunks, for resuming the job on another worker.

Per batch (see tasks/store/batches.py): its items are jobs with ids batch_item(batch id, index); besides them
- batch(id): a hash with the batch's state, counts, usage, timestamps and metadata;
- batch_results(id): a hash from item index to that item's result line, written when the item ends;
- owner_batches(owner): a sorted set of an API key owner's batch ids by creation time, for listing.

Per owner, owner_jobs(owner): a sorted set of the jobs they submitted (not batch items) by creation
time, for listing; it expires with the records (tasks/store/jobs.py).

Webhooks (see tasks/store/webhooks.py): webhook(message id), a hash per event to deliver, and
WEBHOOKS_DUE, a sorted set of those message ids by the time their next attempt is due.

Per uploaded file (tasks/store/files.py): file(id), a hash with its owner, purpose, name and size;
file_lines(id), a list of its lines; owner_files(owner), a sorted set of an owner's file ids by time.

Per model, tokenizer(digest): a hash of the tokenizer files its workers published (by name), under
the SHA-256 of their contents, for the API's context check (tasks/store/tokenizers.py); never changed.
"""

PREFIX = "genqueue"

# Pub/sub channel on which the API announces cancelled job ids to every worker.
CANCEL_CHANNEL = f"{PREFIX}:cancel"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_log(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:log"


def job_tokens(job_id: str) -> str:
    """The token ids its logged chunks were generated from, comma-separated, appended with each chunk:
    what a worker that takes the job over goes on from."""
    return f"{PREFIX}:job:{job_id}:tokens"


# A hash of the running jobs: job id -> the worker holding it ('' once handed back). What the
# recovery sweep reads to find jobs whose holder stopped beating (tasks/runtime/recovery.py).
RUNNING = f"{PREFIX}:running"


def queued(broker_list: str) -> str:
    """A sorted set of the queued jobs whose message goes on broker_list: job id -> when it was pushed
    (Redis time). Added in the step that pushes the message (the job hash keeps the list's name, as
    broker_list), removed when the job is claimed or ends; where the recovery sweep looks for a job whose
    message was lost between its list and the unacked hash (tasks/store/lost.py)."""
    return f"{PREFIX}:queued:{broker_list}"


def job_channel(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


# Every job's channel, for the one PSUBSCRIBE an API process makes (tasks/store/followers.py).
JOB_CHANNELS = job_channel("*")


def job_of_channel(channel: str) -> str:
    """The job id a job_channel() names."""
    return channel.removeprefix(f"{PREFIX}:job:").removesuffix(":events")


def broker_queue(queue: str) -> str:
    """The list in which Celery's Redis transport (kombu) keeps a queue's waiting messages."""
    return queue


# kombu's Redis transport keeps each delivered, unacknowledged message in BROKER_UNACKED (delivery tag
# -> [message, exchange, routing key]) and its delivery time in BROKER_UNACKED_INDEX (a sorted set),
# until the worker acknowledges it. These are kombu's default names, set explicitly on the transport
# (tasks/runtime/app.py transport_options) so that they and the recovery sweep never part.
BROKER_UNACKED = "unacked"
BROKER_UNACKED_INDEX = "unacked_index"


def idempotency(owner: str, key_digest: str) -> str:
    """Maps an owner's Idempotency-Key (hashed) to the job it created and that request's digest."""
    return f"{PREFIX}:idempotency:{owner}:{key_digest}"


def batch(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def batch_results(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}:results"


def owner_batches(owner: str) -> str:
    return f"{PREFIX}:batches:{owner}"


def owner_jobs(owner: str) -> str:
    return f"{PREFIX}:jobs:{owner}"


def owner_live_jobs(owner: str) -> str:
    """A set of the owner's jobs (not batch items) that may not have ended: what their quotas count
    (tasks/store/jobs.py submit drops the ended ones as it counts)."""
    return f"{PREFIX}:live:jobs:{owner}"


def owner_live_batches(owner: str) -> str:
    """A set of the owner's batches that may still hold queued items, for the batch items quota."""
    return f"{PREFIX}:live:batches:{owner}"


# A sorted set of the batches being submitted (validating) by the time of their last progress: a batch
# whose API process died while writing or queueing it is found here (tasks/store/batches.py stalled).
SUBMITTING = f"{PREFIX}:batches:submitting"


def webhook(message_id: str) -> str:
    """A webhook event waiting for delivery: its URL, type, subject, body once built, attempts."""
    return f"{PREFIX}:webhook:{message_id}"


WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"


def batch_item(batch_id: str, index: int) -> str:
    """The job id (not a key) of a batch's index-th item: derived, so no list of ids is stored."""
    return f"{batch_id}-{index}"


def worker(worker_id: str) -> str:
    """A worker's heartbeat hash (queues, model, device); it expires when the worker stops beating."""
    return f"{PREFIX}:worker:{worker_id}"


# A sorted set of worker ids scored by the time their heartbeat expires: live workers without a SCAN.
WORKERS = f"{PREFIX}:workers"


# Metrics (tasks/metrics.py): one hash of counters, one hash per histogram. Cumulative, never expire.
METRICS_COUNTERS = f"{PREFIX}:metrics:counters"


def metrics_histogram(name: str) -> str:
    return f"{PREFIX}:metrics:histogram:{name}"


def file(file_id: str) -> str:
    return f"{PREFIX}:file:{file_id}"


def file_lines(file_id: str) -> str:
    return f"{PREFIX}:file:{file_id}:lines"


def owner_files(owner: str) -> str:
    return f"{PREFIX}:files:{owner}"


def tokenizer(digest: str) -> str:
    """A model's tokenizer files, by file name; content-addressed, so written once and never changed."""
    return f"{PREFIX}:tokenizer:{digest}"


def queue_seen(queue: str) -> str:
    """The Unix time of the last heartbeat of a worker consuming the queue: new jobs are refused on a
    queue no worker has served for a while (the no-worker grace)."""
    return f"{PREFIX}:queue:{queue}:seen"
