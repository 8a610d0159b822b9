"""The service layer between the HTTP routes and the queue: every blueprint calls it, none talks
to the store, the registry or Celery itself. Each service takes the caller's owner explicitly and
raises ApiError (api/errors.py) for what the caller must be told.

The app factory builds one of each per app; views reach them with `job_service()`,
`batch_service()`, `file_service()` and `model_service()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from api.service.batches import BatchService
    from api.service.files import FileService
    from api.service.jobs import JobService
    from api.service.models import ModelService


def job_service() -> JobService:
    return current_app.extensions["genqueue.jobs"]


def batch_service() -> BatchService:
    return current_app.extensions["genqueue.batches"]


def model_service() -> ModelService:
    return current_app.extensions["genqueue.models"]


def file_service() -> FileService:
    return current_app.extensions["genqueue.files"]
