"""The models a request may name: what the live workers of a queue serve, read from the registry;
and whether a request fits their context, counted with the tokenizer files the workers published."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from api.errors import ApiError
from engine.errors import ContextLengthExceededError, EngineError
from engine.request import GenerationRequest
from engine.tokenizer import ChatTokenizer
from tasks.store.registry import WorkerInfo, WorkerRegistry
from tasks.store.tokenizers import TokenizerFiles

log = logging.getLogger(__name__)

LORA_SEPARATOR = ":"  # a LoRA variant's model id: "<base model>:<lora name>"


@dataclass(frozen=True)
class ServedModel:
    id: str  # "<model>" or "<model>:<lora>"
    base: str
    lora: str | None
    max_context: int | None
    created: int = 0


@dataclass(frozen=True)
class ContextLimit:
    """What a served model can take: its context length, and its tokenizer to count a request with."""

    max_context: int
    tokenizer: ChatTokenizer


RequestCheck = Callable[[GenerationRequest], None]  # raises ApiError


class ModelService:
    def __init__(self, registry: WorkerRegistry, configured_model: str, tokenizer_files: TokenizerFiles):
        self.registry = registry
        # Before any worker is up, the configured model (GENQUEUE_MODEL) is served, so requests can queue.
        self.configured = PurePath(configured_model).name
        self.tokenizer_files = tokenizer_files
        self._tokenizers: dict[str, ChatTokenizer | None] = {}  # by digest: built once per process
        self._lock = threading.Lock()

    def workers(self, queue: str) -> list[WorkerInfo]:
        return self.registry.serving(queue)

    def served(self, queue: str) -> list[ServedModel]:
        """Each model and LoRA variant the queue's live workers serve; the configured model if none."""
        found: dict[str, ServedModel] = {}
        for worker in self.workers(queue):
            found[worker.model] = ServedModel(worker.model, worker.model, None, worker.max_context, worker.created)
            for lora in worker.loras:
                model_id = f"{worker.model}{LORA_SEPARATOR}{lora}"
                found[model_id] = ServedModel(model_id, worker.model, lora, worker.max_context, worker.created)
        if not found:
            found[self.configured] = ServedModel(self.configured, self.configured, None, None)
        return [found[model_id] for model_id in sorted(found)]

    def find(self, queue: str, model_id: str, also: str | None = None) -> ServedModel:
        """The served model of that id; an unknown id is a 404 naming the served ones (and `also`,
        another name the route accepts)."""
        served = self.served(queue)
        for model in served:
            if model.id == model_id:
                return model
        known = ", ".join([model.id for model in served] + ([also] if also else []))
        raise ApiError(
            404,
            "model_not_found",
            f"The model {model_id!r} does not exist; this server serves: {known}",
            {"model": ["Not a served model."]},
        )

    # -- what the queue can run ------------------------------------------------------------------

    def request_check(self, queue: str, live: list[WorkerInfo] | None = None) -> RequestCheck:
        """A check for requests bound to the queue: the queue's workers are read once, and requests
        checked against them (many, for a batch). It raises a 400 for a LoRA variant no live worker
        serves (unknown_lora), and a 400 context_length_exceeded naming max_tokens when the prompt
        plus max_tokens exceeds the context of a model they serve, counted exactly as the worker will
        (the same ChatTokenizer, from the files it published); a request the chat template refuses is
        a 400 too. With no worker up (or none that published its tokenizer), the worker decides.
        `live`: the live workers, when the caller has read them already."""
        workers = self.workers(queue) if live is None else [worker for worker in live if worker.serves(queue)]
        loras = {name for worker in workers for name in worker.loras}
        limits = self.limits(workers)

        def check(request: GenerationRequest) -> None:
            lora = request.options.lora
            if workers and lora is not None and lora not in loras:
                message = f"unknown lora {lora!r}; the workers serve: {', '.join(sorted(loras)) or 'none'}"
                raise ApiError(400, "unknown_lora", message, {"lora": [message]})
            for limit in limits:
                try:
                    limit.tokenizer.check_within(request, limit.max_context)
                except ContextLengthExceededError as exc:
                    raise ApiError(400, exc.code, str(exc), {"max_tokens": [str(exc)]}) from exc
                except EngineError as exc:
                    field = "prompt" if request.prompt is not None else "messages"
                    raise ApiError(400, exc.code, str(exc), {field: [str(exc)]}) from exc

        return check

    def limits(self, workers: list[WorkerInfo]) -> list[ContextLimit]:
        """The context and tokenizer of each distinct model these workers serve."""
        found: dict[tuple[str, int], ContextLimit] = {}
        for worker in workers:
            if worker.tokenizer and worker.max_context and (worker.tokenizer, worker.max_context) not in found:
                tokenizer = self.tokenizer(worker.tokenizer)
                if tokenizer is not None:
                    found[(worker.tokenizer, worker.max_context)] = ContextLimit(worker.max_context, tokenizer)
        return list(found.values())

    def tokenizer(self, digest: str) -> ChatTokenizer | None:
        """The tokenizer published under digest, built on first use and kept (its files never change)."""
        with self._lock:
            if digest not in self._tokenizers:
                files = self.tokenizer_files.load(digest)
                if files is None:  # not (or no longer) in Redis: look again next time
                    return None
                try:
                    self._tokenizers[digest] = ChatTokenizer.from_files(files)
                except Exception as exc:  # files this version cannot read (tokenizers raises plain Exception)
                    log.warning("cannot build the tokenizer %s: %s", digest[:12], exc)
                    self._tokenizers[digest] = None
            return self._tokenizers[digest]


def request_problems(check: RequestCheck, request: GenerationRequest) -> dict[str, Any]:
    """The fields at fault when the check refuses the request (a batch line's problems), else none."""
    try:
        check(request)
    except ApiError as exc:
        return exc.fields or {"_schema": [exc.message]}
    return {}
