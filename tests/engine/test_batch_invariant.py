"""Batch-invariant greedy (Batcher batch_invariant, the worker's --batch-invariant), on the real
SmolLM2 int8 model: with int8, a greedy prompt batched with prompts of other lengths can continue
differently than alone (ENGINE-NOTES: 3 of 4 chat prompts changed). With the switch on, a greedy
job's text is the same alone and batched with anything, while equal-length greedy jobs still share
engine calls."""

from __future__ import annotations

import threading

import pytest

from engine import GenerationRequest, Model, SamplingOptions
from engine.batcher import Batcher

TOKENS = 24
GREEDY = [
    "Name three fruits.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
]
NEIGHBOURS = [  # other lengths, greedy too (the same batch key), so without the switch they share calls
    "Write a long, detailed story about winter in a small Norwegian fishing village.",
    "Write a long, detailed story about a jazz musician in New Orleans in the 1920s.",
    "Hi",
]


@pytest.fixture(scope="module")
def smol_int8(smollm2_dir) -> Model:
    return Model(smollm2_dir, compute_type="int8")


def run_together(model: Model, prompts: list[str], batch_invariant: bool) -> tuple[list[str], list[int]]:
    """All prompts handed to one batcher at once (greedy, TOKENS each): their texts, and each call's size."""
    sizes: list[int] = []
    batcher = Batcher(
        {None: model},
        max_batch_size=16,
        gather_window_s=2.0,  # every job is pending before the first call starts
        max_length_spread=64,
        on_batch=sizes.append,
        batch_invariant=batch_invariant,
    ).start()
    texts = [""] * len(prompts)

    def one(n: int) -> None:
        request = GenerationRequest(prompt=prompts[n], options=SamplingOptions(max_tokens=TOKENS, temperature=0))
        texts[n] = batcher.run(model.encode(request), lambda _text: None).response

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    batcher.stop()
    return texts, sizes


def test_greedy_text_is_the_same_alone_and_batched_with_other_lengths(smol_int8):
    alone = [run_together(smol_int8, [prompt], batch_invariant=True)[0][0] for prompt in GREEDY]
    prompts = GREEDY + [GREEDY[0]] + NEIGHBOURS  # a duplicate: the same length, so it may share a call
    texts, sizes = run_together(smol_int8, prompts, batch_invariant=True)
    assert texts[: len(GREEDY)] == alone
    assert texts[len(GREEDY)] == alone[0]
    assert sum(sizes) == len(prompts) and max(sizes) == 2, "only the equal-length pair shared a call"


def test_with_the_prefix_cache_only_prompts_that_begin_alike_share_a_call(tiny_dir):
    """A prompt read with the cached prefix alone must not be read whole when batched (int8 would
    change its text): an equal-length prompt without the prefix runs in a call of its own."""
    model = Model(tiny_dir, compute_type="int8", prefix_cache=True)
    chat = model.encode(GenerationRequest(prompt="Hi", options=SamplingOptions(max_tokens=4, temperature=0)))
    words = 1
    while True:  # a raw prompt (no template, no prefix) of the chat prompt's token length
        raw = GenerationRequest(prompt="x " * words, raw=True, options=SamplingOptions(max_tokens=4, temperature=0))
        if len(model.encode(raw).tokens) >= len(chat.tokens):
            break
        words += 1
    assert len(model.encode(raw).tokens) == len(chat.tokens)
    for invariant, expected in ((True, [1, 1]), (False, [2])):
        sizes: list[int] = []
        batcher = Batcher({None: model}, gather_window_s=2.0, on_batch=sizes.append, batch_invariant=invariant)
        batcher.start()
        jobs = [threading.Thread(target=batcher.run, args=(p, lambda _t: None)) for p in (chat, model.encode(raw))]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(60)
        batcher.stop()
        assert sorted(sizes) == expected, invariant
