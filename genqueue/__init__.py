"""genqueue: a self-hosted LLM generation queue (Flask API, Celery workers on Redis, CTranslate2).

The top floor: the `genqueue` command, the process launcher and the HTTP client (`genqueue.Client`).
Nothing below (api, tasks, engine, config) imports from here.
"""

from config import VERSION as __version__
from genqueue.client import ApiClientError, Batch, Client, Job, JobStream, Page, Result, StreamEvent, Usage

__all__ = [
    "ApiClientError",
    "Batch",
    "Client",
    "Job",
    "JobStream",
    "Page",
    "Result",
    "StreamEvent",
    "Usage",
    "__version__",
]
