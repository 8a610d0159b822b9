"""The queue: the Redis domain every process shares (tasks.store) and the Celery runtime that workers
run (tasks.runtime). The API imports tasks.store and tasks.runtime.app only, never the worker."""
