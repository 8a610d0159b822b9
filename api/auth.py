"""API keys: stored as SHA-256 hashes, checked in constant time, each job visible to its key alone.

Keys come from GENQUEUE_API_KEYS (a list of hashes, or "name:hash" entries) and/or the file named by
GENQUEUE_API_KEYS_FILE (one entry a line, # comments). `genqueue keys create` makes a key and its
entry. With no key configured the API is open, and `genqueue api` binds to 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app, g, request

from api.errors import ApiError

KEY_PREFIX = "gq_"


@dataclass(frozen=True)
class ApiKey:
    owner: str  # the name jobs are recorded under
    sha256: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_entries(entries: Iterable[str]) -> list[ApiKey]:
    keys = []
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        owner, _, digest = entry.rpartition(":")
        digest = digest.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(
                f"API key entry {entry[:20]!r}... is not a SHA-256 hex digest (see 'genqueue keys create')"
            )
        keys.append(ApiKey(owner=owner or digest[:12], sha256=digest))
    return keys


def load_keys(config) -> list[ApiKey]:
    entries: list[str] = []
    configured = config.get("API_KEYS")
    if isinstance(configured, str):
        entries += configured.split(",")
    elif configured:
        entries += list(configured)
    if config.get("API_KEYS_FILE"):
        entries += Path(config["API_KEYS_FILE"]).read_text().splitlines()
    return parse_entries(entries)


def public(view: Callable) -> Callable:
    """Mark a view as reachable without a key (health checks)."""
    view.genqueue_public = True
    return view


def current_owner() -> str | None:
    """The owner of the request's key; None when the API is open (no keys configured)."""
    return g.get("genqueue_owner")


def _authenticate() -> None:
    keys: list[ApiKey] = current_app.extensions["genqueue.api_keys"]
    view = current_app.view_functions.get(request.endpoint or "")
    if not keys or view is None or getattr(view, "genqueue_public", False) or request.endpoint == "static":
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthorized",
            "send an API key as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="genqueue"'},
        )
    digest = hash_key(token.strip())
    owner = None
    for key in keys:  # compare with every key, in constant time each, so timing reveals nothing
        if hmac.compare_digest(digest, key.sha256):
            owner = key.owner
    if owner is None:
        raise ApiError(403, "forbidden", "this API key is not valid")
    g.genqueue_owner = owner


def init_app(app: Flask) -> None:
    app.extensions["genqueue.api_keys"] = load_keys(app.config)
    app.before_request(_authenticate)
