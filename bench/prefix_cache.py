"""What the shared-prefix cache is worth: CTranslate2 called through the Model with and without
static_prompt (the chat template's default system turn, cached once), alternating rounds.

    python bench/prefix_cache.py [--rounds 5] [--tokens 32] [--jobs 16]

For each compute type (int8, float32): the first token's latency of one chat job (a 1-token job, p50),
one job's tokens/s, --jobs jobs' aggregate tokens/s (one call), and how many greedy outputs of the
--jobs prompts stay the same with the cache. Threads as a worker would choose them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    PROMPTS,
    alternating,
    direct_batch,
    encode,
    load_model,
    median,
    paired_ratio,
    print_table,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=16)
    args = parser.parse_args()
    prompts = [PROMPTS[n % len(PROMPTS)] for n in range(args.jobs)]
    rows = []
    for compute_type in ("int8", "float32"):
        rows += compare(compute_type, prompts, args.rounds, args.tokens)
    print_table(
        f"Shared-prefix cache (static_prompt, {len(load_model().tokenizer.fixed_prefix())} tokens)",
        ["engine", "first token, ms (p50)", "1 job, tokens/s", f"{args.jobs} jobs, tokens/s", ""],
        rows,
        [f"{args.rounds} rounds alternating, {args.tokens} tokens per job; ratios are paired medians."],
    )


def compare(compute_type: str, prompts: list[str], rounds: int, tokens: int) -> list[list]:
    """Table rows for one compute type: each engine's figures, then with / without."""
    models = {
        "without": load_model(compute_type=compute_type),
        "with": load_model(compute_type=compute_type, prefix_cache=True),
    }
    names = list(models)
    first = alternating(names, rounds, lambda n: direct_batch(models[n], prompts[:1], 1)[2] * 1000)
    one = alternating(names, rounds, lambda n: rate(models[n], prompts[:1], tokens))
    many = alternating(names, rounds, lambda n: rate(models[n], prompts, tokens))
    outputs = {
        n: [r.response for r in models[n].generate_batch([encode(models[n], p, 24) for p in prompts])] for n in names
    }
    same = sum(a == b for a, b in zip(outputs["without"], outputs["with"], strict=True))
    rows = [[f"{compute_type} {n} cache", median(first[n]), median(one[n]), median(many[n]), ""] for n in names]
    ratios = [paired_ratio(values["with"], values["without"]) for values in (first, one, many)]
    return rows + [[f"{compute_type}: with / without", *ratios, f"{same} of {len(prompts)} greedy outputs the same"]]


def rate(model, prompts: list[str], tokens: int) -> float:
    elapsed, generated, _first = direct_batch(model, prompts, tokens)
    return generated / elapsed


if __name__ == "__main__":
    main()
