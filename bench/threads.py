"""Engine threads: the full sweep against the choice a worker makes at start.

    python bench/threads.py [--rounds 3] [--tokens 64] [--batch 16]

Measures every candidate (intra_threads x replicas, CTranslate2's default 0 x 1 among them) for one
job alone and for --batch concurrent jobs through the Batcher, as `genqueue tune` does (the fastest
of --rounds rounds, each in a rotated order); then runs the quick calibration a worker with no
thread settings runs at start (in a fresh state directory, so nothing cached is read), and prints
the chosen configuration's tokens/s in the sweep over the sweep's best, per load (target >= 0.95).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import config  # noqa: E402
from bench.harness import load_average, model_dir, print_table  # noqa: E402
from engine import threads  # noqa: E402

TARGET = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per job in the sweep")
    parser.add_argument("--batch", type=int, default=16, help="concurrent jobs, and the batch size")
    args = parser.parse_args()
    settings = config.load()
    path, device, compute_type = model_dir(settings), settings["DEVICE"], settings["COMPUTE_TYPE"]
    loads = (1, args.batch)
    spread = settings["MAX_LENGTH_SPREAD"]
    factory = threads.model_factory(path, device, compute_type)
    configs = threads.candidates(threads.available_cores(), device, args.batch, full=True)
    print(f"# sweep of {[threads.label(c) for c in configs]}, load average {load_average()}", flush=True)
    full = threads.Workload(loads, args.tokens, args.tokens, args.batch, spread)
    sweep = threads.sweep(factory, configs, full, args.rounds)
    print(f"# worker calibration, load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory() as state_dir:
        workload = threads.Workload(loads, max_batch_size=args.batch, max_length_spread=spread)
        choice = threads.for_worker(path, device, compute_type, workload, state_dir)
    chosen = threads.label((choice.intra_threads, choice.inter_threads))
    best = threads.best(sweep)  # the sweep's plain best (no tie-break)
    batch = str(args.batch)
    rows = []
    for name, rates in sweep.items():
        marks = [m for m, hit in (("worker's choice", name == chosen), ("sweep's best", name == best)) if hit]
        rows.append([name, rates["1"], rates[batch], ", ".join(marks)])
    ratios = threads.ratios(sweep, chosen)
    verdicts = {load: "met" if ratio >= TARGET else "MISSED" for load, ratio in ratios.items()}
    print_table(
        "Engine threads: the sweep (fastest of the rounds, tokens/s) and the worker's choice",
        ["intra x replicas", "1 job", f"{args.batch} jobs", ""],
        rows,
        [
            f"Sweep: {args.rounds} rounds, {args.tokens} tokens per job; calibration ({choice.seconds:.1f} s): "
            f"{workload.tokens_alone} tokens alone, {workload.tokens} per job of {args.batch}, "
            f"{threads.CALIBRATION_ROUNDS} rounds, of {sorted(choice.measured)}.",
            "Calibration's tokens/s (1 job, batch): "
            + ", ".join(f"{name} {r['1']:.1f} {r[batch]:.1f}" for name, r in choice.measured.items()),
            "Worker's choice / sweep's best: "
            + ", ".join(f"{load} job(s) {ratios[load]:.3f} ({verdicts[load]}, target >= {TARGET})" for load in ratios),
            "CTranslate2's default (0x1) / sweep's best: "
            + ", ".join(f"{load} job(s) {r:.3f}" for load, r in threads.ratios(sweep, "0x1").items()),
        ],
    )


if __name__ == "__main__":
    main()
