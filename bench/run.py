"""genqueue's benchmarks: the full stack against the engine called directly, measured in one run.

    python bench/run.py 2            # one benchmark (1 to 6)
    python bench/run.py all          # all six, one after the other

Each benchmark starts its own stack on loopback (Redis, one worker process, the API under
gunicorn; see bench/harness.py), runs its baseline in the same run (alternating with the stack
where it repeats, so both see the same machine load), prints a table of ratios with its target,
and stops everything it started. The model is GENQUEUE_MODEL under GENQUEUE_MODELS_DIR (the
SmolLM2 int8 default); the worker and the direct engine use the same engine settings.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    PROMPTS,
    SHORT_PROMPT,
    Stack,
    clients,
    direct_batch,
    load_average,
    load_model,
    machine,
    median,
    model_dir,
    percentile,
    print_table,
    rss_mib,
)
from genqueue import config  # noqa: E402

BATCH = 16  # concurrent jobs in benchmarks 2, 5 and 6
TOKENS = 128  # tokens per job in benchmarks 1 and 2


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
                tokens[i] = http[i].wait(http[i].submit(job(prompts[i], max_tokens)))["result"]["usage"][
                    "completion_tokens"
                ]
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
    result = http.wait(http.submit(job(prompt, max_tokens)))["result"]
    return time.perf_counter() - started, result["usage"]["completion_tokens"]


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


def bench_overhead(samples: int) -> None:
    from engine import GenerationRequest, SamplingOptions

    # A raw one-token prompt: the engine's part is one short step, so the overhead around it shows.
    body = {"prompt": "Hello", "raw": True, "max_tokens": 1, "temperature": 0}
    model = load_model()
    request = GenerationRequest(prompt="Hello", raw=True, options=SamplingOptions(max_tokens=1, temperature=0))
    with Stack() as stack, clients(stack, 1) as (http,):
        warm_up(stack, model)
        engine_ms, stack_ms = [], []
        for _ in range(samples):
            started = time.perf_counter()
            model.generate_batch([model.encode(request)])
            engine_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            http.wait(http.submit(body))
            stack_ms.append((time.perf_counter() - started) * 1000)
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


# -- 4: time to first chunk -----------------------------------------------------------------------


def bench_first_chunk(samples: int) -> None:
    model = load_model()
    with Stack() as stack, clients(stack, 1) as (http,):
        warm_up(stack, model)
        engine_ms, stack_ms = [], []
        for _ in range(samples):
            engine_ms.append(direct_batch(model, [SHORT_PROMPT], 16)[2] * 1000)
            stack_ms.append(http.stream_first_chunk(job(SHORT_PROMPT, 16))[0] * 1000)
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


def bench_transformers(max_tokens: int) -> None:
    import torch

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    model = load_model()
    prompts = PROMPTS[:BATCH]
    rows = []
    with Stack() as stack:
        warm_up(stack, model)
        transformers_generate([SHORT_PROMPT], 4)  # load and warm up
        for label, batch in (("1 job", prompts[:1]), (f"{BATCH} jobs", prompts)):
            hf_s, hf_tokens = transformers_generate(batch, max_tokens)
            d_s, d_tokens, _ = direct_batch(model, batch, max_tokens)
            if len(batch) == 1:
                with clients(stack, 1) as (http,):
                    s_s, s_tokens = stack_one(http, batch[0], max_tokens)
            else:
                s_s, s_tokens = stack_batch(stack, batch, max_tokens)
            hf_rate = hf_tokens / hf_s
            rows.append([label, hf_rate, d_tokens / d_s, s_tokens / s_s, (s_tokens / s_s) / hf_rate])
    print_table(
        f"5. transformers generate (float32, greedy, batch padded left) vs CTranslate2 ({model.compute_type}), "
        f"{max_tokens} tokens per job (tokens/s)",
        ["", "transformers", "engine directly", "genqueue stack", "stack / transformers"],
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


BENCHMARKS = {
    "1": lambda args: bench_one_job(args.rounds),
    "2": lambda args: bench_concurrent(args.rounds),
    "3": lambda args: bench_overhead(args.samples),
    "4": lambda args: bench_first_chunk(args.samples),
    "5": lambda args: bench_transformers(args.hf_tokens),
    "6": lambda args: bench_memory(64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="+", choices=[*BENCHMARKS, "all"], help="benchmarks to run (1-6, or all)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds in benchmarks 1 and 2")
    parser.add_argument("--samples", type=int, default=40, help="jobs measured in benchmarks 3 and 4")
    parser.add_argument(
        "--hf-tokens", type=int, default=32, help="tokens per job in benchmark 5 (transformers is slow)"
    )
    args = parser.parse_args()
    which = list(BENCHMARKS) if "all" in args.which else args.which
    settings = config.load()
    print(f"# genqueue benchmarks: python bench/run.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}; load average at start: {load_average()}")
    print(
        f"model: {model_dir(settings)}; device {settings['DEVICE']}, compute type "
        f"{settings['COMPUTE_TYPE'] or 'engine default'}, intra_threads {settings['INTRA_THREADS']}, "
        f"inter_threads {settings['INTER_THREADS']}; worker concurrency {settings['CONCURRENCY']}, "
        f"max batch {settings['MAX_BATCH_SIZE']}"
    )
    for name in which:
        started = time.perf_counter()
        BENCHMARKS[name](args)
        gc.collect()
        print(f"\n(benchmark {name}: {time.perf_counter() - started:.0f} s; load average now {load_average()})")


if __name__ == "__main__":
    main()
