"""What batch-invariant greedy costs: 16 concurrent greedy jobs of different prompt lengths through
the Batcher, with the switch off (the default) and on, and the float32 alternative (invariant by
itself, per ENGINE-NOTES), alternating rounds so all see the same machine load.

    python bench/batch_invariant.py [--rounds 3] [--jobs 16] [--tokens 64]

The model is GENQUEUE_MODEL under GENQUEUE_MODELS_DIR; threads as a worker would choose them.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import PROMPTS, alternating, encode, load_model, median, paired_ratio, print_table  # noqa: E402
from engine.batcher import Batcher  # noqa: E402


def run_jobs(model, jobs: int, tokens: int, batch_invariant: bool) -> tuple[float, int]:
    """jobs greedy jobs at once through a Batcher as the worker's: (tokens/s in all, engine calls)."""
    sizes: list[int] = []
    batcher = Batcher({None: model}, max_batch_size=16, on_batch=sizes.append, batch_invariant=batch_invariant)
    batcher.start()
    prompts = [encode(model, PROMPTS[n % len(PROMPTS)], tokens) for n in range(jobs)]
    done = [0] * jobs

    def one(n: int) -> None:
        done[n] = batcher.run(prompts[n], lambda _text: None).usage.completion_tokens

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(n,)) for n in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    batcher.stop()
    return sum(done) / elapsed, len(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    models = {"int8": load_model(compute_type="int8"), "float32": load_model(compute_type="float32")}
    variants = {
        "int8 (default)": ("int8", False),
        "int8 --batch-invariant": ("int8", True),
        "float32": ("float32", False),
    }
    calls: dict[str, int] = {}

    def measure(name: str) -> float:
        compute_type, invariant = variants[name]
        rate, calls[name] = run_jobs(models[compute_type], args.jobs, args.tokens, invariant)
        return rate

    for jobs in (1, args.jobs):
        args_jobs, args.jobs = args.jobs, jobs
        rates = alternating(list(variants), args.rounds, measure)
        args.jobs = args_jobs
        base = rates["int8 (default)"]
        rows = [[name, median(values), paired_ratio(values, base), str(calls[name])] for name, values in rates.items()]
        print_table(
            f"Batch-invariant greedy: {jobs} concurrent greedy jobs, {args.tokens} tokens, prompts of many lengths",
            ["engine", "tokens/s (median)", "/ int8 default (paired median)", "engine calls (last round)"],
            rows,
            [f"{args.rounds} rounds, alternating."],
        )


if __name__ == "__main__":
    main()
