"""What the production model costs a CPU worker: a Llama-2-7B-shaped checkpoint, prepared and served.

    python bench/llama7b.py                 # the 7B shape: about 21 GB of disk, 16 GiB of free memory
    python bench/llama7b.py --shape tiny    # the same steps on a small model, to check the script

1. Writes a Llama-2-7b-chat-hf-shaped checkpoint with random weights (32 layers, hidden 4096, 32 heads,
   intermediate 11008, vocabulary 32000, float16, Llama-2's config, a SentencePiece-style tokenizer
   from tests/llama2.py and no chat template, as older snapshots have), shard by shard: torch builds one
   group of layers at a time, so at most about 2 GB of weights are in memory at once.
2. `genqueue model prepare --quantization int8` on it, in a child process: its time, the peak RSS of
   its process tree (sampled every 0.5 s) and the largest child's own peak (getrusage). A watchdog
   stops it if the machine's available memory falls under 1 GiB rather than let the OOM killer pick.
3. Redis, a real CPU worker (concurrency and batch 4) and the API on loopback: the worker's load time
   (start to first heartbeat) and RSS; after a 1-token warm-up, one streamed job, then 4 concurrent
   ones: tokens/s and time to first chunk, through HTTP (genqueue/client.py).
4. The baseline, in the same run once the stack is stopped: CTranslate2 on the same model in this
   process (engine.Model), after the same warm-up, the same prompts alone and as one batch of 4.
   Ratios: stack / direct.
Everything it wrote is deleted at the end (--keep keeps it, and a later run with the same --work-dir
reuses the checkpoint and the prepared model). It refuses to start when disk or memory is short.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    HTTP_TIMEOUT_S,
    PROMPTS,
    encode,
    git_state,
    load_average,
    machine,
    median,
    print_table,
    stream_first_chunk,
)
from genqueue import launcher  # noqa: E402
from genqueue.client import Client  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "small": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 8, "num_attention_heads": 16},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
}
VOCAB_SIZE = 32000
SOURCE_NAME = "Llama-2-7b-chat-hf"  # the name genqueue model prepare recognises Llama-2-chat by
MODEL_NAME = "llama-2-7b-chat-shaped"
LAYERS_PER_SHARD = 4
MEMORY_FLOOR = 1 * GIB  # the watchdog stops preparation when MemAvailable falls under this
CONCURRENT = 4


def parameter_count(shape: dict) -> int:
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    return 2 * VOCAB_SIZE * h + n * (4 * h * h + 3 * h * i + 2 * h) + h


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def tree_rss(pid: int) -> tuple[int, int]:
    """Bytes resident in a process and all its descendants, read from /proc: (all, anonymous only).
    File-backed pages (a model file mapped or read) count in the first and can be reclaimed."""
    total, anonymous, pending = 0, 0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anonymous += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
    return total, anonymous


class Sampler:
    """Samples a process tree's RSS now and every 0.5 s, in a thread, until stop(); keeps the peaks."""

    def __init__(self, pid: int, on_sample=None):
        self.pid, self.peak, self.peak_anonymous, self.on_sample = pid, 0, 0, on_sample
        self._done = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        total, anonymous = tree_rss(self.pid)
        self.peak, self.peak_anonymous = max(self.peak, total), max(self.peak_anonymous, anonymous)
        if self.on_sample is not None:
            self.on_sample()

    def _run(self) -> None:
        while not self._done.wait(0.5):
            self._sample()

    def stop(self) -> tuple[int, int]:
        """(peak RSS, peak anonymous RSS)."""
        self._done.set()
        self._thread.join()
        return self.peak, self.peak_anonymous


def check_room(work_dir: Path, shape: dict, reuse: bool) -> None:
    """Refuse, saying what is missing, unless the disk and the memory can take the run."""
    params = parameter_count(shape)
    disk_needed = 0 if reuse else 3 * params + 2 * GIB  # float16 checkpoint + int8 model + margin
    disk_free = shutil.disk_usage(work_dir).free
    # The worker and the engine alone hold the int8 weights (a byte a parameter) at once, plus their
    # caches; preparation peaks lower (10 GiB for the 7B, measured: see the README).
    memory_needed = 2 * params + 2 * GIB
    print(
        f"disk free at {work_dir}: {disk_free / GIB:.1f} GiB (needs {disk_needed / GIB:.1f}); "
        f"memory available: {mem_available() / GIB:.1f} GiB (needs {memory_needed / GIB:.1f})"
    )
    if disk_free < disk_needed:
        raise SystemExit(
            f"refusing: {work_dir} has {disk_free / GIB:.1f} GiB free, the run needs {disk_needed / GIB:.1f}"
        )
    if mem_available() < memory_needed:
        raise SystemExit(
            f"refusing: {mem_available() / GIB:.1f} GiB of memory available, preparation needs "
            f"{memory_needed / GIB:.1f}; stop other work first"
        )


# -- 1. the checkpoint ---------------------------------------------------------------------------------


def write_checkpoint(source: Path, shape: dict) -> None:
    """Llama-2-7b-chat-hf's layout with random float16 weights, written one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from tests.llama2 import llama2_config, write_tokenizer_files

    source.mkdir(parents=True)
    write_tokenizer_files(source, chat_template=False, vocab_size=VOCAB_SIZE)
    config = llama2_config(VOCAB_SIZE, name_or_path=f"meta-llama/{SOURCE_NAME}", **shape)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float16
    (source / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    with torch.device("meta"):  # names and shapes only: no memory
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}

    def shard_of(name: str) -> int:
        if ".layers." in name:
            return 1 + int(name.split(".layers.")[1].split(".")[0]) // LAYERS_PER_SHARD
        return 0

    shards = sorted({shard_of(name) for name in shapes})
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for number in shards:
        file = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in (n for n in shapes if shard_of(n) == number):
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.float16)
            else:
                tensors[name] = torch.empty(shapes[name], dtype=torch.float16).normal_(0, 0.02, generator=generator)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(source / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (source / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# -- 2. preparation ------------------------------------------------------------------------------------


def prepare(source: Path, models_dir: Path, quantization: str) -> dict:
    """`genqueue model prepare` in a child process, watched; its time and memory."""
    argv = launcher.genqueue_argv(
        "model", "prepare", str(source), "--quantization", quantization, "--models-dir", str(models_dir)
    )
    argv += ["--name", MODEL_NAME]
    print("$ " + " ".join(argv[2:]))
    started = time.perf_counter()
    child = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    low = {"available": mem_available(), "killed": False}

    def watch() -> None:
        available = mem_available()
        low["available"] = min(low["available"], available)
        if available < MEMORY_FLOOR and not low["killed"]:
            low["killed"] = True
            os.killpg(child.pid, signal.SIGKILL)

    sampler = Sampler(child.pid, on_sample=watch)
    assert child.stdout is not None
    for line in child.stdout:
        if "%|" not in line:  # transformers' progress bars
            print("  " + line.rstrip())
    child.wait()
    peak, peak_anonymous = sampler.stop()
    elapsed = time.perf_counter() - started
    if low["killed"]:
        raise SystemExit(f"stopped preparation: available memory fell under {MEMORY_FLOOR / GIB:.0f} GiB")
    if child.returncode != 0:
        raise SystemExit(f"preparation failed with exit status {child.returncode}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "seconds": elapsed,
        "tree_peak": peak,
        "tree_peak_anonymous": peak_anonymous,
        "largest_child_peak": largest,
        "min_available": low["available"],
    }


# -- 3. the stack --------------------------------------------------------------------------------------


def job(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def streamed(url: str, bodies: list[dict]) -> tuple[float, list[float], int]:
    """Stream the jobs at once, one thread and client each: (seconds from the first submit to the
    last event, each job's time to first chunk, completion tokens in all)."""
    results: list[tuple[float, dict] | BaseException] = [RuntimeError("not run")] * len(bodies)
    barrier = threading.Barrier(len(bodies) + 1)

    def one(index: int) -> None:
        client = Client(url, timeout_s=HTTP_TIMEOUT_S)
        try:
            barrier.wait(timeout=60)
            results[index] = stream_first_chunk(client, bodies[index])
        except BaseException as exc:  # reported below
            results[index] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=60)
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=3600)
    elapsed = time.perf_counter() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise RuntimeError(f"{len(failures)} jobs failed: {failures[0]}")
    done = [r for r in results if not isinstance(r, BaseException)]
    if any("usage" not in last for _first, last in done):
        raise RuntimeError(f"a job ended without usage: {done}")
    return elapsed, [first for first, _last in done], sum(last["usage"]["completion_tokens"] for _f, last in done)


@contextlib.contextmanager
def stack(model_dir: Path, log_dir: Path) -> Iterator[tuple[str, int, dict]]:
    """Redis, the worker and the API on loopback: (the API's URL, the worker's pid, its load figures)."""
    figures: dict = {}
    processes: list[launcher.Process] = []
    try:
        redis = launcher.RedisServer(log_dir=log_dir)
        processes.append(redis)
        settings = {"redis_url": redis.url(), "model": str(model_dir), "api_keys": "", "api_keys_file": ""}
        settings |= {"concurrency": CONCURRENT, "max_batch_size": CONCURRENT, "default_queue": "cpu"}
        started = time.perf_counter()
        worker = launcher.WorkerProcess(settings, queues=("cpu",), log_dir=log_dir, wait=False, cwd=REPO)
        processes.append(worker)
        worker.wait_ready(timeout_s=1800)
        figures["load_s"] = time.perf_counter() - started
        figures["rss_loaded"] = tree_rss(worker.pid)[0]
        print(f"worker loaded in {figures['load_s']:.1f} s; load average {load_average()}")
        api = launcher.ApiProcess(settings, log_dir=log_dir, cwd=REPO)
        processes.append(api)
        api.wait_ready("/readyz")
        yield api.url, worker.pid, figures
    finally:
        for process in reversed(processes):
            process.stop()


# -- 4. the engine alone -------------------------------------------------------------------------------


def generate_directly(model, prompts: list[str], tokens: int) -> tuple[float, list[float], int]:
    """One generate_batch of the prompts: (seconds, each prompt's time to first chunk, tokens)."""
    started = time.perf_counter()
    encoded = [encode(model, prompt, tokens) for prompt in prompts]
    firsts: dict[int, float] = {}
    results = model.generate_batch(
        encoded, on_chunk=lambda index, _text: firsts.setdefault(index, time.perf_counter() - started)
    )
    elapsed = time.perf_counter() - started
    return (
        elapsed,
        [firsts.get(i, elapsed) for i in range(len(prompts))],
        sum(r.usage.completion_tokens for r in results),
    )


def measured(what: str, elapsed: float, firsts: list[float], tokens: int) -> tuple[float, float, float, int]:
    """(tokens/s, first job's first chunk, slowest job's first chunk, tokens), said as it comes."""
    print(
        f"{what}: {tokens} tokens in {elapsed:.1f} s, first chunks {', '.join(f'{f:.1f}' for f in firsts)} s; "
        f"load average {load_average()}"
    )
    return tokens / elapsed, min(firsts), max(firsts), tokens


def compare(model_dir: Path, log_dir: Path, tokens: int, rounds: int) -> tuple[dict, dict]:
    """The stack and the engine alone (both loaded), alternating, so both see the same machine load."""
    from engine import Model

    with stack(model_dir, log_dir) as (url, worker_pid, worker):
        started = time.perf_counter()
        model = Model(model_dir, device="cpu", compute_type="int8")
        engine: dict = {"load_s": time.perf_counter() - started}
        streamed(url, [job(PROMPTS[0], 1)])  # warm-up: the first call after loading is not timed
        generate_directly(model, [PROMPTS[0]], 1)
        sampler = Sampler(worker_pid)
        for n in range(rounds):
            for jobs in (1, CONCURRENT):
                prompts = PROMPTS[:jobs]
                figure = measured(
                    f"round {n + 1}, stack, {jobs} jobs", *streamed(url, [job(p, tokens) for p in prompts])
                )
                worker.setdefault(jobs, []).append(figure)
                figure = measured(f"round {n + 1}, direct, {jobs} prompts", *generate_directly(model, prompts, tokens))
                engine.setdefault(jobs, []).append(figure)
        worker["rss_peak"] = sampler.stop()[0]
        del model
    return worker, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b", help="7b (the benchmark); small or tiny to try it")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per job")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of stack and engine")
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--work-dir", type=Path, help="where to write (default: a new directory under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the prepared model")
    args = parser.parse_args()
    shape = SHAPES[args.shape]

    print(f"# genqueue: a Llama-2-7B-shaped model on a CPU worker: python bench/llama7b.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}, {mem_available() / GIB:.1f} GiB of memory available")
    print(f"git: {git_state()}; load average at start: {load_average()}")
    print(f"shape: {shape}, vocabulary {VOCAB_SIZE}, {parameter_count(shape) / 1e9:.2f} B parameters, float16")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="genqueue-llama7b-"))
    work.mkdir(parents=True, exist_ok=True)
    source, models_dir = work / SOURCE_NAME, work / "models"
    reuse = source.is_dir()
    try:
        check_room(work, shape, reuse)
        started = time.perf_counter()
        if reuse:
            print(f"reusing the checkpoint at {source}")
        else:
            write_checkpoint(source, shape)
            size = sum(f.stat().st_size for f in source.iterdir())
            print(f"wrote {size / GIB:.1f} GiB at {source} in {time.perf_counter() - started:.0f} s")
        prep = prepare(source, models_dir, args.quantization)
        model_dir = models_dir / MODEL_NAME
        prepared_size = sum(f.stat().st_size for f in model_dir.iterdir())
        print(f"load average after preparation: {load_average()}")
        worker, engine = compare(model_dir, work / "logs", args.tokens, args.rounds)
        print(f"load average at the end: {load_average()}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work}")

    print_table(
        "Preparation and loading",
        ["step", "measured"],
        [
            [f"genqueue model prepare --quantization {args.quantization}", f"{prep['seconds']:.0f} s"],
            [
                "  peak RSS of its process tree: all / anonymous (largest process's own peak)",
                f"{prep['tree_peak'] / GIB:.1f} / {prep['tree_peak_anonymous'] / GIB:.1f} GiB "
                f"({prep['largest_child_peak'] / GIB:.1f})",
            ],
            ["  lowest memory available meanwhile", f"{prep['min_available'] / GIB:.1f} GiB"],
            ["  prepared model on disk", f"{prepared_size / GIB:.1f} GiB"],
            [
                "worker: start to first heartbeat / engine alone",
                f"{worker['load_s']:.0f} s / {engine['load_s']:.0f} s",
            ],
            [
                "worker RSS loaded / peak during the jobs",
                f"{worker['rss_loaded'] / GIB:.1f} / {worker['rss_peak'] / GIB:.1f} GiB",
            ],
        ],
    )
    rows = []
    for jobs in (1, CONCURRENT):
        (s_rate, s_first, s_slowest, s_tokens), (d_rate, d_first, d_slowest, d_tokens) = (
            [median(values) for values in zip(*side[jobs], strict=True)] for side in (worker, engine)
        )
        rows.append(
            [
                f"{jobs} job{'s' if jobs > 1 else ''}",
                f"{s_rate:.2f}",
                f"{d_rate:.2f}",
                f"{s_rate / d_rate:.2f}",
                f"{s_first:.1f} / {s_slowest:.1f} s",
                f"{d_first:.1f} / {d_slowest:.1f} s",
                f"{s_tokens:.0f} / {d_tokens:.0f}",
            ]
        )
    print_table(
        f"Generation, {args.tokens} tokens per job, greedy ({args.quantization}, concurrency and batch {CONCURRENT}), "
        f"median of {args.rounds} rounds",
        [
            "jobs",
            "stack tokens/s",
            "direct tokens/s",
            "stack / direct",
            "stack first chunk (first / slowest job)",
            "direct first chunk (first / slowest)",
            "tokens (stack / direct)",
        ],
        rows,
        notes=[
            "tokens/s: completion tokens / (first submit to last event, or the engine call). First chunk: from the "
            "POST (stack) or the call (direct) to a job's first text. Both loaded at once, measured in turn, "
            "each after a 1-token warm-up."
        ],
    )


if __name__ == "__main__":
    main()
