"""The shared-prefix cache (Model prefix_cache: CTranslate2's static_prompt for the chat template's
fixed start): used only when every prompt of a call begins with it, on by default only where the
output stays the same (float32), and there greedy outputs with it equal those without it."""

from __future__ import annotations

import pytest

from engine import GenerationRequest, Message, Model, SamplingOptions

PROMPTS = ["Hi", "Name three fruits.", "Write a long, detailed story about a lighthouse keeper and his dog."]


class CallSpy:
    """Wraps a Generator, noting the keyword arguments of each generate_batch call."""

    def __init__(self, generator):
        self.generator = generator
        self.calls: list[dict] = []

    def generate_batch(self, prompts, **kwargs):
        self.calls.append(kwargs)
        return self.generator.generate_batch(prompts, **kwargs)


def encode(model: Model, prompt: str | None = None, messages=None, max_tokens: int = 12):
    options = SamplingOptions(max_tokens=max_tokens, temperature=0)
    return model.encode(GenerationRequest(prompt=prompt, messages=messages, options=options))


@pytest.fixture(scope="module")
def pair(lora_models) -> tuple[Model, Model]:
    """The tiny float32 Llama whose logits are spread out (a token read or dropped changes its output)."""
    base = lora_models.base_dir
    return Model(base, compute_type="float32"), Model(base, compute_type="float32", prefix_cache=True)


def test_the_fixed_prefix_is_the_default_system_turn_up_to_the_next_turn_marker(pair):
    _without, with_cache = pair
    prefix = with_cache.static_prefix
    assert prefix[0] == "<|im_start|>" and prefix[-1] == "<|im_start|>" and "<|im_end|>" in prefix
    for prompt in PROMPTS:
        assert encode(with_cache, prompt).tokens[: len(prefix)] == prefix
    own_system = [Message("system", "You are a pirate."), Message("user", "Hi")]
    assert encode(with_cache, messages=own_system).tokens[: len(prefix)] != prefix


def test_greedy_outputs_with_the_cache_equal_those_without_alone_and_batched(pair):
    without, with_cache = pair
    spy = with_cache._generator = CallSpy(with_cache._generator)
    for prompt in PROMPTS:
        alone = without.generate_batch([encode(without, prompt)])
        assert with_cache.generate_batch([encode(with_cache, prompt)]) == alone
        assert len(set(alone[0].response)) > 3, "a varied output, that a changed input would change"
    assert [len(call["static_prompt"]) for call in spy.calls] == [len(with_cache.static_prefix)] * len(PROMPTS)
    batched = [encode(with_cache, p) for p in PROMPTS]
    assert with_cache.generate_batch(batched) == without.generate_batch([encode(without, p) for p in PROMPTS])
    assert "static_prompt" in spy.calls[-1]


def test_a_call_with_a_prompt_of_another_start_reads_every_prompt_whole(pair):
    without, with_cache = pair
    spy = with_cache._generator = CallSpy(with_cache._generator)
    own_system = [Message("system", "You are a pirate."), Message("user", "Hi")]
    prompts = [encode(with_cache, PROMPTS[0]), encode(with_cache, messages=own_system)]
    assert with_cache.generate_batch(prompts) == without.generate_batch(prompts)
    assert "static_prompt" not in spy.calls[-1]


def test_by_default_the_cache_is_on_for_float32_only(tiny_dir):
    assert Model(tiny_dir, compute_type="float32", prefix_cache=None).static_prefix
    assert Model(tiny_dir, compute_type="int8", prefix_cache=None).static_prefix == ()
    assert Model(tiny_dir, compute_type="int8", prefix_cache=True).static_prefix
