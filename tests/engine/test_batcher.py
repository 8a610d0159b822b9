"""Batching correctness, not speed: jobs batched together end exactly as they would alone.

The models run in float32 here. With int8, CTranslate2's greedy output for a prompt can depend on
the prompts of other lengths batched with it (see the README, Performance); in float32 batching
changes scores only by rounding (about 1e-7 of a log-probability), far below the gap between two
candidate tokens.
"""

from __future__ import annotations

import threading
import time

import pytest

from engine import FinishReason, GenerationRequest, Message, Model, SamplingOptions
from engine.batcher import Batcher
from engine.model import Paused

JOIN_TIMEOUT_S = 120


class RecordingModel:
    """The real model, noting which prompts each engine call held."""

    def __init__(self, model: Model):
        self.model = model
        self.calls: list[list] = []
        self.spans: list[tuple[float, float]] = []  # when each call started and returned

    def generate_batch(self, prompts, **callbacks):
        self.calls.append(list(prompts))
        started = time.monotonic()
        try:
            return self.model.generate_batch(prompts, **callbacks)
        finally:
            self.spans.append((started, time.monotonic()))


@pytest.fixture(scope="module")
def tiny32(tiny_dir):
    return Model(tiny_dir, compute_type="float32")


@pytest.fixture(scope="module")
def smol32(smollm2_dir):
    return Model(smollm2_dir, compute_type="float32")


def request(prompt: str | None = None, max_tokens: int = 16, messages=None, **sampling) -> GenerationRequest:
    options = SamplingOptions(max_tokens=max_tokens, **({"temperature": 0} | sampling))
    return GenerationRequest(prompt=prompt, messages=messages, options=options)


class Job:
    """One job thread handing its prompt to the batcher, as a worker's job thread does."""

    def __init__(self, batcher: Batcher, prompt, stop_after_chunks: int | None = None, token_delay_s: float = 0):
        self.prompt = prompt
        self.chunks: list[str] = []
        self.tokens = 0  # as counted by the engine asking whether to stop
        self.result = None
        self.stop_after_chunks = stop_after_chunks
        self.token_delay_s = token_delay_s  # slows its whole engine call down, to time arrivals in tests
        self._batcher = batcher
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.result = self._batcher.run(self.prompt, self.chunks.append, self._should_stop)

    def _should_stop(self) -> bool:
        self.tokens += 1
        time.sleep(self.token_delay_s)
        return self.stop_after_chunks is not None and len(self.chunks) >= self.stop_after_chunks

    def start(self) -> Job:
        self._thread.start()
        return self

    def join(self):
        self._thread.join(JOIN_TIMEOUT_S)
        assert not self._thread.is_alive(), "the job did not end"
        return self.result


def run_together(jobs: list[Job]) -> list[Job]:
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    return jobs


def alone(model: Model, prompt):
    return model.generate_batch([prompt])[0]


def wait_for(condition, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_jobs_batched_together_give_exactly_their_outputs_alone(smol32):
    prompts = [
        smol32.encode(r)
        for r in (
            request("What is the capital of France?", max_tokens=40),  # ends at its end-of-turn token
            request("Write a poem about the sea.", max_tokens=20),  # ends at max_tokens
            request("hi", max_tokens=3),
            request(
                messages=(Message("system", "Answer in one word."), Message("user", "Name a color.")), max_tokens=12
            ),
            request("List three fruits, then explain why each is healthy.", max_tokens=30),
        )
    ]
    expected = [alone(smol32, p) for p in prompts]
    assert len({r.response for r in expected}) == len(prompts)
    model = RecordingModel(smol32)
    # A long gather window and room for exactly these jobs: they start as one engine call.
    batcher = Batcher({None: model}, max_batch_size=len(prompts), gather_window_s=30, max_length_spread=64).start()
    jobs = run_together([Job(batcher, p) for p in prompts])

    assert [len(call) for call in model.calls] == [len(prompts)]
    assert [job.result for job in jobs] == expected
    assert {r.finish_reason for r in expected} == {FinishReason.STOP, FinishReason.LENGTH}
    for job in jobs:  # each job's chunks are its own, in order
        assert "".join(job.chunks) == job.result.response


def test_jobs_with_other_sampling_settings_run_in_their_own_engine_calls(tiny32):
    greedy = [tiny32.encode(request(p, max_tokens=n)) for p, n in [("one", 12), ("two words", 9), ("three", 15)]]
    sampled = [tiny32.encode(request(p, max_tokens=10, temperature=0.9, top_k=5)) for p in ("four", "five")]
    hotter = [tiny32.encode(request("six", max_tokens=10, temperature=1.5))]
    model = RecordingModel(tiny32)
    # All six arrive within the window; each group of settings then starts without waiting long.
    batcher = Batcher({None: model}, max_batch_size=6, gather_window_s=1).start()
    jobs = run_together([Job(batcher, p) for p in greedy + sampled + hotter])

    keys_per_call = [{p.request.options.batch_key() for p in call} for call in model.calls]
    assert all(len(keys) == 1 for keys in keys_per_call)  # every call runs with one set of settings
    assert sorted(len(call) for call in model.calls) == [1, 2, 3]
    assert [job.result for job in jobs[:3]] == [alone(tiny32, p) for p in greedy]
    for job in jobs[3:]:
        assert job.result.usage.completion_tokens <= 10
        assert "".join(job.chunks) == job.result.response


def test_a_job_arriving_while_a_batch_runs_joins_it_and_every_output_stays_exact(tiny32):
    running = [tiny32.encode(request(p, max_tokens=300)) for p in ("a long story", "another long story")]
    late = tiny32.encode(request("a late one", max_tokens=40))
    expected = [alone(tiny32, p) for p in (*running, late)]
    model = RecordingModel(tiny32)
    # The first two start together (the gather window ends before the batch is full).
    batcher = Batcher({None: model}, max_batch_size=4, gather_window_s=1, max_length_spread=32).start()
    first = [Job(batcher, p).start() for p in running]
    wait_for(lambda: len(first[0].chunks) >= 2)
    newcomer = Job(batcher, late).start()
    results = [job.join() for job in (*first, newcomer)]

    assert results == expected
    assert all("".join(job.chunks) == job.result.response for job in (*first, newcomer))
    # The running call was paused and went on together with the newcomer.
    assert model.calls[0] == running
    assert [isinstance(p, Paused) for p in model.calls[1]] == [True, True, False] and model.calls[1][2] == late


def test_jobs_arriving_one_after_another_join_a_batch_in_one_pause(tiny32):
    running = tiny32.encode(request("the first job", max_tokens=100))
    later = [tiny32.encode(request(p, max_tokens=30)) for p in ("second job", "third job", "fourth job")]
    model = RecordingModel(tiny32)
    # A paused call waits while jobs keep coming (none for a second ends the wait).
    batcher = Batcher({None: model}, max_batch_size=8, gather_window_s=0, join_gap_s=1, join_window_s=10).start()
    first = Job(batcher, running, token_delay_s=0.01).start()
    wait_for(lambda: first.tokens >= 2)
    jobs = []
    for prompt in later:
        jobs.append(Job(batcher, prompt).start())
        time.sleep(0.02)
    results = [job.join() for job in (first, *jobs)]

    assert [[isinstance(p, Paused) for p in call] for call in model.calls] == [[False], [True, False, False, False]]
    assert results == [alone(tiny32, p) for p in (running, *later)]


def test_a_job_too_unlike_the_running_batch_waits_for_it_instead(tiny32):
    running = tiny32.encode(request("short", max_tokens=200))
    long_prompt = tiny32.encode(request("a much longer prompt " * 12, max_tokens=20))
    model = RecordingModel(tiny32)
    batcher = Batcher({None: model}, max_batch_size=4, gather_window_s=0, max_length_spread=16).start()
    first = Job(batcher, running).start()
    wait_for(lambda: len(first.chunks) >= 2)
    newcomer = Job(batcher, long_prompt).start()
    assert [first.join(), newcomer.join()] == [alone(tiny32, running), alone(tiny32, long_prompt)]
    assert model.calls == [[running], [long_prompt]]  # no pause: the newcomer ran next


def test_a_batch_takes_newcomers_only_while_re_reading_costs_it_few_steps(tiny32):
    # Same-length prompts: the spread of lengths is what the running job generated, within the limit of
    # 60 throughout, so what refuses the last newcomer is the cost of pausing (the steps re-read).
    first, second, third = [tiny32.encode(request(p, max_tokens=80)) for p in ("job one", "job two", "job six")]
    assert len({len(p.tokens) for p in (first, second, third)}) == 1
    model = RecordingModel(tiny32)
    batcher = Batcher({None: model}, max_batch_size=4, gather_window_s=0, max_length_spread=60).start()
    running = Job(batcher, first, token_delay_s=0.015).start()
    wait_for(lambda: running.tokens >= 5)
    joins = Job(batcher, second).start()  # pausing costs about 5 steps: it joins
    wait_for(lambda: running.tokens >= 59)
    waits = Job(batcher, third).start()  # about 5 steps spent, and about 58 more would pass 60: it waits
    results = [job.join() for job in (running, joins, waits)]

    assert [[isinstance(p, Paused) for p in call] for call in model.calls] == [[False], [True, False], [False]]
    assert model.calls[2] == [third]
    assert results == [alone(tiny32, p) for p in (first, second, third)]


def test_with_two_engine_replicas_a_job_that_cannot_join_runs_beside_the_batch(tiny_dir):
    model = Model(tiny_dir, compute_type="float32", inter_threads=2)  # two replicas, one copy of the weights
    greedy = model.encode(request("a long greedy job", max_tokens=200))
    sampled = model.encode(request("a sampled one", max_tokens=20, temperature=0.8))
    recorder = RecordingModel(model)
    batcher = Batcher({None: recorder}, max_batch_size=4, gather_window_s=0, replicas=2).start()
    first = Job(batcher, greedy, token_delay_s=0.005).start()
    wait_for(lambda: first.tokens >= 2)
    other = Job(batcher, sampled).start()
    assert other.join().usage.completion_tokens <= 20
    assert first.join() == alone(model, greedy)
    assert recorder.calls == [[greedy], [sampled]]
    (first_start, first_end), (other_start, _) = sorted(recorder.spans)
    assert first_start < other_start < first_end  # it did not wait for the running call


def test_a_cancelled_job_in_a_batch_stops_alone(tiny32):
    prompts = [tiny32.encode(request(p, max_tokens=60)) for p in ("first job", "second job", "third job")]
    expected = [alone(tiny32, p) for p in prompts]
    model = RecordingModel(tiny32)
    batcher = Batcher({None: model}, max_batch_size=3, gather_window_s=30).start()
    jobs = [Job(batcher, prompts[0]), Job(batcher, prompts[1], stop_after_chunks=5), Job(batcher, prompts[2])]
    results = [job.result for job in run_together(jobs)]

    assert [len(call) for call in model.calls] == [3]
    assert results[1].finish_reason is FinishReason.CANCELLED
    assert results[1].usage.completion_tokens == 5
    assert expected[1].response.startswith(results[1].response)
    assert [results[0], results[2]] == [expected[0], expected[2]]


def test_a_job_cancelled_before_its_batch_starts_takes_no_slot(tiny32):
    prompts = [tiny32.encode(request(p, max_tokens=8)) for p in ("kept", "cancelled")]
    model = RecordingModel(tiny32)
    batcher = Batcher({None: model}, max_batch_size=2, gather_window_s=30).start()
    jobs = [Job(batcher, prompts[0]), Job(batcher, prompts[1], stop_after_chunks=0)]
    kept, cancelled = [job.result for job in run_together(jobs)]
    assert model.calls == [[prompts[0]]]
    assert cancelled.finish_reason is FinishReason.CANCELLED and cancelled.usage.completion_tokens == 0
    assert kept == alone(tiny32, prompts[0])
