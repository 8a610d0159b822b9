"""Webhook URLs at submit: a URL that can never be delivered is a 400 now, not a silent loss later."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from api.errors import ApiError
from tasks.runtime.delivery import WebhookRefused, check_url, secret_key


def check_webhook(url: str | None, settings: Mapping[str, Any]) -> None:
    """Refuse (400, naming `webhook`) a URL genqueue would never send to: webhooks not configured (no
    valid GENQUEUE_WEBHOOK_SECRET), not http(s), or a host that does not resolve or resolves to an
    address GENQUEUE_WEBHOOK_ALLOWED_HOSTS does not allow (tasks/runtime/delivery.py)."""
    if url is None:
        return
    try:
        secret_key(settings.get("WEBHOOK_SECRET"))
    except ValueError as exc:
        raise refused(f"webhooks are not enabled on this server: {exc}") from None
    try:
        check_url(url, settings)
    except WebhookRefused as exc:
        raise refused(str(exc)) from None


def refused(message: str) -> ApiError:
    return ApiError(400, "invalid_webhook", f"webhook refused: {message}", {"webhook": [message]})
