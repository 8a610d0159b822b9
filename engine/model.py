"""One prepared model: a CTranslate2 Generator and its tokenizer, built once, used for every request."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ctranslate2

from engine.detokenize import IncrementalDetokenizer
from engine.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from engine.request import FinishReason, GenerationRequest, GenerationResult, SamplingOptions, Usage
from engine.stop import StopMatcher
from engine.tokenizer import ChatTokenizer
from engine.tools import parse_tool_calls

log = logging.getLogger(__name__)

METADATA_FILE = "genqueue.json"
DEFAULT_MAX_CONTEXT = 4096  # tokens, for a converted model that did not record its own
DEFAULT_COMPUTE_TYPES = {"cpu": "int8", "cuda": "int8_float16"}

# on_chunk(index, text) gets each new piece of text of the index-th prompt of a batch;
# should_stop(index) is asked after each token and ends that prompt alone when it answers True;
# should_pause() is asked after each token too, and pauses the prompts still running when it answers True.
ChunkCallback = Callable[[int, str], None]
StopCallback = Callable[[int], bool]
PauseCallback = Callable[[], bool]


@dataclass(frozen=True)
class EncodedPrompt:
    """A request checked against the model and turned into the token strings CTranslate2 takes."""

    request: GenerationRequest
    tokens: tuple[str, ...]


@dataclass
class _ItemState:
    prompt: EncodedPrompt
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    chunks: list[str] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)  # token strings, to go on from after a pause
    paused: bool = False


def resumable(options: SamplingOptions) -> bool:
    """Whether a paused generation with these options goes on exactly as it would have.

    Going on feeds the generated tokens back as part of the prompt. CTranslate2's repetition penalty
    counts generated tokens but not the prompt, so a penalized generation would change: never pause one.
    """
    return getattr(options, "repetition_penalty", 1.0) == 1.0


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


class Model:
    """Loads a prepared model directory once; generates for one request or a batch of them.

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
    ):
        self.model_dir = Path(model_dir)
        self.lora = lora  # the LoRA variant name this directory holds (requests must ask for it), or None
        if not (self.model_dir / "model.bin").is_file():
            raise ModelNotFoundError(f"no prepared model at {self.model_dir}; run 'genqueue model prepare' first")
        metadata_path = self.model_dir / METADATA_FILE
        self.metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        self.name = self.metadata.get("name", self.model_dir.name)
        self.max_context = int(self.metadata.get("max_context", DEFAULT_MAX_CONTEXT))
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
        log.info("loaded model %s on %s (%s)", self.name, device, self.compute_type)

    def encode(self, request: GenerationRequest) -> EncodedPrompt:
        """Render and tokenize a request; raise InvalidRequestError if it cannot run as asked."""
        if request.options.lora != self.lora:
            raise InvalidRequestError(
                f"this model serves lora {self.lora!r}, the request asks for {request.options.lora!r}"
            )
        tokens = self.tokenizer.encode(request)
        if not tokens:
            raise InvalidRequestError("the prompt is empty after tokenization")
        needed = len(tokens) + request.options.max_tokens
        if needed > self.max_context:
            raise ContextLengthExceededError(
                f"prompt ({len(tokens)} tokens) plus max_tokens ({request.options.max_tokens}) is "
                f"{needed} tokens, over this model's context of {self.max_context}"
            )
        return EncodedPrompt(request=request, tokens=tuple(tokens))

    def generate_batch(
        self,
        prompts: Sequence[EncodedPrompt | Paused],
        on_chunk: ChunkCallback | None = None,
        should_stop: StopCallback | None = None,
        should_pause: PauseCallback | None = None,
    ) -> list[GenerationResult | BaseException | Paused]:
        """Generate for several prompts in one engine call; they must share their sampling settings.

        Each prompt stops at its own end token or max_tokens. The result at index i is the i-th
        prompt's GenerationResult, or the exception its callbacks raised (which stopped it alone),
        or, once should_pause answered True, a Paused prompt: passed to a later call (with other
        prompts, say), it goes on from its last token with the same chunks and counts.
        """
        if not prompts:
            return []
        states = [
            p.state
            if isinstance(p, Paused)
            else _ItemState(p, IncrementalDetokenizer(self.tokenizer.decode), StopMatcher(p.request.options.stop))
            for p in prompts
        ]
        options = [s.prompt.request.options for s in states]
        if len({o.batch_key() for o in options}) != 1:
            raise InvalidRequestError("prompts batched together must share their sampling settings")
        # The callbacks must not reference self: CTranslate2 drops the callback in its own thread after
        # the call, and if that dropped the last reference to this Model, its Generator would be
        # destroyed from the thread it has to join ("Resource deadlock avoided": abort).
        end_tokens = self._end_tokens
        if should_pause is not None and not resumable(options[0]):
            should_pause = None
        for state in states:
            state.paused = False

        def emit(state: _ItemState, index: int, text: str, final: bool = False) -> None:
            text = state.stops.feed(text, final)  # holds back what may begin a stop string, until final
            if text:
                state.chunks.append(text)
                if on_chunk is not None:
                    on_chunk(index, text)

        def on_step(step) -> bool:
            state = states[step.batch_id]
            if state.finish_reason is not None or state.paused:
                return True
            try:
                if step.token in end_tokens:
                    state.finish_reason = FinishReason.STOP
                    return True
                state.completion_tokens += 1
                state.generated.append(step.token)
                emit(state, step.batch_id, state.detokenizer.add(step.token_id))
                if state.stops.matched is not None:
                    state.finish_reason = FinishReason.STOP
                elif state.completion_tokens >= state.prompt.request.options.max_tokens:
                    state.finish_reason = FinishReason.LENGTH
                elif should_stop is not None and should_stop(step.batch_id):
                    state.finish_reason = FinishReason.CANCELLED
                elif step.is_last:
                    state.finish_reason = FinishReason.LENGTH
                elif should_pause is not None and should_pause():
                    state.paused = True
                return state.finish_reason is not None or state.paused
            except BaseException as exc:  # a failing callback ends its own prompt, not the batch
                state.error = exc
                state.finish_reason = FinishReason.CANCELLED
                return True

        self._generator.generate_batch(
            [list(s.prompt.tokens) + s.generated for s in states],
            max_length=max(o.max_tokens - s.completion_tokens for o, s in zip(options, states, strict=True)),
            end_token=list(self._end_tokens),
            include_prompt_in_result=False,
            callback=on_step,
            **sampling_arguments(options[0]),
        )

        results: list[GenerationResult | BaseException | Paused] = []
        for index, state in enumerate(states):
            if state.paused and state.error is None:
                results.append(Paused(state))
                continue
            if state.error is None:
                try:
                    emit(state, index, state.detokenizer.flush(), final=True)
                    if state.stops.matched is not None:
                        state.finish_reason = FinishReason.STOP
                except BaseException as exc:
                    state.error = exc
            if state.error is not None:
                results.append(state.error)
                continue
            response = "".join(state.chunks)
            results.append(
                GenerationResult(
                    response=response,
                    usage=Usage(len(state.prompt.tokens), state.completion_tokens),
                    finish_reason=state.finish_reason or FinishReason.STOP,
                    tool_calls=tuple(parse_tool_calls(response, state.prompt.request.tools)),
                )
            )
        return results

    def generate(self, request: GenerationRequest) -> GenerationResult:
        result = self.generate_batch([self.encode(request)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield text chunks as they are generated; their concatenation is the response.

        The generator's return value (StopIteration.value) is the GenerationResult. Closing the
        generator early stops the generation after the current token.
        """
        prompt = self.encode(request)
        chunks: queue.Queue = queue.Queue()
        closed = threading.Event()
        finished = object()

        def run() -> None:
            try:
                outcome = self.generate_batch(
                    [prompt], on_chunk=lambda _i, text: chunks.put(text), should_stop=lambda _i: closed.is_set()
                )[0]
            except BaseException as exc:
                outcome = exc
            chunks.put((finished, outcome))

        threading.Thread(target=run, name="genqueue-stream", daemon=True).start()
        try:
            while True:
                item = chunks.get()
                if isinstance(item, tuple) and item[0] is finished:
                    if isinstance(item[1], BaseException):
                        raise item[1]
                    return item[1]
                yield item
        finally:
            closed.set()
