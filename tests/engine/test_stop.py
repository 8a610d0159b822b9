"""Stop sequences: the matcher alone, on chunk boundaries, and inside real engine calls."""

import pytest

from engine import FinishReason, GenerationRequest, Model, SamplingOptions
from engine.stop import StopMatcher
from tests.helpers import generate


def run(stops, chunks):
    """What a reader sees chunk by chunk, and the matched stop string."""
    matcher = StopMatcher(stops)
    seen = [matcher.feed(chunk) for chunk in chunks]
    seen.append(matcher.feed("", final=True))
    return seen, matcher.matched


def test_text_without_a_stop_string_passes_through_unchanged():
    seen, matched = run(["END"], ["Hello", " world", "!"])
    assert seen == ["Hello", " world", "!", ""]
    assert matched is None


def test_the_stop_string_and_everything_after_it_are_dropped():
    seen, matched = run(["END"], ["one two", " END three", " four"])
    assert "".join(seen) == "one two "
    assert matched == "END"
    assert seen[2:] == ["", ""]  # nothing after the match, not even on the final flush


def test_a_stop_string_split_across_chunks_is_held_back_and_never_emitted():
    seen, matched = run(["<stop>"], ["abc<", "st", "op>def"])
    assert seen == ["abc", "", "", ""]
    assert matched == "<stop>"


def test_a_held_tail_that_turns_out_not_to_be_a_stop_string_is_released():
    seen, matched = run(["<stop>"], ["abc<", "st", "ar>"])
    assert seen == ["abc", "", "<star>", ""]
    assert matched is None


def test_a_partial_stop_string_at_the_end_is_released_as_text():
    seen, matched = run(["world!"], ["hello wor"])
    assert seen == ["hello ", "wor"]
    assert matched is None


def test_the_earliest_occurrence_wins_among_several_stop_strings():
    seen, matched = run(["CD", "B"], ["ABCD"])
    assert "".join(seen) == "A" and matched == "B"
    seen, matched = run(["BCD", "C"], ["AB", "CD"])
    assert "".join(seen) == "A" and matched == "BCD"


def test_a_stop_string_at_the_very_start_gives_an_empty_response():
    seen, matched = run(["Hi"], ["H", "i there"])
    assert "".join(seen) == "" and matched == "Hi"


def test_overlapping_prefixes_hold_back_the_longest_candidate():
    # "aab" starts inside "aaab": the held tail must let the match begin one character later.
    seen, matched = run(["aab"], ["a", "a", "a", "b", "c"])
    assert "".join(seen) == "a" and matched == "aab"


def test_options_take_a_single_string_or_a_list_and_keep_a_tuple():
    assert SamplingOptions(stop="###").stop == ("###",)
    assert SamplingOptions(stop=["a", "b"]).stop == ("a", "b")
    request = GenerationRequest(prompt="x", options=SamplingOptions(stop=["a", "b"]))
    assert GenerationRequest.from_dict(request.to_dict()) == request
    # Stop strings are applied per prompt: they do not split batches.
    assert SamplingOptions(temperature=0, stop=["a"]).batch_key() == SamplingOptions(temperature=0).batch_key()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Model(tiny_dir)


def test_the_engine_ends_at_a_stop_string_and_leaves_it_out(tiny):
    options = SamplingOptions(temperature=0, max_tokens=40)
    free = generate(tiny, GenerationRequest(prompt="tell me", options=options)).response
    assert len(free) > 20
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # three characters from the middle
    expected = free[: free.find(stop)]
    request = GenerationRequest(prompt="tell me", options=SamplingOptions(temperature=0, max_tokens=40, stop=[stop]))
    chunks: list[str] = []
    result = tiny.generate_batch([tiny.encode(request)], on_chunk=lambda _i, text: chunks.append(text))[0]
    assert result.response == expected
    assert "".join(chunks) == expected  # nothing streamed that the stop string later took back
    assert result.finish_reason is FinishReason.STOP
    assert result.usage.completion_tokens < 40


def test_in_a_batch_only_the_prompt_with_the_stop_string_ends_early(tiny):
    options = SamplingOptions(temperature=0, max_tokens=30)
    free = generate(tiny, GenerationRequest(prompt="one", options=options)).response
    stop = free[5:8]
    prompts = [
        tiny.encode(
            GenerationRequest(prompt="one", options=SamplingOptions(temperature=0, max_tokens=30, stop=[stop]))
        ),
        tiny.encode(GenerationRequest(prompt="one", options=options)),
    ]
    stopped, full = tiny.generate_batch(prompts)
    assert stopped.response == free[: free.find(stop)] and stopped.finish_reason is FinishReason.STOP
    assert full.response == free and full.finish_reason is FinishReason.LENGTH


def test_a_stop_string_never_produced_changes_nothing(tiny):
    options = SamplingOptions(temperature=0, max_tokens=20)
    plain = generate(tiny, GenerationRequest(prompt="same", options=options))
    stopped = generate(
        tiny,
        GenerationRequest(prompt="same", options=SamplingOptions(temperature=0, max_tokens=20, stop=["\x00never"])),
    )
    assert stopped.response == plain.response and stopped.finish_reason is FinishReason.LENGTH
