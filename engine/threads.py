"""Engine threads chosen by measurement: intra_threads (threads per engine call) and replicas
(inter_threads: engine calls run in parallel) for this machine, device, model and batch size.

CTranslate2's default intra_threads can be far from the best (on a 2-core VM one thread beat two
by 1.6x at batch 1 and 1.8x at batch 16) and another machine may want the opposite, so a worker
measures instead of guessing: each candidate runs one job alone and a full batch of concurrent jobs
through the Batcher, as the worker runs them, and the candidate whose worse ratio to the best of
each load is highest wins. The choice is cached per model and machine in one JSON file
(STATE_DIR/threads.json) and measured again only when a key part changes; `genqueue tune` runs a
longer sweep and writes the same file. Explicit settings win over both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.request import GenerationRequest, SamplingOptions

log = logging.getLogger(__name__)

CACHE_FILE = "threads.json"
GATHER_S = 1.0  # a measured batch starts once all its jobs are pending (bounded by this)
CALIBRATION_ROUNDS = 2  # at worker start: the faster of two short runs, on a machine other work shares
CALIBRATION_KEEP = 0.8  # measured again only when within this of the best at both loads
TIE = 0.05  # candidates this close to the best count as equal: the one with fewer threads wins
# Distinct prompts of different lengths asking for long answers, so greedy jobs run to max_tokens
# and a batch holds prompts of several lengths, as real traffic does.
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Write a long, detailed story about the history of Rome and its first emperors.",
    "Write a long story about a robot who learns to paint.",
    "Write a long, detailed story about winter in a small Norwegian fishing village.",
    "Write a long story about the ocean at night.",
    "Write a long, detailed story about a jazz musician in New Orleans in the 1920s.",
    "Write a long story about a dragon.",
    "Write a long, detailed story about a forest fire and the people who fought it.",
]

Config = tuple[int, int]  # (intra_threads, inter_threads)


@dataclass(frozen=True)
class ThreadChoice:
    """The threads a worker runs with, where they come from, and the measurements behind them."""

    intra_threads: int
    inter_threads: int
    source: str  # settings, calibrated (at worker start), tuned (genqueue tune), default (tuning off)
    # tokens/s per candidate "intra x inter" and load ("1", "16": concurrent jobs)
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0  # how long the measurement took

    def to_view(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_view(cls, view: dict[str, Any]) -> ThreadChoice:
        return cls(**{name: view[name] for name in cls.__dataclass_fields__ if name in view})


def label(config: Config) -> str:
    return f"{config[0]}x{config[1]}"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def candidates(cores: int, device: str, max_batch_size: int, full: bool = False) -> list[Config]:
    """Configurations worth measuring. On a GPU, replicas alone (intra 0: CTranslate2's default). On
    CPU, CTranslate2's default (0 x 1) and powers of two (and the core count) whose threads in all use
    from half the cores to all of them; `full` (genqueue tune) adds every smaller product."""
    if device != "cpu":
        return [(0, 1), (0, 2)]
    default = [(0, 1)]  # CTranslate2's own choice, so the measured choice is never worse than it
    sizes = sorted({2**n for n in range(cores.bit_length()) if 2**n <= cores} | {cores})
    found = [
        (intra, inter)
        for intra in sizes
        for inter in sizes
        if inter <= max_batch_size and intra * inter <= cores and (full or 2 * intra * inter >= cores)
    ]
    return default + found


def worst_ratio(measured: dict[str, dict[str, float]], name: str) -> float:
    """name's tokens/s over the best's, at the load where that ratio is lowest."""
    return min(ratios(measured, name).values())


def best(measured: dict[str, dict[str, float]], tie: float = 0.0) -> str:
    """The candidate whose worse ratio to the best tokens/s of each load is highest; among those within
    `tie` of it, the one with the fewest threads in all, then the fewest replicas (a short run's
    differences that small are noise, and fewer threads and replicas cost less)."""
    top = max(worst_ratio(measured, name) for name in measured)
    close = [name for name in measured if worst_ratio(measured, name) >= top - tie]
    cores = available_cores()

    def cost(name: str) -> tuple[int, int, float]:
        intra, inter = parse_label(name)
        return (intra or cores) * inter, inter, -worst_ratio(measured, name)

    return min(close, key=cost)


def ratios(measured: dict[str, dict[str, float]], chosen: str) -> dict[str, float]:
    """The chosen candidate's tokens/s over the best one's, per load."""
    loads = {load for rates in measured.values() for load in rates}
    return {load: measured[chosen][load] / max(r[load] for r in measured.values()) for load in sorted(loads, key=int)}


# -- measuring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one measurement runs: the concurrent-job counts (loads), tokens per job, the batcher's limits."""

    loads: tuple[int, ...] = (1, 16)
    tokens: int = 12
    tokens_alone: int = 24  # one job alone: a longer run, as a short one is mostly noise on a shared machine
    max_batch_size: int = 16
    max_length_spread: int = 32


def measure(model_factory: Callable[[Config], Any], config: Config, workload: Workload) -> dict[str, float]:
    """Aggregate tokens/s of one configuration at each load, through the Batcher as a worker runs jobs."""
    from engine.batcher import Batcher

    model = model_factory(config)
    rates = {}
    for n, load in enumerate(workload.loads):
        batcher = Batcher(
            {None: model},
            max_batch_size=workload.max_batch_size,
            gather_window_s=GATHER_S if load > 1 else 0.0,
            max_length_spread=workload.max_length_spread,
            replicas=config[1],
        ).start()
        try:
            if n == 0:  # warm-up: the first call of a new generator allocates
                _run_jobs(batcher, model, 1, 2)
            started = time.perf_counter()
            tokens = _run_jobs(batcher, model, load, workload.tokens_alone if load == 1 else workload.tokens)
            rates[str(load)] = tokens / (time.perf_counter() - started)
        finally:
            batcher.stop()
    return rates


def _run_jobs(batcher, model, count: int, tokens: int) -> int:
    """Run count greedy jobs at once; their completion tokens in all."""
    options = SamplingOptions(max_tokens=tokens, temperature=0)
    prompts = [model.encode(GenerationRequest(prompt=PROMPTS[n % len(PROMPTS)], options=options)) for n in range(count)]
    done = [0] * count

    def one(n: int) -> None:
        done[n] = batcher.run(prompts[n], lambda _text: None).usage.completion_tokens

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done)


def sweep(
    model_factory: Callable[[Config], Any],
    configs: list[Config],
    workload: Workload,
    rounds: int = 1,
    keep: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Every configuration measured `rounds` times, each round in a rotated order (so none always runs
    first while the machine's load moves); the fastest run per configuration and load counts, since
    other work on the machine only ever slows a run down. One job alone runs on one replica, so it is
    measured once per intra_threads value and shared by that value's replica counts. After each round,
    only the configurations whose worse ratio to the best reaches `keep` are measured again."""
    runs: dict[str, dict[str, list[float]]] = {label(c): {str(load): [] for load in workload.loads} for c in configs}
    for n in range(rounds):
        if n and keep:
            fastest = {name: {load: max(values) for load, values in by_load.items()} for name, by_load in runs.items()}
            configs = [c for c in configs if worst_ratio(fastest, label(c)) >= keep]
        alone: dict[int, float] = {}  # one job's tokens/s by intra_threads, this round
        for config in configs[n % len(configs) :] + configs[: n % len(configs)]:
            loads = tuple(load for load in workload.loads if load > 1 or config[0] not in alone)
            rates = measure(model_factory, config, dataclasses.replace(workload, loads=loads))
            if "1" in rates:
                alone[config[0]] = rates["1"]
            elif 1 in workload.loads:
                rates["1"] = alone[config[0]]
            for load, rate in rates.items():
                runs[label(config)][load].append(rate)
    return {name: {load: max(values) for load, values in by_load.items()} for name, by_load in runs.items()}


def parse_label(name: str) -> Config:
    intra, inter = name.split("x")
    return int(intra), int(inter)


def choose(
    model_factory: Callable[[Config], Any],
    configs: list[Config],
    workload: Workload,
    source: str,
    rounds: int = 1,
    keep: float = 0.0,
) -> ThreadChoice:
    started = time.monotonic()
    measured = sweep(model_factory, configs, workload, rounds, keep)
    intra, inter = parse_label(best(measured, TIE))
    return ThreadChoice(intra, inter, source, measured, round(time.monotonic() - started, 2))


# -- the cache -------------------------------------------------------------------------------------


def machine_key(device: str) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} x{available_cores()} {device}"


def cache_key(model_dir: str | Path, device: str, compute_type: str, max_batch_size: int) -> str:
    """What a choice depends on: the machine, the device, the model's weights (path, size, mtime),
    the compute type, the batch size and the CTranslate2 version."""
    import ctranslate2

    weights = Path(model_dir).resolve() / "model.bin"
    stat = weights.stat()
    parts = [machine_key(device), f"{weights}:{stat.st_size}:{stat.st_mtime_ns}", compute_type]
    return " | ".join([*parts, f"batch {max_batch_size}", f"ctranslate2 {ctranslate2.__version__}"])


class ChoiceCache:
    """The JSON file of choices by cache_key; writes replace it atomically."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / CACHE_FILE

    def get(self, key: str) -> ThreadChoice | None:
        try:
            view = self._read().get(key)
            return ThreadChoice.from_view(view) if view else None
        except (TypeError, KeyError) as exc:  # an entry another version wrote
            log.warning("ignoring the cached thread choice in %s: %s", self.path, exc)
            return None

    def put(self, key: str, choice: ThreadChoice) -> None:
        entries = self._read()
        entries[key] = choice.to_view()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=2) + "\n")
        temporary.replace(self.path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One measurement at a time per state dir: workers starting together would skew each other's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return {}
        return entries if isinstance(entries, dict) else {}


# -- the worker's resolution -----------------------------------------------------------------------


def resolve(
    intra_threads: int | None,
    inter_threads: int | None,
    key: str,
    cache: ChoiceCache,
    calibrate: Callable[[], ThreadChoice] | None,
) -> ThreadChoice:
    """Explicit settings (either one: the other keeps CTranslate2's default 0, or 1 replica), else the
    cached choice for key, else a calibration (cached), else the defaults when calibrate is None."""
    if intra_threads is not None or inter_threads is not None:
        return ThreadChoice(int(intra_threads or 0), int(inter_threads or 1), "settings")
    if calibrate is None:
        return cache.get(key) or ThreadChoice(0, 1, "default")
    with cache.locked():  # a worker that waited here finds the choice the first one measured
        choice = cache.get(key)
        if choice is None:
            choice = calibrate()
            cache.put(key, choice)
    return choice


def model_factory(model_dir: str | Path, device: str, compute_type: str | None) -> Callable[[Config], Any]:
    from engine.model import Model

    def build(config: Config) -> Model:
        intra, inter = config
        return Model(model_dir, device=device, compute_type=compute_type, intra_threads=intra, inter_threads=inter)

    return build


def for_worker(
    model_dir: str | Path,
    device: str,
    compute_type: str | None,
    workload: Workload,
    state_dir: str | Path,
    intra_threads: int | None = None,
    inter_threads: int | None = None,
    calibrate: bool = True,
) -> ThreadChoice:
    """A worker's threads (see resolve): calibration measures the quick candidates once, cached."""
    from engine.model import DEFAULT_COMPUTE_TYPES

    compute_type = compute_type or DEFAULT_COMPUTE_TYPES.get(device, "default")
    key = cache_key(model_dir, device, compute_type, workload.max_batch_size)
    configs = candidates(available_cores(), device, workload.max_batch_size)
    factory = model_factory(model_dir, device, compute_type)
    measure_now = (lambda: calibrated(factory, configs, workload)) if calibrate else None
    choice = resolve(intra_threads, inter_threads, key, ChoiceCache(state_dir), measure_now)
    log.info(
        "engine threads: intra_threads %d, %d replicas (%s%s)",
        choice.intra_threads,
        choice.inter_threads,
        choice.source,
        f"; tokens/s {choice.measured}" if choice.measured else "",
    )
    return choice


def calibrated(factory: Callable[[Config], Any], configs: list[Config], workload: Workload) -> ThreadChoice:
    busy = os.getloadavg()[0]
    if busy > available_cores():  # more threads win a larger share of a busy machine, not a quiet one
        log.warning(
            "measuring engine threads on a busy machine (load average %.1f on %d cores): the choice may suit "
            "a busy machine; run 'genqueue tune' when it is quiet to replace it",
            busy,
            available_cores(),
        )
    return choose(factory, configs, workload, "calibrated", CALIBRATION_ROUNDS, CALIBRATION_KEEP)


def tune(
    model_dir: str | Path, device: str, compute_type: str | None, workload: Workload, state_dir: str | Path, rounds: int
) -> ThreadChoice:
    """The full sweep (`genqueue tune`): every candidate, `rounds` times; the choice replaces the
    cached one, so workers of this model on this machine start with it and measure nothing."""
    from engine.model import DEFAULT_COMPUTE_TYPES

    compute_type = compute_type or DEFAULT_COMPUTE_TYPES.get(device, "default")
    configs = candidates(available_cores(), device, workload.max_batch_size, full=True)
    factory = model_factory(model_dir, device, compute_type)
    cache = ChoiceCache(state_dir)
    with cache.locked():
        choice = choose(factory, configs, workload, "tuned", rounds)
        cache.put(cache_key(model_dir, device, compute_type, workload.max_batch_size), choice)
    return choice
