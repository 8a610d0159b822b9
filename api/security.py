"""Response headers that keep browsers safe, and the Host names the API answers to.

- Every response: `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`, and a
  Content-Security-Policy: the playground and /docs may load their own scripts, styles and images
  and talk to this origin only (their assets are local, nothing inline); every other response may
  load nothing at all. No page may be framed.
- Trusted hosts: requests whose Host header is not one of GENQUEUE_TRUSTED_HOSTS get a 400. An open
  API (no keys) trusts only loopback names by default, so a page on another site cannot reach it
  through DNS rebinding (a name of the attacker's that resolves to 127.0.0.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response

from api.auth import keys_configured

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
DATA_POLICY = "default-src 'none'; frame-ancestors 'none'"
LOOPBACK_NAMES = ("localhost", "127.0.0.1")  # werkzeug cannot match IPv6 literals such as [::1]


def trusted_hosts(config: Mapping[str, Any]) -> list[str] | None:
    """The Host names to answer to: TRUSTED_HOSTS (a list or comma-separated; a leading dot admits
    subdomains), else loopback names for an open API, else any (None)."""
    configured = config.get("TRUSTED_HOSTS")
    if isinstance(configured, str):
        configured = [name.strip() for name in configured.split(",") if name.strip()]
    if configured:
        return list(configured)
    return None if keys_configured(config) else list(LOOPBACK_NAMES)


def _secure(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    policy = PAGE_POLICY if response.mimetype == "text/html" else DATA_POLICY
    response.headers.setdefault("Content-Security-Policy", policy)
    return response


def init_app(app: Flask) -> None:
    app.config["TRUSTED_HOSTS"] = trusted_hosts(app.config)
    app.after_request(_secure)
