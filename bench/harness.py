"""What the benchmarks share: a real stack on loopback (Redis, a worker process, the API under
gunicorn), an HTTP client, the prompts, the direct engine, and the table printer.

Every process started here listens on 127.0.0.1 only, on a free port, and is stopped when its
`with` block ends (or the benchmark fails); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import config  # noqa: E402
from genqueue import launcher  # noqa: E402
from genqueue.client import Client, Job  # noqa: E402

HTTP_TIMEOUT_S = 300

# Distinct prompts of different lengths, each asking for a long answer, so 128-token jobs run to
# max_tokens and a batch holds padded prompts, as real traffic does.
TOPICS = [
    "a lighthouse keeper",
    "the ocean at night",
    "a robot who learns to paint",
    "the history of Rome and its first emperors",
    "a dragon",
    "winter in a small Norwegian fishing village",
    "a detective in Paris",
    "the moon landing",
    "a chess tournament",
    "an old library full of secrets",
    "a jazz musician in New Orleans in the 1920s",
    "a mountain village",
    "a space station",
    "a forest fire and the people who fought it",
    "a lost dog",
    "the first computer",
]
PROMPTS = [f"Write a long, detailed story about {topic}." for topic in TOPICS]
SHORT_PROMPT = "What is the capital of France?"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


LOAD_AT_START = load_average()


def git_state() -> str:
    """The commit the code was measured at, and whether the tree differs from it (dirty)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown (not a git checkout)"
    return f"commit {commit}, " + (f"DIRTY ({len(changes.splitlines())} files differ)" if changes else "clean")


def provenance() -> str:
    """What every table is printed with, so a quoted figure says where it comes from: the machine, the
    command, the load average, the git commit and whether the tree differed from it."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = ["-m", spec.name] if spec is not None and spec.name else [os.path.relpath(sys.argv[0], REPO)]
    command = shlex.join(["python", *script, *sys.argv[1:]])
    return (
        f"machine: {machine()}; command: {command}\n"
        f"load average (1, 5, 15 min): {LOAD_AT_START} at start, {load_average()} now; {git_state()}"
    )


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def model_dir(settings: dict | None = None) -> str:
    """The model the worker would load (GENQUEUE_MODEL under GENQUEUE_MODELS_DIR), as an absolute path."""
    path = Path(config.model_path(settings or config.load())).resolve()
    if not (path / "model.bin").is_file():
        raise SystemExit(f"no prepared model at {path}: run 'genqueue model prepare' or set GENQUEUE_MODELS_DIR")
    return str(path)


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


def alternating(names: list[str], rounds: int, measure: Callable[[str], float]) -> dict[str, list[float]]:
    """measure(name) for every name, in `rounds` rounds; each round starts one name further on, so no
    name always runs first (or right after the same other one) while the machine's load moves."""
    values: dict[str, list[float]] = {name: [] for name in names}
    for n in range(rounds):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            values[name].append(measure(name))
    return values


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of each round's a / b (measured in the same round: under the same load)."""
    return median([x / y for x, y in zip(a, b, strict=True)])


def print_table(title: str, header: list[str], rows: list[list], notes: list[str] = ()) -> None:
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:,.2f}" for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    for n, row in enumerate(cells):
        print("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for note in notes:
        print(f"\n{note}")
    print(f"\n{provenance()}")
    sys.stdout.flush()


# -- the direct engine ---------------------------------------------------------------------------


def load_model(**engine):
    from engine import Model

    settings = config.load()
    threads = worker_threads(settings)  # the worker's choice, so both sides run the same engine
    return Model(
        model_dir(settings),
        device=engine.get("device", settings["DEVICE"]),
        compute_type=engine.get("compute_type", settings["COMPUTE_TYPE"]),
        intra_threads=engine.get("intra_threads", threads.intra_threads),
        inter_threads=engine.get("inter_threads", threads.inter_threads),
        prefix_cache=engine.get("prefix_cache", settings["PREFIX_CACHE"]),
    )


def worker_threads(settings: dict | None = None):
    """The engine threads a worker started now would run with (settings, cache or a calibration)."""
    from tasks.runtime.worker import choose_threads

    settings = settings or config.load()
    return choose_threads({**settings, "MODEL": model_dir(settings)})


def encode(model, prompt: str, max_tokens: int, temperature: float = 0):
    from engine import GenerationRequest, SamplingOptions

    options = SamplingOptions(max_tokens=max_tokens, temperature=temperature)
    return model.encode(GenerationRequest(prompt=prompt, options=options))


def direct_batch(model, prompts: list[str], max_tokens: int) -> tuple[float, int, float]:
    """One generate_batch of these prompts: (seconds from call to return, tokens, first chunk s)."""
    started = time.perf_counter()
    encoded = [encode(model, p, max_tokens) for p in prompts]
    first: list[float] = []

    def on_chunk(_index: int, _text: str) -> None:
        if not first:
            first.append(time.perf_counter())

    results = model.generate_batch(encoded, on_chunk=on_chunk)
    elapsed = time.perf_counter() - started
    tokens = sum(r.usage.completion_tokens for r in results)
    return elapsed, tokens, (first[0] - started) if first else elapsed


# -- the stack -----------------------------------------------------------------------------------


def Stack(**worker_settings) -> launcher.Stack:  # noqa: N802 - reads as the class it builds
    """Redis, one worker and the API on loopback (genqueue/launcher.py), on the benchmark's model."""
    return launcher.Stack(model=model_dir(), **worker_settings)


def wait_succeeded(client: Client, job: Job) -> Job:
    """The job once it ended; a job that did not succeed fails the benchmark."""
    ended = client.wait(job.id, timeout_s=HTTP_TIMEOUT_S)
    if ended.status != "succeeded":
        raise RuntimeError(f"job {job.id} ended {ended.status}: {ended.error}")
    return ended


def stream_first_chunk(client: Client, body: dict) -> tuple[float, dict]:
    """POST with stream=true: (seconds to the first chunk event, the final event), reading all."""
    started = time.perf_counter()
    first, last = None, {}
    for event in client.stream(body):
        if first is None:
            first = time.perf_counter() - started
        last = event.data
    return first if first is not None else float("nan"), last


@contextlib.contextmanager
def clients(stack: launcher.Stack, count: int) -> Iterator[list[Client]]:
    """One keep-alive client per thread."""
    made = [Client(stack.url, timeout_s=HTTP_TIMEOUT_S) for _ in range(count)]
    try:
        yield made
    finally:
        for client in made:
            client.close()
