"""What the benchmarks share: a real stack on loopback (Redis, a worker process, the API under
gunicorn), an HTTP client, the prompts, the direct engine, and the table printer.

Every process started here listens on 127.0.0.1 only, on a free port, and is stopped when its
`with` block ends (or the benchmark fails); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from genqueue import config  # noqa: E402

START_TIMEOUT_S = 120
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


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
    sys.stdout.flush()


# -- the direct engine ---------------------------------------------------------------------------


def load_model(**engine):
    from engine import Model

    settings = config.load()
    return Model(
        model_dir(settings),
        device=engine.get("device", settings["DEVICE"]),
        compute_type=engine.get("compute_type", settings["COMPUTE_TYPE"]),
        intra_threads=engine.get("intra_threads", settings["INTRA_THREADS"]),
        inter_threads=engine.get("inter_threads", settings["INTER_THREADS"]),
    )


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


class Http:
    """One keep-alive connection to the API (one per thread)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                return response.status, json.loads(response.read() or b"null")
            except (ConnectionError, http.client.RemoteDisconnected):
                self.conn.close()  # a keep-alive the server closed: reconnect once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def submit(self, body: dict) -> str:
        status, job = self.request("POST", "/v1/jobs", body)
        if status != 202:
            raise RuntimeError(f"submit answered {status}: {job}")
        return job["id"]

    def wait(self, job_id: str, wait_s: int = 60) -> dict:
        deadline = time.monotonic() + HTTP_TIMEOUT_S
        while True:
            status, job = self.request("GET", f"/v1/jobs/{job_id}?wait={wait_s}")
            if status != 200:
                raise RuntimeError(f"GET job answered {status}: {job}")
            if job["status"] not in ("queued", "running"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(job_id)

    def stream_first_chunk(self, body: dict) -> tuple[float, dict]:
        """POST with stream=true: (seconds to the first chunk event, the final event), reading all."""
        data = json.dumps({**body, "stream": True}).encode()
        started = time.perf_counter()
        self.conn.request("POST", "/v1/jobs", body=data, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        first = None
        last: dict = {}
        while True:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    break
                if first is None:
                    first = time.perf_counter() - started
                last = json.loads(payload)
        response.read()
        return first if first is not None else float("nan"), last

    def close(self) -> None:
        self.conn.close()


class Process:
    def __init__(self, name: str, argv: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w+")  # noqa: SIM115
        self.process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class Stack:
    """Redis, one worker and the API, all on loopback; `with Stack(concurrency=16) as stack:`."""

    def __init__(self, **worker_settings):
        self.worker_settings = worker_settings
        self.processes: list[Process] = []
        self.log_dir = Path(tempfile.mkdtemp(prefix="genqueue-bench-"))

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise RuntimeError("redis-server is not installed")
        self.redis_port, self.api_port = free_port(), free_port()
        redis_argv = [redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        redis_argv += ["--save", "", "--appendonly", "no"]
        self.redis = self._spawn("redis", redis_argv, dict(os.environ))
        env = {
            **os.environ,
            "GENQUEUE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "GENQUEUE_MODEL": model_dir(),
            "GENQUEUE_HOST": "127.0.0.1",
            "GENQUEUE_PORT": str(self.api_port),
            **{f"GENQUEUE_{k.upper()}": str(v) for k, v in self.worker_settings.items()},
        }
        env.pop("GENQUEUE_API_KEYS", None)
        env.pop("GENQUEUE_API_KEYS_FILE", None)
        python = sys.executable
        self.worker = self._spawn(
            "worker",
            [python, "-m", "genqueue.cli", "worker", "--loglevel", "INFO"],
            env,
        )
        self.api = self._spawn("api", [python, "-m", "genqueue.cli", "api"], env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            for process in self.processes:
                process.check()
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}:\n{p.output()[-3000:]}" for p in self.processes)
                raise TimeoutError(f"stack not ready after {START_TIMEOUT_S}s:\n{logs}")
            time.sleep(0.2)

    def _spawn(self, name: str, argv: list[str], env: dict) -> Process:
        process = Process(name, argv, env, self.log_dir)
        self.processes.append(process)
        return process

    def _ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=2)
            conn.request("GET", "/readyz")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def client(self) -> Http:
        return Http(self.api_port)

    def __exit__(self, *_exc) -> None:
        for process in reversed(self.processes):
            process.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)


@contextlib.contextmanager
def clients(stack: Stack, count: int) -> Iterator[list[Http]]:
    made = [stack.client() for _ in range(count)]
    try:
        yield made
    finally:
        for client in made:
            client.close()
