"""The states of a job, shared by the API and the workers."""

import enum


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class BatchState(enum.StrEnum):
    VALIDATING = "validating"  # the API is checking the requests and queueing their items
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"  # every item has been taken by a worker; the last ones are running
    COMPLETED = "completed"  # every request ended, and every one succeeded
    COMPLETED_WITH_ERRORS = "completed_with_errors"  # every request ended; some failed (or were cancelled alone)
    FAILED = "failed"  # the items could not be queued
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (BatchState.COMPLETED, BatchState.COMPLETED_WITH_ERRORS, BatchState.FAILED, BatchState.CANCELLED)
