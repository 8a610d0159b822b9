"""Gathers concurrently running jobs of one worker process into shared engine calls.

CTranslate2 never merges concurrent calls, so each job thread hands its prompt to the batcher and
waits; one engine thread takes whatever is pending (up to max_batch_size, waiting gather_window_s for
more), groups prompts whose sampling settings and model variant (LoRA) match, and runs each group as
one generate_batch of that variant's model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine import EncodedPrompt, FinishReason, GenerationResult, Model, Usage

log = logging.getLogger(__name__)


@dataclass
class BatchItem:
    prompt: EncodedPrompt
    on_chunk: Callable[[str], None]
    should_stop: Callable[[], bool]
    done: threading.Event = field(default_factory=threading.Event)
    outcome: GenerationResult | BaseException | None = None


class Batcher:
    def __init__(
        self,
        models: Mapping[str | None, Model],
        max_batch_size: int = 8,
        gather_window_s: float = 0.005,
        on_batch: Callable[[int], None] = lambda _size: None,  # told each engine call's size (metrics)
    ):
        self.models = dict(models)  # by LoRA variant name; None is the base model
        self.on_batch = on_batch
        self.max_batch_size = max(1, int(max_batch_size))
        self.gather_window_s = float(gather_window_s)
        self._pending: queue.Queue[BatchItem] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="genqueue-batcher", daemon=True)
        self._thread.start()

    def run(
        self,
        prompt: EncodedPrompt,
        on_chunk: Callable[[str], None],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> GenerationResult:
        """Generate for one prompt, batched with whatever else runs; blocks until it ends."""
        item = BatchItem(prompt, on_chunk, should_stop)
        self._pending.put(item)
        item.done.wait()
        if isinstance(item.outcome, BaseException):
            raise item.outcome
        return item.outcome

    def _gather(self) -> list[BatchItem]:
        items = [self._pending.get()]
        deadline = time.monotonic() + self.gather_window_s
        while len(items) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                items.append(self._pending.get(timeout=remaining) if remaining > 0 else self._pending.get_nowait())
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        while True:
            items = self._gather()
            groups: dict[tuple, list[BatchItem]] = {}
            for item in items:
                groups.setdefault(item.prompt.request.options.batch_key(), []).append(item)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list[BatchItem]) -> None:
        # Jobs cancelled while they waited for a batch end here, without taking a slot in it.
        for item in [item for item in group if item.should_stop()]:
            group.remove(item)
            usage = Usage(len(item.prompt.tokens), 0)
            item.outcome = GenerationResult(response="", usage=usage, finish_reason=FinishReason.CANCELLED)
            item.done.set()
        if not group:
            return
        self.on_batch(len(group))
        model = self.models[group[0].prompt.request.options.lora]  # the batch key holds the variant
        try:
            outcomes = model.generate_batch(
                [item.prompt for item in group],
                on_chunk=lambda i, text: group[i].on_chunk(text),
                should_stop=lambda i: group[i].should_stop(),
            )
        except BaseException as exc:  # the engine call failed: every job in it fails with the cause
            log.exception("engine call for %d jobs failed", len(group))
            outcomes = [exc] * len(group)
        for item, outcome in zip(group, outcomes, strict=True):
            item.outcome = outcome
            item.done.set()
