"""genqueue: a self-hosted LLM generation queue (Flask API, Celery workers on Redis, CTranslate2)."""

__version__ = "0.1.0"
