"""A request id on every response (X-Request-Id): the caller's, when it sends a usable one, else a new
one. Log lines about a request carry it, so a client's report can be found in the logs."""

from __future__ import annotations

import re
import secrets

from flask import Flask, g, request

HEADER = "X-Request-Id"
# Ids from outside end up in logs: letters, digits and a few separators only, so none can forge a line.
USABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def current() -> str:
    """This request's id (one is made if the request hooks have not run, e.g. outside a request)."""
    if "request_id" not in g:
        g.request_id = secrets.token_hex(16)
    return g.request_id


def init_app(app: Flask) -> None:
    @app.before_request
    def _take_or_make() -> None:
        given = request.headers.get(HEADER, "")
        g.request_id = given if USABLE.fullmatch(given) else secrets.token_hex(16)

    @app.after_request
    def _attach(response):
        response.headers[HEADER] = current()
        return response
