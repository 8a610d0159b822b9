"""Gathers concurrently running jobs of one worker process into shared engine calls.

CTranslate2 never merges concurrent calls, so each job thread hands its prompt to the batcher and
waits. An engine thread (one per engine replica) takes the oldest pending job and, in arrival order,
every other pending job that may share its call: the same sampling settings and model variant
(batch_key: LoRA variants are separate models), up to
max_batch_size jobs, and prompt lengths within max_length_spread tokens of each other (CTranslate2
reads the extra tokens of a longer prompt one step at a time, so a wide spread costs the whole
batch those steps).

A job that arrives while a call runs does not wait for that call to end when it can join it: the
call is paused after its current token, and runs on at once with the newcomers, each paused prompt
going on from its last token (engine/model.py, Paused). Going on, a paused prompt re-reads what it
generated one step at a time, which delays the whole call by that many steps; a call takes such
delays only up to max_length_spread steps in all, so it is paused a few times while young and then
runs to its end. A job that cannot join waits for the running call to end (at most one batch; the
next call starts from the oldest waiting job), or starts at once on an idle replica.

A job taken over from a lost worker comes in Paused (Model.resume) and goes on like a paused one. An
engine call that runs out of memory is run again in halves, each prompt going on from where it stood,
before any job fails: only a prompt that does not fit alone fails (out_of_memory).
With batch_invariant, a greedy job's text does not depend on its neighbours: in int8, the prompts
of other lengths batched with it (whose extra tokens are read one step at a time) and a pause (its
generated tokens read again) change its greedy continuation. So greedy jobs share a call only with
prompts of exactly their length (that begin with the model's cached prefix if they do, so each is
read as it would be alone), and never join a running call; sampled jobs batch as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.errors import EngineOutOfMemoryError
from engine.model import EncodedPrompt, Model, Outcome, OutOfMemory, Paused, resumable
from engine.request import FinishReason, GenerationResult, Usage

log = logging.getLogger(__name__)

# After a pause, a call waits while jobs keep arriving (until none came for JOIN_GAP_S, at most
# JOIN_WINDOW_S): jobs sent together reach the worker spread over up to hundreds of ms, and each later
# pause would make every prompt of the call be read again.
JOIN_GAP_S = 0.1
JOIN_WINDOW_S = 0.5


@dataclass(eq=False)
class EngineJob:
    """One prompt handed to the batcher, its callbacks, and where it stands."""

    prompt: EncodedPrompt
    on_chunk: Callable[[str], None]
    should_stop: Callable[[], bool]
    on_tokens: Callable[[Sequence[int]], None] = lambda _ids: None  # the ids of the next chunk, just before it
    start: Paused | None = None  # a generation to go on with (Model.resume), instead of the prompt
    work: EncodedPrompt | Paused = field(init=False)  # what the next engine call starts from
    generated: int = 0  # tokens so far (counted as the engine asks should_stop)
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    outcome: GenerationResult | BaseException | None = None

    def __post_init__(self) -> None:
        self.work = self.prompt if self.start is None else self.start
        self.generated = 0 if self.start is None else self.start.completion_tokens

    @property
    def key(self) -> tuple:
        return self.prompt.request.options.batch_key()

    @property
    def length(self) -> int:
        """Tokens the engine would read before generating, were the item (re)started now."""
        return len(self.prompt.tokens) + self.generated

    def step(self) -> bool:
        self.generated += 1
        return self.should_stop()

    def end(self, outcome: GenerationResult | BaseException) -> None:
        self.outcome = outcome
        self.done.set()


@dataclass(eq=False)
class EngineCall:
    """The jobs one engine thread runs now, and the flag that pauses them so newcomers can join."""

    items: list[EngineJob]
    pause: threading.Event = field(default_factory=threading.Event)
    reread: int = 0  # steps its pauses cost it so far (tokens its paused prompts read again)

    @property
    def pause_cost(self) -> int:
        """Steps pausing now would cost: the paused prompts re-read what they generated."""
        return max((item.generated for item in self.items), default=0)

    @property
    def key(self) -> tuple:
        return self.items[0].key


class Batcher:
    def __init__(
        self,
        models: Mapping[str | None, Model],
        max_batch_size: int = 16,
        gather_window_s: float = 0.0,
        max_length_spread: int = 32,
        replicas: int = 1,
        join_gap_s: float = JOIN_GAP_S,
        join_window_s: float = JOIN_WINDOW_S,
        on_batch: Callable[[int], None] = lambda _size: None,  # told each engine call's size (metrics)
        on_idle: Callable[[], None] = lambda: None,  # called when the last running call ends with none pending
        batch_invariant: bool = False,  # greedy jobs: equal prompt lengths only, no joining (see the module doc)
    ):
        self.models = dict(models)  # by LoRA variant name; None is the base model
        self.max_batch_size = max(1, int(max_batch_size))
        self.gather_window_s = max(0.0, float(gather_window_s))
        self.max_length_spread = max(0, int(max_length_spread))
        self.join_gap_s, self.join_window_s = join_gap_s, join_window_s
        self.on_batch = on_batch
        self.on_idle = on_idle
        self.batch_invariant = batch_invariant
        self._pending: list[EngineJob] = []  # in arrival order
        self._last_arrival = 0.0
        self._running: list[EngineCall] = []
        self._lock = threading.Condition()
        # One engine thread per replica: CTranslate2 runs that many calls in parallel (inter_threads).
        self._replicas = max(1, int(replicas))
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> Batcher:
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"genqueue-engine-{n}", daemon=True) for n in range(self._replicas)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let the engine threads finish what they run and every job already handed over, then end."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)

    def run(
        self,
        prompt: EncodedPrompt | Paused,
        on_chunk: Callable[[str], None],
        should_stop: Callable[[], bool] = lambda: False,
        on_tokens: Callable[[Sequence[int]], None] = lambda _ids: None,
    ) -> GenerationResult:
        """Generate for one prompt (or go on with a Paused one), batched with whatever else runs;
        blocks until it ends."""
        start = prompt if isinstance(prompt, Paused) else None
        encoded = prompt.prompt if isinstance(prompt, Paused) else prompt
        item = EngineJob(encoded, on_chunk, should_stop, on_tokens, start)
        with self._lock:
            self._pending.append(item)
            self._last_arrival = item.arrived
            self._lock.notify_all()  # an idle engine thread takes it, or a paused call waiting for more
            if len(self._running) >= self._replicas:
                for call in self._running:
                    if self._may_join(call, item):
                        call.pause.set()  # the call stops after its current token and takes the newcomer
                        break
        item.done.wait()
        if isinstance(item.outcome, BaseException):
            raise item.outcome
        assert item.outcome is not None  # done is set with the outcome
        return item.outcome

    # -- choosing batches (all under self._lock) -----------------------------------------------

    def _invariant(self, item: EngineJob) -> bool:
        """Whether item's text must not depend on its batch (batch_invariant, and a greedy job)."""
        return self.batch_invariant and item.prompt.request.options.greedy

    def _fits(self, chosen: list[EngineJob], item: EngineJob) -> bool:
        if item.key != chosen[0].key or len(chosen) >= self.max_batch_size:
            return False
        lengths = [c.length for c in chosen] + [item.length]
        if self._invariant(item):  # read exactly as alone: the same length, the cached prefix or not
            return max(lengths) == min(lengths) and self._cached_prefix(item) == self._cached_prefix(chosen[0])
        return max(lengths) - min(lengths) <= self.max_length_spread

    def _cached_prefix(self, item: EngineJob) -> bool:
        """Whether item's prompt begins with its model's cached prefix (engine/model.py static_prefix)."""
        prefix = getattr(self.models.get(item.prompt.request.options.lora), "static_prefix", ())
        return bool(prefix) and item.prompt.tokens[: len(prefix)] == prefix

    def _may_join(self, call: EngineCall, item: EngineJob) -> bool:
        """Whether pausing a running call so that item joins it is worth it (see the module doc)."""
        return (
            bool(call.items)  # an ending call has none: it takes no one
            and not self._invariant(item)
            and resumable(item.prompt.request.options)
            and call.reread + call.pause_cost <= self.max_length_spread
            and self._fits(call.items, item)
        )

    def _batch_with(self, chosen: list[EngineJob]) -> list[EngineJob]:
        """chosen, then the pending jobs that may join it, in arrival order (nothing is taken)."""
        batch = list(chosen)
        for item in self._pending:
            if item not in batch and self._fits(batch, item):
                batch.append(item)
        return batch

    def _take_pending(self, chosen: list[EngineJob]) -> list[EngineJob]:
        """chosen (the oldest pending job if empty) and the pending jobs that may join it, taken."""
        batch = self._batch_with(chosen or [self._pending[0]])
        self._pending = [item for item in self._pending if item not in batch]
        return batch

    # -- the engine threads --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if not self._pending:  # stopping, and nothing is left to run
                    return
                # Jobs sent together reach the worker a little apart: give the others a moment
                # (counted from the oldest job's arrival: one that waited for a batch waits no more).
                deadline = self._pending[0].arrived + self.gather_window_s
                while 0 < len(self._pending) < self.max_batch_size and time.monotonic() < deadline:
                    self._lock.wait(deadline - time.monotonic())
                if not self._pending:  # another engine thread took them
                    continue
                call = EngineCall(self._take_pending([]))
                self._running.append(call)
            try:
                self._run(call)
            finally:
                with self._lock:
                    self._running.remove(call)
                    if self._pending:
                        self._lock.notify()
                    idle = not self._pending and not self._running
            if idle:
                self.on_idle()

    def _run(self, call: EngineCall) -> None:
        while call.items:
            items = self._drop_cancelled(call.items)
            if items:
                self._call_engine(call, items)
            with self._lock:
                paused = [item for item in items if not item.done.is_set()]
                if paused:
                    call.reread += max(item.generated for item in paused)
                    self._wait_for_joiners(paused)
                call.pause.clear()  # after the wait: who arrived during it joins now, with no new pause
                call.items = self._take_pending(paused) if paused else []

    def _wait_for_joiners(self, paused: list[EngineJob]) -> None:
        cap = time.monotonic() + self.join_window_s
        while len(self._batch_with(paused)) < self.max_batch_size:
            now = time.monotonic()
            until = min(cap, self._last_arrival + self.join_gap_s)
            if now >= until:
                return
            self._lock.wait(until - now)

    def _drop_cancelled(self, items: list[EngineJob]) -> list[EngineJob]:
        """Jobs cancelled before they started end here, without taking a slot in the call."""
        kept = []
        for item in items:
            if isinstance(item.work, EncodedPrompt) and item.should_stop():
                usage = Usage(len(item.prompt.tokens), 0)
                item.end(GenerationResult(response="", usage=usage, finish_reason=FinishReason.CANCELLED))
            else:
                kept.append(item)
        return kept

    def _call_engine(self, call: EngineCall, items: list[EngineJob]) -> None:
        resumed = sum(isinstance(item.work, Paused) for item in items)
        log.info("engine call: %d jobs (%d resumed)", len(items), resumed)
        self.on_batch(len(items))
        started = time.monotonic()
        try:
            outcomes = self._generate(call, items)
        except BaseException as exc:  # the engine call failed: every job in it fails with the cause
            log.exception("engine call for %d jobs failed", len(items))
            outcomes = [exc] * len(items)
        log.info("engine call done: %d jobs in %.3f s", len(items), time.monotonic() - started)
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Paused):
                item.work = outcome
                item.generated = outcome.completion_tokens
            else:
                item.end(outcome)

    def _generate(self, call: EngineCall, items: list[EngineJob]) -> list[Outcome | Paused]:
        """One engine call for items; if it runs out of memory, the prompts it left unfinished go on
        in two smaller calls (and so on), and only a prompt that does not fit alone fails."""
        model = self.models[items[0].prompt.request.options.lora]  # the batch key holds the variant
        try:
            return model.generate_batch(
                [item.work for item in items],
                on_chunk=lambda i, text: items[i].on_chunk(text),
                should_stop=lambda i: items[i].step(),
                should_pause=call.pause.is_set,
                on_tokens=lambda i, ids: items[i].on_tokens(ids),
            )
        except OutOfMemory as oom:
            outcomes: list[Outcome | Paused] = list(oom.outcomes)
            unfinished = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Paused)]
            if len(items) == 1 and unfinished:
                return [EngineOutOfMemoryError("the engine ran out of memory for this request")]
            log.warning("engine call for %d jobs ran out of memory (%s); splitting it", len(items), oom)
            for i in unfinished:
                items[i].work = outcomes[i]  # type: ignore[assignment]
                items[i].generated = items[i].work.completion_tokens  # type: ignore[union-attr]
            half = (len(unfinished) + 1) // 2
            for part in (unfinished[:half], unfinished[half:]):
                if part:
                    for i, outcome in zip(part, self._generate(call, [items[i] for i in part]), strict=True):
                        outcomes[i] = outcome
            return outcomes
