"""The tokenizer files of the models workers serve, published in Redis so the API can count a
request's tokens exactly as the worker will, without the model's files or the engine runtime.

A worker publishes its model's files (engine/tokenizer.py CHAT_TOKENIZER_FILES) once when it starts,
under the SHA-256 of their contents, and names that digest in its heartbeat (WorkerInfo.tokenizer).
Content-addressed: a digest's files never change, so they are written once, read once per API
process (which builds and keeps a ChatTokenizer from them), and shared by every worker of a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import redis

from tasks.store import keys


def digest_of(files: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(files), sort_keys=True).encode()).hexdigest()


class TokenizerFiles:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def publish(self, files: Mapping[str, str]) -> str:
        """Store the files (unless a worker of the same model did) and return their digest."""
        digest = digest_of(files)
        if not self.redis.exists(keys.tokenizer(digest)):
            self.redis.hset(keys.tokenizer(digest), mapping=dict(files))
        return digest

    def load(self, digest: str) -> dict[str, str] | None:
        """The files published under digest; None if there are none (or they do not match it)."""
        files = self.redis.hgetall(keys.tokenizer(digest))
        return files if files and digest_of(files) == digest else None
