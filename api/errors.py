"""The JSON error shape every endpoint answers with: {"error": {"code", "message", "fields"}}."""

from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

REDIS_RETRY_AFTER_S = 5


class ApiError(Exception):
    """Raised by a view to answer with a JSON error; `fields` maps each bad field to its problems."""

    def __init__(self, status: int, code: str, message: str, fields: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, fields: dict | None = None, headers: dict | None = None):
    response = jsonify({"error": {"code": code, "message": message, "fields": fields or {}}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _code_for(status: int) -> str:
    return {
        400: "bad_request",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        415: "unsupported_media_type",
        429: "too_many_requests",
    }.get(status, "http_error")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.fields, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(exc.code or 500, _code_for(exc.code or 500), exc.description or exc.name)

    @app.errorhandler(redis.RedisError)
    @app.errorhandler(OperationalError)  # Celery could not publish to the broker
    def _redis_down(exc: Exception):
        log.warning("Redis unavailable: %s", exc)
        return error_response(
            503,
            "queue_unavailable",
            "the job queue (Redis) is unavailable; retry shortly",
            headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
        )
