import pytest

from engine import (
    ContextLengthExceededError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    Message,
    Model,
    ModelNotFoundError,
    SamplingOptions,
)
from engine.model import Paused
from tests.helpers import generate

GREEDY = SamplingOptions(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Model(tiny_dir)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Model(smollm2_dir)


def test_greedy_answer_of_the_real_model_stops_at_end_of_turn(smol):
    result = generate(smol, GenerationRequest(prompt="What is the capital of France?", options=GREEDY))
    assert "Paris" in result.response
    assert result.finish_reason is FinishReason.STOP
    assert 0 < result.usage.completion_tokens < GREEDY.max_tokens
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_max_tokens_bounds_the_completion(tiny):
    result = generate(tiny, GenerationRequest(prompt="hello", options=SamplingOptions(temperature=0, max_tokens=7)))
    assert result.usage.completion_tokens == 7
    assert result.finish_reason is FinishReason.LENGTH


def test_streamed_chunks_concatenate_to_the_generated_response(tiny, smol):
    for model in (tiny, smol):
        request = GenerationRequest(prompt="Write a short poem about the sea, with emoji.", options=GREEDY)
        chunks: list[str] = []
        prompt = model.encode(request)
        result = model.generate_batch([prompt], on_chunk=lambda _i, text, seen=chunks: seen.append(text))[0]
        assert len(chunks) > 1
        assert "".join(chunks) == result.response == generate(model, request).response
        assert result.response == model.tokenizer.decode(
            model.tokenizer._tokenizer.encode(result.response, add_special_tokens=False).ids
        )


def test_chat_template_is_applied_unless_raw(smol):
    tokenizer = smol.tokenizer
    templated = tokenizer.render(GenerationRequest(prompt="Hi there"))
    assert templated.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    messages = (Message("system", "Be brief."), Message("user", "Hi"))
    rendered = tokenizer.render(GenerationRequest(messages=messages))
    assert (
        rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.render(GenerationRequest(prompt="Hi there", raw=True)) == "Hi there"
    with pytest.raises(InvalidRequestError):
        tokenizer.render(GenerationRequest(messages=messages, raw=True))


def test_prompt_plus_max_tokens_over_the_context_is_a_clear_error(tiny):
    assert tiny.max_context == 512
    long_prompt = "word " * 600
    with pytest.raises(ContextLengthExceededError, match="over this model's context of 512"):
        tiny.encode(GenerationRequest(prompt=long_prompt, options=GREEDY))
    short = GenerationRequest(prompt="hi", options=SamplingOptions(max_tokens=510))
    with pytest.raises(ContextLengthExceededError):
        tiny.encode(short)
    # The model still serves after refusing.
    assert generate(tiny, GenerationRequest(prompt="hi", options=GREEDY)).usage.completion_tokens > 0


def test_a_batch_stops_each_prompt_at_its_own_max_tokens(tiny):
    prompts = [
        tiny.encode(GenerationRequest(prompt=text, options=SamplingOptions(temperature=0, max_tokens=n)))
        for text, n in [("a", 3), ("a longer prompt here", 11), ("b", 6)]
    ]
    seen: dict[int, list[str]] = {0: [], 1: [], 2: []}
    results = tiny.generate_batch(prompts, on_chunk=lambda i, text: seen[i].append(text))
    assert [r.usage.completion_tokens for r in results] == [3, 11, 6]
    assert [r.finish_reason for r in results] == [FinishReason.LENGTH] * 3
    assert ["".join(seen[i]) for i in range(3)] == [r.response for r in results]


def test_a_batch_refuses_mixed_sampling_settings(tiny):
    greedy = tiny.encode(GenerationRequest(prompt="a", options=GREEDY))
    sampled = tiny.encode(GenerationRequest(prompt="a", options=SamplingOptions(temperature=0.7)))
    with pytest.raises(InvalidRequestError, match="share their sampling settings"):
        tiny.generate_batch([greedy, sampled])


def test_should_stop_cancels_one_prompt_alone(tiny):
    options = SamplingOptions(temperature=0, max_tokens=20)
    prompts = [tiny.encode(GenerationRequest(prompt=p, options=options)) for p in ("one", "two")]
    counts = {0: 0, 1: 0}

    def on_chunk(i, _text):
        counts[i] += 1

    results = tiny.generate_batch(prompts, on_chunk=on_chunk, should_stop=lambda i: i == 0)
    assert results[0].finish_reason is FinishReason.CANCELLED
    assert results[0].usage.completion_tokens == 1
    assert results[1].finish_reason is FinishReason.LENGTH
    assert results[1].usage.completion_tokens == 20


def test_a_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="genqueue model prepare"):
        Model(tmp_path / "nothing-here")


def test_every_sampling_setting_and_the_variant_are_in_the_batch_key():
    base = SamplingOptions(temperature=0.7, top_p=0.9, top_k=5)
    variants = [
        SamplingOptions(temperature=0.8, top_p=0.9, top_k=5),
        SamplingOptions(temperature=0.7, top_p=0.8, top_k=5),
        SamplingOptions(temperature=0.7, top_p=0.9, top_k=6),
        SamplingOptions(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.2),
        SamplingOptions(temperature=0.7, top_p=0.9, top_k=5, lora="x"),
    ]
    assert all(v.batch_key() != base.batch_key() for v in variants)
    assert SamplingOptions(temperature=0.7, top_p=0.9, top_k=5, max_tokens=3).batch_key() == base.batch_key()
    # Greedy requests batch together whatever their temperature, but not across penalties or variants.
    greedy = [SamplingOptions(temperature=0), SamplingOptions(top_k=1), SamplingOptions(top_p=0)]
    assert len({g.batch_key() for g in greedy}) == 1
    assert SamplingOptions(temperature=0, repetition_penalty=1.5).batch_key() != greedy[0].batch_key()
    assert SamplingOptions(temperature=0, lora="x").batch_key() != greedy[0].batch_key()


def test_sampling_arguments_map_each_option_to_ctranslate2():
    from engine.model import sampling_arguments

    assert sampling_arguments(SamplingOptions(temperature=0, repetition_penalty=1.3)) == {
        "sampling_topk": 1,
        "repetition_penalty": 1.3,
    }
    assert sampling_arguments(SamplingOptions(temperature=0.7, top_p=1.5, top_k=None)) == {
        "sampling_topk": 0,
        "sampling_temperature": 0.7,
        "sampling_topp": 1.0,
        "repetition_penalty": 1.0,
    }


def test_repetition_penalty_changes_the_greedy_output_as_ctranslate2_defines_it(tiny):
    prompt = tiny.encode(GenerationRequest(prompt="hello", options=SamplingOptions(temperature=0, max_tokens=12)))
    penalized = GenerationRequest(
        prompt="hello", options=SamplingOptions(temperature=0, max_tokens=12, repetition_penalty=2)
    )
    direct = tiny._generator.generate_batch(
        [list(prompt.tokens)],
        max_length=12,
        sampling_topk=1,
        repetition_penalty=2.0,
        include_prompt_in_result=False,
        end_token=tiny.tokenizer.end_tokens,
    )[0].sequences_ids[0]
    assert generate(tiny, penalized).response == tiny.tokenizer.decode(direct)
    assert generate(tiny, penalized).response != generate(tiny, prompt.request).response


@pytest.fixture(scope="module")
def tiny32(tiny_dir):
    # float32: a prompt's greedy output does not depend on what it is batched with (see README, Performance).
    return Model(tiny_dir, compute_type="float32")


def test_a_paused_batch_goes_on_exactly_where_it_stopped(tiny32):
    def encode(text: str, max_tokens: int):
        options = SamplingOptions(temperature=0, max_tokens=max_tokens)
        return tiny32.encode(GenerationRequest(prompt=text, options=options))

    first = [encode("a story about the sea", 30), encode("hi", 12)]
    late = encode("a later prompt, longer than the others are", 20)
    alone = [tiny32.generate_batch([p])[0] for p in (*first, late)]

    asked = 0

    def pause_after_a_few_tokens() -> bool:
        nonlocal asked
        asked += 1
        return asked > 10

    seen: dict[int, list[str]] = {0: [], 1: [], 2: []}
    paused = tiny32.generate_batch(
        first, on_chunk=lambda i, t: seen[i].append(t), should_pause=pause_after_a_few_tokens
    )
    assert all(isinstance(p, Paused) for p in paused)
    for p, prompt in zip(paused, first, strict=True):
        assert 0 < p.completion_tokens < prompt.request.options.max_tokens
        assert p.length == len(prompt.tokens) + p.completion_tokens
    assert all(alone[i].response.startswith("".join(seen[i])) for i in range(2))

    # Go on with the paused prompts and a new one in one call: each ends as it would have alone,
    # and the chunks of before and after the pause add up to the response.
    results = tiny32.generate_batch([*paused, late], on_chunk=lambda i, t: seen[i].append(t))
    assert results == alone
    assert ["".join(seen[i]) for i in range(3)] == [r.response for r in results]
