"""The Celery runtime of a worker process: the Celery app and its one task, and the components the
task uses, each with a start and a stop (chunk writer, cancel watcher, heartbeat)."""
