"""Going on from logged tokens (a job taken over from a lost worker), and engine calls that run out
of memory: split, each prompt going on where it stood. float32, so greedy outputs do not depend on
the batch (see the README, Performance)."""

from __future__ import annotations

import threading

import pytest

from engine import GenerationRequest, Model, SamplingOptions
from engine.batcher import Batcher
from engine.errors import EngineOutOfMemoryError
from engine.model import Paused
from engine.request import FinishReason, GenerationResult


@pytest.fixture(scope="module")
def tiny32(tiny_dir):
    return Model(tiny_dir, compute_type="float32")


def encode(model: Model, prompt: str, max_tokens: int = 40, **sampling):
    options = SamplingOptions(max_tokens=max_tokens, **({"temperature": 0} | sampling))
    return model.encode(GenerationRequest(prompt=prompt, options=options))


def logged_run(model: Model, prompt) -> tuple[GenerationResult, list[tuple[str, list[int]]]]:
    """A run alone, and its chunks as a worker logs them: (text, the ids generated since the last chunk)."""
    chunks: list[tuple[str, list[int]]] = []
    ids: list[int] = []
    result = model.generate_batch(
        [prompt],
        on_chunk=lambda _i, text: chunks.append((text, list(ids))),
        on_tokens=lambda _i, new: (ids.clear(), ids.extend(new)),
    )[0]
    assert isinstance(result, GenerationResult)
    return result, chunks


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_going_on_from_logged_ids_gives_the_uninterrupted_text(tiny32, cut):
    prompt = encode(tiny32, "The lighthouse keeper walked")
    alone, chunks = logged_run(tiny32, prompt)
    assert sum(len(ids) for _text, ids in chunks) == alone.usage.completion_tokens  # every id is logged once
    logged_text = "".join(text for text, _ids in chunks[:cut])
    logged_ids = [i for _text, ids in chunks[:cut] for i in ids]

    paused = tiny32.resume(prompt, logged_ids, logged_text)
    assert isinstance(paused, Paused) and paused.completion_tokens == len(logged_ids)
    after: list[str] = []
    result = tiny32.generate_batch([paused], on_chunk=lambda _i, text: after.append(text))[0]
    assert result == alone  # same text, finish reason and usage: no token counted twice
    assert logged_text + "".join(after) == alone.response


def test_a_resumed_prompt_batches_with_a_new_one(tiny32):
    prompt, other = encode(tiny32, "A song about rivers", 30), encode(tiny32, "hi there", 12)
    alone, chunks = logged_run(tiny32, prompt)
    other_alone = tiny32.generate_batch([other])[0]
    paused = tiny32.resume(prompt, [i for _t, ids in chunks[:4] for i in ids], "".join(t for t, _ids in chunks[:4]))
    assert tiny32.generate_batch([paused, other]) == [alone, other_alone]


def test_a_generation_logged_to_its_end_comes_back_as_its_result(tiny32):
    prompt = encode(tiny32, "Once upon a time", 20)
    alone, chunks = logged_run(tiny32, prompt)
    assert alone.finish_reason is FinishReason.LENGTH
    ended = tiny32.resume(prompt, [i for _t, ids in chunks for i in ids], alone.response)
    assert ended == alone


class OutOfMemoryOver:
    """The real generator, except that a call of more than `fits` prompts generates a few tokens, then
    fails as CUDA does when memory runs out."""

    def __init__(self, real, fits: int, message: str = "CUDA failed with error out of memory"):
        self.real, self.fits, self.message = real, fits, message
        self.sizes: list[int] = []

    def generate_batch(self, prompts, callback, **arguments):
        self.sizes.append(len(prompts))
        if len(prompts) <= self.fits:
            return self.real.generate_batch(prompts, callback=callback, **arguments)
        steps = 0

        def some_steps(step) -> bool:
            nonlocal steps
            steps += 1
            return callback(step) if steps <= 3 * len(prompts) else True

        self.real.generate_batch(prompts, callback=some_steps, **arguments)
        raise RuntimeError(self.message)


def run_together(batcher: Batcher, prompts) -> tuple[list, list[list[str]]]:
    outcomes: list = [None] * len(prompts)
    chunks: list[list[str]] = [[] for _ in prompts]

    def run(i: int) -> None:
        try:
            outcomes[i] = batcher.run(prompts[i], chunks[i].append)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes, chunks


def test_an_engine_call_out_of_memory_is_split_and_every_prompt_ends_as_alone(tiny_dir):
    model = Model(tiny_dir, compute_type="float32")
    prompts = [encode(model, f"Story number {n} begins", 24) for n in range(4)]
    alone = [model.generate_batch([p])[0] for p in prompts]
    flaky = OutOfMemoryOver(model._generator, fits=1)
    model._generator = flaky
    batcher = Batcher({None: model}, max_batch_size=4, gather_window_s=1.0).start()
    try:
        outcomes, chunks = run_together(batcher, prompts)
    finally:
        batcher.stop()
    assert flaky.sizes[:3] == [4, 2, 1]  # split in halves down to calls that fit
    assert outcomes == alone
    assert ["".join(c) for c in chunks] == [r.response for r in alone]  # no chunk streamed twice


def test_a_prompt_out_of_memory_alone_fails_with_its_code(tiny_dir):
    model = Model(tiny_dir, compute_type="float32")
    model._generator = OutOfMemoryOver(model._generator, fits=0)
    batcher = Batcher({None: model}).start()
    try:
        (outcome,), _chunks = run_together(batcher, [encode(model, "anything")])
    finally:
        batcher.stop()
    assert isinstance(outcome, EngineOutOfMemoryError) and outcome.code == "out_of_memory"
