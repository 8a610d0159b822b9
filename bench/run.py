"""genqueue's benchmarks: the full stack against the engine called directly, measured in one run.

    python bench/run.py 2            # one benchmark (1 to 9)
    python bench/run.py all          # all nine, one after the other

1 to 6 start their own stack on loopback (Redis, one worker process, the API under gunicorn; see
bench/harness.py), run their baseline in the same run (alternating with the stack where they repeat,
so both see the same machine load), print a table of ratios with its target, and stop everything
they started. 7 to 9 measure the engine alone (what batching is worth, what a spread of prompt
lengths costs, what batching does to int8 outputs): the figures the README's Batching section
quotes. The model is GENQUEUE_MODEL under GENQUEUE_MODELS_DIR (the SmolLM2 int8 default); the
worker and the direct engine use the same engine settings. Every table is printed with the
machine, the command, the load average, the git commit and whether the tree was dirty.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import config  # noqa: E402
from bench.harness import (  # noqa: E402
    PROMPTS,
    REPO,
    SHORT_PROMPT,
    Stack,
    alternating,
    clients,
    direct_batch,
    encode,
    load_average,
    load_model,
    machine,
    median,
    model_dir,
    paired_ratio,
    percentile,
    print_table,
    rss_mib,
    stream_first_chunk,
    wait_succeeded,
    worker_threads,
)

BATCH = 16  # concurrent jobs in benchmarks 2, 5 and 6
TOKENS = 128  # tokens per job in benchmarks 1, 2 and 7


def job(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "MISSED"


def stack_batch(stack: Stack, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """Submit all prompts at once from one thread each; (seconds from first submit to last result, tokens)."""
    tokens = [0] * len(prompts)
    errors: list[BaseException] = []
    with clients(stack, len(prompts)) as http:
        barrier = threading.Barrier(len(prompts) + 1)

        def one(i: int) -> None:
            try:
                barrier.wait(timeout=30)
                done = wait_succeeded(http[i], http[i].submit(job(prompts[i], max_tokens)))
                tokens[i] = done.result.usage.completion_tokens
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        barrier.wait(timeout=30)
        started = time.perf_counter()
        for thread in threads:
            thread.join(timeout=600)
        elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, sum(tokens)


def stack_one(http, prompt: str, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    result = wait_succeeded(http, http.submit(job(prompt, max_tokens))).result
    assert result is not None  # a succeeded job has one
    return time.perf_counter() - started, result.usage.completion_tokens


def warm_up(stack: Stack, model) -> None:
    with clients(stack, 1) as (http,):
        stack_one(http, SHORT_PROMPT, 8)
    direct_batch(model, [SHORT_PROMPT], 8)


# -- 1: one job ----------------------------------------------------------------------------------


def bench_one_job(rounds: int) -> None:
    model = load_model()
    with Stack() as stack, clients(stack, 1) as (http,):
        warm_up(stack, model)
        rows, ratios = [], []
        for n in range(rounds):
            d_s, d_tokens, _ = direct_batch(model, [PROMPTS[0]], TOKENS)
            s_s, s_tokens = stack_one(http, PROMPTS[0], TOKENS)
            ratio = (s_tokens / s_s) / (d_tokens / d_s)
            ratios.append(ratio)
            rows.append([f"round {n + 1}", d_tokens / d_s, s_tokens / s_s, ratio, "", ""])
    rows.append(["median", "", "", median(ratios), ">= 0.90", verdict(median(ratios), 0.90)])
    print_table(
        f"1. One {TOKENS}-token job: full stack (HTTP submit, queue, worker, ?wait result) vs the engine directly",
        ["", "engine tokens/s", "stack tokens/s", "ratio", "target", ""],
        rows,
    )


# -- 2: concurrent jobs ---------------------------------------------------------------------------


def bench_concurrent(rounds: int) -> None:
    model = load_model()
    prompts = PROMPTS[:BATCH]
    share = max(1, BATCH // rounds)  # one-at-a-time jobs per round: each round runs another share
    rows, vs_direct, vs_one = [], [], []
    with Stack() as stack:
        warm_up(stack, model)
        for n in range(rounds):
            d_s, d_tokens, _ = direct_batch(model, prompts, TOKENS)
            s_s, s_tokens = stack_batch(stack, prompts, TOKENS)
            started, one_tokens = time.perf_counter(), 0
            with clients(stack, 1) as (http,):
                for prompt in prompts[n * share : (n + 1) * share]:
                    one_tokens += stack_one(http, prompt, TOKENS)[1]
            one_rate = one_tokens / (time.perf_counter() - started)
            direct_rate, stack_rate = d_tokens / d_s, s_tokens / s_s
            vs_direct.append(stack_rate / direct_rate)
            vs_one.append(stack_rate / one_rate)
            rows.append([f"round {n + 1}", direct_rate, stack_rate, one_rate, vs_direct[-1], vs_one[-1]])
    rows.append(["median", "", "", "", median(vs_direct), median(vs_one)])
    rows.append(["target", "", "", "", ">= 0.85", ">= 3.5"])
    rows.append(["", "", "", "", verdict(median(vs_direct), 0.85), verdict(median(vs_one), 3.5)])
    print_table(
        f"2. {BATCH} concurrent {TOKENS}-token jobs: aggregate tokens/s, first submit to last result "
        f"(one at a time: {share} of the jobs per round, one after another through the stack)",
        ["", "direct generate_batch", "stack, concurrent", "stack, one at a time", "vs direct", "vs one at a time"],
        rows,
    )


# -- 3: overhead of a 1-token job ---------------------------------------------------------------


# Where a 1-token job's time goes, from the client's clock and the job's own timestamps (the API stamps
# created_at, the worker's claim started_at, its end write finished_at; one machine, one clock).
HOPS = [
    ("POST sent -> record stamped (HTTP, gunicorn, Flask, validation)", "sent", "created"),
    ("record stamped -> 202 received (record write, Celery publish, answer)", "created", "answered"),
    ("record stamped -> worker's claim (publish, delivery to a thread, claim)", "created", "started"),
    ("claim -> end written (read, encode, engine, chunk and end writes)", "started", "finished"),
    ("end written -> ?wait answer received (end event to the reader, HTTP)", "finished", "received"),
]


def bench_overhead(samples: int) -> None:
    from engine import GenerationRequest, SamplingOptions
    from tasks.store.jobs import JobStore

    # A raw one-token prompt: the engine's part is one short step, so the overhead around it shows.
    body = {"prompt": "Hello", "raw": True, "max_tokens": 1, "temperature": 0}
    model = load_model()
    request = GenerationRequest(prompt="Hello", raw=True, options=SamplingOptions(max_tokens=1, temperature=0))
    with Stack() as stack, clients(stack, 1) as (http,):
        warm_up(stack, model)
        store = JobStore.from_url(stack.redis.url())
        engine_ms, stack_ms, hops = [], [], []
        for _ in range(samples):
            started = time.perf_counter()
            model.generate_batch([model.encode(request)])
            engine_ms.append((time.perf_counter() - started) * 1000)
            sent, started = time.time(), time.perf_counter()
            job = http.submit(body)
            answered = time.time()
            wait_succeeded(http, job)
            stack_ms.append((time.perf_counter() - started) * 1000)
            received, record = time.time(), store.get(job.id)
            times = {"sent": sent, "answered": answered, "received": received, "created": record.created_at}
            times.update(started=record.started_at, finished=record.finished_at)
            hops.append([(times[end] - times[start]) * 1000 for _name, start, end in HOPS])
    engine = median(engine_ms)
    rows = []
    for q in (50, 99):
        overhead = percentile(stack_ms, q) - engine
        target = "<= 10" if q == 50 else ""
        rows.append(
            [f"p{q}", percentile(engine_ms, q), percentile(stack_ms, q), overhead, target]
            + [verdict(overhead, 10, higher_is_better=False) if target else ""]
        )
    print_table(
        f"3. A 1-token job (raw 1-token prompt), POST then GET ?wait to the result, {samples} samples (ms)",
        ["", "engine", "stack", "overhead: stack - engine p50", "target", ""],
        rows,
    )
    print_table(
        f"3. The same jobs hop by hop (ms; the engine alone took {engine:.1f} ms p50 of the claim -> end hop)",
        ["hop", "p50", "p99"],
        [
            [name, percentile([h[i] for h in hops], 50), percentile([h[i] for h in hops], 99)]
            for i, (name, *_) in enumerate(HOPS)
        ],
    )


# -- 4: time to first chunk -----------------------------------------------------------------------


def bench_first_chunk(samples: int) -> None:
    model = load_model()
    with Stack() as stack, clients(stack, 1) as (http,):
        warm_up(stack, model)
        engine_ms, stack_ms = [], []
        for _ in range(samples):
            engine_ms.append(direct_batch(model, [SHORT_PROMPT], 16)[2] * 1000)
            stack_ms.append(stream_first_chunk(http, job(SHORT_PROMPT, 16))[0] * 1000)
    rows = []
    for q in (50, 99):
        over = percentile(stack_ms, q) - percentile(engine_ms, q)
        target = "<= 20" if q == 50 else ""
        rows.append(
            [f"p{q}", percentile(engine_ms, q), percentile(stack_ms, q), over, target]
            + [verdict(over, 20, higher_is_better=False) if target else ""]
        )
    print_table(
        f"4. Time to first chunk: POST stream=true to the first SSE chunk vs the engine's first token, "
        f"{samples} samples (ms)",
        ["", "engine", "stack (SSE)", "difference", "target", ""],
        rows,
    )


# -- 5: transformers ------------------------------------------------------------------------------


@functools.cache
def load_transformers():
    """SmolLM2 read by transformers from the same bundled GGUF, in float32 (about 40 s on 2 cores)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.prepare import bundled_gguf_path

    gguf = bundled_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model.eval()


def transformers_generate(prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """transformers `generate` (greedy, float32, CPU) on the same model: (seconds, tokens generated)."""
    import torch

    tokenizer, hf_model = load_transformers()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    started = time.perf_counter()
    with torch.inference_mode():
        output = hf_model.generate(
            **inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    elapsed = time.perf_counter() - started
    eos = hf_model.generation_config.eos_token_id
    ends = ({eos} if isinstance(eos, int) else set(eos or [])) | {tokenizer.eos_token_id}
    tokens = 0
    for row in output[:, inputs["input_ids"].shape[1] :].tolist():
        tokens += next((n for n, token in enumerate(row) if token in ends), len(row))
    return elapsed, tokens


def bench_transformers(max_tokens: int, rounds: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    direct = {ct: load_model(compute_type=ct, intra_threads=threads) for ct in ("int8", "float32")}
    engines = ["transformers float32", "CT2 float32", "CT2 int8", "stack float32", "stack int8"]
    rows = []
    with (
        Stack(compute_type="int8", intra_threads=threads) as s8,
        Stack(compute_type="float32", intra_threads=threads) as s32,
    ):
        stacks = {"stack int8": s8, "stack float32": s32}
        for ct, stack in (("int8", s8), ("float32", s32)):
            warm_up(stack, direct[ct])
        transformers_generate([SHORT_PROMPT], 4)  # load and warm up

        def rate(engine: str, batch: list[str]) -> float:
            if engine == "transformers float32":
                seconds, tokens = transformers_generate(batch, max_tokens)
            elif engine.startswith("CT2"):
                seconds, tokens, _ = direct_batch(direct[engine.split()[1]], batch, max_tokens)
            elif len(batch) == 1:
                with clients(stacks[engine], 1) as (http,):
                    seconds, tokens = stack_one(http, batch[0], max_tokens)
            else:
                seconds, tokens = stack_batch(stacks[engine], batch, max_tokens)
            return tokens / seconds

        for label, batch in (("1 job", PROMPTS[:1]), (f"{BATCH} jobs", PROMPTS[:BATCH])):
            rates = alternating(engines, rounds, lambda engine, batch=batch: rate(engine, batch))
            rows.append([label, *(median(rates[engine]) for engine in engines)])
            hf = rates[engines[0]]
            rows.append([f"{label}: / transformers", "", *(paired_ratio(rates[e], hf) for e in engines[1:])])
            rows.append(
                [
                    f"{label}: float32 / int8; stack / CT2",
                    "",
                    paired_ratio(rates["CT2 float32"], rates["CT2 int8"]),
                    "",
                    paired_ratio(rates["stack float32"], rates["CT2 float32"]),
                    paired_ratio(rates["stack int8"], rates["CT2 int8"]),
                ]
            )
    print_table(
        f"5. transformers generate (float32, greedy, batch padded left) vs CTranslate2 float32 and int8, "
        f"called directly and through the stack; {max_tokens} tokens per job, {threads} CPU threads each; "
        f"tokens/s, medians of {rounds} rounds in rotating order (ratios: medians of each round's ratio)",
        ["", *engines],
        rows,
    )


# -- 6: worker memory -----------------------------------------------------------------------------


def bench_memory(max_tokens: int) -> None:
    rows, measured = [], {}
    for concurrency in (1, BATCH):
        with Stack(concurrency=concurrency, max_batch_size=concurrency) as stack:
            idle, _ = rss_mib(stack.worker.pid)
            if concurrency == 1:
                with clients(stack, 1) as (http,):
                    for prompt in PROMPTS[:4]:
                        stack_one(http, prompt, max_tokens)
            else:
                stack_batch(stack, PROMPTS[:BATCH], max_tokens)
            time.sleep(1)  # the worker gives freed memory back once its engine is idle
            after, peak = rss_mib(stack.worker.pid)
            measured[concurrency] = (idle, after, peak)
            rows.append([f"concurrency {concurrency}", idle, after, peak])
    ratios = [b / a for a, b in zip(measured[1], measured[BATCH], strict=True)]
    rows.append([f"concurrency {BATCH} / concurrency 1", *ratios])
    rows.append(["target <= 1.2 (peak)", "", "", verdict(ratios[2], 1.2, higher_is_better=False)])
    print_table(
        f"6. Worker process memory (RSS, MiB): with its model loaded, 1 s after its jobs, and its peak "
        f"({max_tokens}-token jobs; {BATCH} at once at concurrency {BATCH}, 4 one after another at 1)",
        ["", "loaded, idle", "after the jobs", "peak"],
        rows,
    )
    engine = {size: engine_peak(size, max_tokens) for size in (1, BATCH)}
    print_table(
        f"6. The engine alone: how much one generate_batch of {max_tokens}-token prompts raises the peak RSS of "
        f"a process holding the model (MiB; a fresh process per size)",
        ["prompts in the call", "loaded", "peak before the call", "peak after", "the call's own peak"],
        [[f"{size}", *values, values[2] - values[1]] for size, values in engine.items()],
    )


# A fresh process per measurement: a process's peak RSS only ever grows.
ENGINE_PEAK = """
import json, os, sys
from bench.harness import PROMPTS, direct_batch, load_model, rss_mib
size, tokens = int(sys.argv[1]), int(sys.argv[2])
model = load_model()
direct_batch(model, PROMPTS[:1], 4)  # its first call allocates what every call needs
loaded, before = rss_mib(os.getpid())
direct_batch(model, (PROMPTS * size)[:size], tokens)
print(json.dumps([loaded, before, rss_mib(os.getpid())[1]]))
"""


def engine_peak(size: int, max_tokens: int) -> list[float]:
    """(loaded RSS, peak before, peak after) of a process that runs one call of `size` prompts."""
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_PEAK, str(size), str(max_tokens)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- 7: the engine's batching ---------------------------------------------------------------------


def bench_engine_batching(rounds: int, sizes: list[int]) -> None:
    """What batching is worth to the engine alone: aggregate tokens/s by prompts per generate_batch."""
    model = load_model()
    direct_batch(model, [SHORT_PROMPT], 8)  # warm up

    def rate(size: str) -> float:
        seconds, tokens, _ = direct_batch(model, (PROMPTS * int(size))[: int(size)], TOKENS)
        return tokens / seconds

    names = [str(size) for size in sizes]
    rates = alternating(names, rounds, rate)
    rows = [[f"{name} prompts", median(rates[name]), paired_ratio(rates[name], rates[names[0]])] for name in names]
    print_table(
        f"7. The engine alone: one generate_batch of N distinct {TOKENS}-token prompts (prompts beyond "
        f"{len(PROMPTS)} repeat), aggregate tokens/s, medians of {rounds} rounds in rotating order",
        ["", "tokens/s", f"/ {names[0]} prompt(s)"],
        rows,
    )


# -- 8: prompts of different lengths in one call -------------------------------------------------


def bench_length_spread(rounds: int, new_tokens: int = 8) -> None:
    """What a batch of a short and a long prompt costs: CTranslate2 reads the longer prompt's extra
    tokens one step at a time for the whole batch (hence GENQUEUE_MAX_LENGTH_SPREAD)."""
    model = load_model()
    short = encode(model, SHORT_PROMPT, new_tokens)
    long = encode(model, " ".join(PROMPTS), new_tokens)
    calls = {"short alone": [short], "long alone": [long], "both in one call": [short, long]}
    model.generate_batch([short])  # warm up

    def seconds(name: str) -> float:
        started = time.perf_counter()
        model.generate_batch(calls[name])
        return time.perf_counter() - started

    times = alternating(list(calls), rounds, seconds)
    both, alone = times["both in one call"], times["long alone"]
    rows = [[name, median(times[name]) * 1000] for name in calls]
    rows.append(["both / long alone", paired_ratio(both, alone)])
    print_table(
        f"8. A {len(short.tokens)}-token and a {len(long.tokens)}-token chat prompt, {new_tokens} new tokens each: "
        f"one call together vs each alone (ms, medians of {rounds} rounds in rotating order)",
        ["", "ms"],
        rows,
    )


# -- 9: int8, float32 and batching ---------------------------------------------------------------


def bench_int8_batching(new_tokens: int = 20) -> None:
    """Whether a prompt's greedy output and score change when it is batched with prompts of other
    lengths, in int8 and in float32 (CTranslate2 called directly; cumulative log-probabilities)."""
    import ctranslate2

    prompts = [PROMPTS[4], PROMPTS[0], PROMPTS[3], PROMPTS[10]]  # four different lengths
    rows = []
    for compute_type in ("int8", "float32"):
        model = load_model(compute_type=compute_type)
        generator = ctranslate2.Generator(model_dir(), device=model.device, compute_type=compute_type)
        tokens = [list(encode(model, prompt, new_tokens).tokens) for prompt in prompts]
        options = {"max_length": new_tokens, "sampling_topk": 1, "return_scores": True, "length_penalty": 0}
        options |= {"include_prompt_in_result": False}
        alone = [generator.generate_batch([t], **options)[0] for t in tokens]
        together = generator.generate_batch(tokens, **options)
        changed = sum(a.sequences_ids[0] != b.sequences_ids[0] for a, b in zip(alone, together, strict=True))
        moved = max(abs(a.scores[0] - b.scores[0]) for a, b in zip(alone, together, strict=True))
        rows.append([compute_type, f"{changed} of {len(prompts)}", f"{moved:.2g}"])
        del generator, model
    print_table(
        f"9. {len(prompts)} chat prompts of {', '.join(str(len(t)) for t in tokens)} tokens, {new_tokens} greedy "
        f"tokens each: alone vs all in one call",
        ["compute type", "outputs that changed", "largest change of a cumulative log-probability"],
        rows,
    )


BENCHMARKS = {
    "1": lambda args: bench_one_job(args.rounds),
    "2": lambda args: bench_concurrent(args.rounds),
    "3": lambda args: bench_overhead(args.samples),
    "4": lambda args: bench_first_chunk(args.samples),
    "5": lambda args: bench_transformers(args.hf_tokens, args.hf_rounds, args.threads),
    "6": lambda args: bench_memory(64),
    "7": lambda args: bench_engine_batching(args.rounds, args.batch_sizes),
    "8": lambda args: bench_length_spread(args.rounds),
    "9": lambda args: bench_int8_batching(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="+", choices=[*BENCHMARKS, "all"], help="benchmarks to run (1-9, or all)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds in benchmarks 1, 2, 7 and 8")
    parser.add_argument(
        "--batch-sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 4, 8, 16],
        help="prompts per call in benchmark 7, the first the baseline (e.g. 1,8,32,64 on a GPU)",
    )
    parser.add_argument("--samples", type=int, default=40, help="jobs measured in benchmarks 3 and 4")
    parser.add_argument(
        "--hf-tokens", type=int, default=32, help="tokens per job in benchmark 5 (transformers is slow)"
    )
    parser.add_argument("--hf-rounds", type=int, default=3, help="rotating rounds in benchmark 5")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads each engine gets in benchmark 5 (torch and CTranslate2 alike) [all this process may use]",
    )
    args = parser.parse_args()
    which = list(BENCHMARKS) if "all" in args.which else args.which
    settings = config.load()
    print(f"# genqueue benchmarks: python bench/run.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}; load average at start: {load_average()}")
    threads = worker_threads(settings)
    print(
        f"model: {model_dir(settings)}; device {settings['DEVICE']}, compute type "
        f"{settings['COMPUTE_TYPE'] or 'engine default'}, intra_threads {threads.intra_threads}, "
        f"inter_threads {threads.inter_threads} ({threads.source}); worker concurrency {settings['CONCURRENCY']}, "
        f"max batch {settings['MAX_BATCH_SIZE']}"
    )
    for name in which:
        started = time.perf_counter()
        BENCHMARKS[name](args)
        gc.collect()
        print(f"\n(benchmark {name}: {time.perf_counter() - started:.0f} s; load average now {load_average()})")


if __name__ == "__main__":
    main()
