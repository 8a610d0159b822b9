"""One prepared model: a CTranslate2 Generator and its tokenizer, built once, used for every request."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ctranslate2

from engine.detokenize import IncrementalDetokenizer
from engine.errors import InvalidRequestError, ModelNotFoundError, is_out_of_memory
from engine.metadata import is_prepared, read_metadata
from engine.request import FinishReason, GenerationRequest, GenerationResult, SamplingOptions, Usage
from engine.stop import StopMatcher
from engine.tokenizer import ChatTokenizer
from engine.tools import parse_tool_calls

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096  # tokens, for a converted model that did not record its own
DEFAULT_COMPUTE_TYPES = {"cpu": "int8", "cuda": "int8_float16"}

# on_chunk(index, text) gets each new piece of text of the index-th prompt of a batch;
# should_stop(index) is asked after each token and ends that prompt alone when it answers True;
# should_pause() is asked after each token too, and pauses the prompts still running when it answers True.
# on_tokens(index, ids) is told, just before each chunk, the token ids generated since the last chunk:
# a prompt and the ids logged with its chunks are what resume() goes on from.
ChunkCallback = Callable[[int, str], None]
TokensCallback = Callable[[int, Sequence[int]], None]
StopCallback = Callable[[int], bool]
PauseCallback = Callable[[], bool]
Outcome = GenerationResult | BaseException  # a prompt's end: its result, or what stopped it alone


@dataclass(frozen=True)
class EncodedPrompt:
    """A request checked against the model and turned into the token strings CTranslate2 takes."""

    request: GenerationRequest
    tokens: tuple[str, ...]


@dataclass
class _ItemState:
    """One prompt's progress through engine calls: what it generated, its text, why it ended."""

    prompt: EncodedPrompt
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    chunks: list[str] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)  # token strings, to go on from after a pause
    ids: list[int] = field(default_factory=list)  # the same tokens' ids
    reported: int = 0  # ids already handed to on_tokens
    paused: bool = False

    @property
    def options(self) -> SamplingOptions:
        return self.prompt.request.options

    def emit(self, text: str, on_text: Callable[[str], None] | None, final: bool = False) -> None:
        text = self.stops.feed(text, final)  # holds back what may begin a stop string, until final
        if text:
            self.chunks.append(text)
            if on_text is not None:
                on_text(text)

    def result(self) -> GenerationResult:
        response = "".join(self.chunks)
        return GenerationResult(
            response=response,
            usage=Usage(len(self.prompt.tokens), self.completion_tokens),
            finish_reason=self.finish_reason or FinishReason.STOP,
            tool_calls=tuple(parse_tool_calls(response, self.prompt.request.tools)),
        )


def resumable(options: SamplingOptions) -> bool:
    """Whether a paused generation with these options goes on exactly as it would have.

    Going on feeds the generated tokens back as part of the prompt. CTranslate2's repetition penalty
    counts generated tokens but not the prompt, so a penalized generation would change: never pause one.
    """
    return options.repetition_penalty == 1.0


class OutOfMemory(Exception):  # noqa: N818 - not an error to show: the batcher splits the call
    """An engine call ran out of memory. outcomes: each prompt's end, or Paused where it stood, so a
    smaller call goes on from there without emitting any chunk twice."""

    def __init__(self, cause: BaseException, outcomes: list[Outcome | Paused]):
        super().__init__(str(cause))
        self.outcomes = outcomes


@dataclass(frozen=True)
class Paused:
    """A prompt whose generation a should_pause answer paused; a later generate_batch goes on with it."""

    state: _ItemState

    @property
    def prompt(self) -> EncodedPrompt:
        return self.state.prompt

    @property
    def length(self) -> int:
        """Tokens the engine reads before it generates again: the prompt and what was generated."""
        return len(self.state.prompt.tokens) + len(self.state.generated)

    @property
    def completion_tokens(self) -> int:
        return self.state.completion_tokens


def sampling_arguments(options: SamplingOptions) -> dict:
    """CTranslate2's arguments for these options; each maps exactly, none is approximated."""
    arguments = {"repetition_penalty": options.repetition_penalty}
    if options.greedy:  # temperature 0, top_k 1, or top_p 0 (which keeps only the most likely token)
        return {**arguments, "sampling_topk": 1}
    return {
        **arguments,
        "sampling_topk": options.top_k or 0,  # 0: sample from the whole vocabulary
        "sampling_temperature": options.temperature,
        "sampling_topp": min(options.top_p, 1.0),  # above 1 no token is cut, as at 1
    }


class _Stepper:
    """CTranslate2's per-token callback for one generate_batch call: counts, detokenizes, stops and
    pauses each prompt. It holds no reference to the Model: CTranslate2 drops the callback in its
    own thread after the call, and if that dropped the last reference to the Model, its Generator
    would be destroyed from the thread it has to join ("Resource deadlock avoided": abort)."""

    def __init__(
        self,
        states: list[_ItemState],
        end_tokens: set[str],
        on_chunk: ChunkCallback | None,
        should_stop: StopCallback | None,
        should_pause: PauseCallback | None,
        on_tokens: TokensCallback | None = None,
    ):
        self.states = states
        self.end_tokens = end_tokens
        self.on_chunk = on_chunk
        self.should_stop = should_stop
        self.should_pause = should_pause
        self.on_tokens = on_tokens

    def text_callback(self, index: int) -> Callable[[str], None] | None:
        on_chunk, on_tokens, state = self.on_chunk, self.on_tokens, self.states[index]
        if on_chunk is None:
            return None

        def chunk(text: str) -> None:
            if on_tokens is not None:
                on_tokens(index, state.ids[state.reported :])
                state.reported = len(state.ids)
            on_chunk(index, text)

        return chunk

    def __call__(self, step) -> bool:
        """True ends (or pauses) the prompt of this step."""
        state = self.states[step.batch_id]
        if state.finish_reason is not None or state.paused:
            return True
        try:
            if step.token in self.end_tokens:
                state.finish_reason = FinishReason.STOP
                return True
            state.completion_tokens += 1
            state.generated.append(step.token)
            state.ids.append(step.token_id)
            state.emit(state.detokenizer.add(step.token_id), self.text_callback(step.batch_id))
            state.finish_reason = self._finish_reason(state, step)
            if state.finish_reason is None and self.should_pause is not None and self.should_pause():
                state.paused = True
            return state.finish_reason is not None or state.paused
        except BaseException as exc:  # a failing callback ends its own prompt, not the batch
            state.error = exc
            state.finish_reason = FinishReason.CANCELLED
            return True

    def _finish_reason(self, state: _ItemState, step) -> FinishReason | None:
        if state.stops.matched is not None:
            return FinishReason.STOP
        if state.completion_tokens >= state.options.max_tokens:
            return FinishReason.LENGTH
        if self.should_stop is not None and self.should_stop(step.batch_id):
            return FinishReason.CANCELLED
        if step.is_last:
            return FinishReason.LENGTH
        return None

    def outcome(self, index: int) -> Outcome | Paused:
        """The index-th prompt's end once the call returned: its result, its error, or Paused."""
        state = self.states[index]
        if state.paused and state.error is None:
            return Paused(state)
        if state.error is None:
            try:
                state.emit(state.detokenizer.flush(), self.text_callback(index), final=True)
                if state.stops.matched is not None:
                    state.finish_reason = FinishReason.STOP
            except BaseException as exc:
                state.error = exc
        return state.error if state.error is not None else state.result()


class Model:
    """Loads a prepared model directory once; generates for a batch of requests in one engine call.

    Not fork-safe (neither is CTranslate2): build it in the process that uses it.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        compute_type: str | None = None,
        intra_threads: int = 0,
        inter_threads: int = 1,
        lora: str | None = None,
        prefix_cache: bool | None = False,  # None: where the output stays the same (float32)
    ):
        self.model_dir = Path(model_dir)
        self.lora = lora  # the LoRA variant name this directory holds, or None for a base model
        if not is_prepared(self.model_dir):
            raise ModelNotFoundError(f"no prepared model at {self.model_dir}; run 'genqueue model prepare' first")
        self.metadata = read_metadata(self.model_dir) or {}
        self.name = self.metadata.get("name", self.model_dir.name)
        self.max_context = int(self.metadata.get("max_context") or DEFAULT_MAX_CONTEXT)
        self.device = device
        self.compute_type = compute_type or DEFAULT_COMPUTE_TYPES.get(device, "default")
        self.tokenizer = ChatTokenizer(self.model_dir)
        self._generator = ctranslate2.Generator(
            str(self.model_dir),
            device=device,
            compute_type=self.compute_type,
            intra_threads=intra_threads,
            inter_threads=inter_threads,
        )
        self._end_tokens = set(self.tokenizer.end_tokens)
        # The chat template's fixed start (its default system turn): CTranslate2 caches the state after
        # it (static_prompt) for calls whose prompts all start with it, instead of reading it each time.
        # Measured (bench/prefix_cache.py): the first token comes 15-25% sooner; float32 outputs stay the
        # same, int8 greedy outputs change (the prefix is read apart from the rest), so None is float32 only.
        if prefix_cache is None:
            prefix_cache = self.compute_type == "float32"
        self.static_prefix = self.tokenizer.fixed_prefix() if prefix_cache else ()
        log.info("loaded model %s on %s (%s)", self.name, device, self.compute_type)

    def encode(self, request: GenerationRequest) -> EncodedPrompt:
        """Render and tokenize a request; raise InvalidRequestError if it cannot run as asked."""
        tokens = self.tokenizer.encode_within(request, self.max_context)
        return EncodedPrompt(request=request, tokens=tuple(tokens))

    def generate_batch(
        self,
        prompts: Sequence[EncodedPrompt | Paused],
        on_chunk: ChunkCallback | None = None,
        should_stop: StopCallback | None = None,
        should_pause: PauseCallback | None = None,
        on_tokens: TokensCallback | None = None,
    ) -> list[Outcome | Paused]:
        """Generate for several prompts in one engine call; they must share their sampling settings.

        Each prompt stops at its own end token or max_tokens. The result at index i is the i-th
        prompt's GenerationResult, or the exception its callbacks raised (which stopped it alone),
        or, once should_pause answered True, a Paused prompt: passed to a later call (with other
        prompts, say), it goes on from its last token with the same chunks and counts.
        Raises OutOfMemory (with each prompt paused where it stood) if the engine ran out of memory.
        """
        if not prompts:
            return []
        states = [self._state(p) for p in prompts]
        options = states[0].options
        if len({s.options.batch_key() for s in states}) != 1:
            raise InvalidRequestError("prompts batched together must share their sampling settings")
        if not resumable(options):
            should_pause = None
        for state in states:
            state.paused = False
        stepper = _Stepper(states, self._end_tokens, on_chunk, should_stop, should_pause, on_tokens)
        prefix = self._shared_prefix(states)
        try:
            self._generator.generate_batch(
                [list(s.prompt.tokens[len(prefix) :]) + s.generated for s in states],
                **({"static_prompt": list(prefix)} if prefix else {}),
                max_length=max(s.options.max_tokens - s.completion_tokens for s in states),
                end_token=list(self._end_tokens),
                include_prompt_in_result=False,
                callback=stepper,
                **sampling_arguments(options),
            )
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            for state in states:
                state.paused = state.paused or state.finish_reason is None
            raise OutOfMemory(exc, [stepper.outcome(index) for index in range(len(states))]) from exc
        return [stepper.outcome(index) for index in range(len(states))]

    def _shared_prefix(self, states: list[_ItemState]) -> tuple[str, ...]:
        """static_prefix if every prompt of the call starts with it (and goes on past it), else ()."""
        prefix = self.static_prefix
        if prefix and all(
            len(s.prompt.tokens) > len(prefix) and s.prompt.tokens[: len(prefix)] == prefix for s in states
        ):
            return prefix
        return ()

    def resume(self, prompt: EncodedPrompt, token_ids: Sequence[int], text: str) -> Paused | GenerationResult:
        """Go on with a generation another process started: `text` was streamed from `token_ids`.

        The ids are read again through a new detokenizer and stop matcher (which emit the same text
        for the same ids), so a later call continues the text exactly, counting each token once. A
        generation that had already ended (all its tokens, a stop string, or text only its end
        releases) comes back as its result."""
        state = self._state(prompt)
        for token_id in token_ids:
            state.completion_tokens += 1
            state.ids.append(token_id)
            state.generated.append(self.tokenizer.token(token_id))
            state.emit(state.detokenizer.add(token_id), None)
        state.reported = len(state.ids)
        replayed = "".join(state.chunks)
        state.chunks = [text] if text else []
        if state.stops.matched is not None or replayed != text:  # its end's text is logged: it had ended
            state.finish_reason = FinishReason.STOP
        elif state.completion_tokens >= state.options.max_tokens:
            state.finish_reason = FinishReason.LENGTH
        if state.finish_reason is not None:
            if state.completion_tokens >= state.options.max_tokens and state.stops.matched is None:
                state.finish_reason = FinishReason.LENGTH
            return state.result()
        return Paused(state)

    def _state(self, prompt: EncodedPrompt | Paused) -> _ItemState:
        if isinstance(prompt, Paused):
            return prompt.state
        stops = StopMatcher(prompt.request.options.stop)
        return _ItemState(prompt, IncrementalDetokenizer(self.tokenizer.decode), stops)
