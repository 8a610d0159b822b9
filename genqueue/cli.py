"""The `genqueue` command: run the whole stack, or its API, a worker, or model preparation alone.

Flags override GENQUEUE_* environment variables (see genqueue.config); a flag is passed on as its
variable, so every process started from here reads one consistent configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import click

from genqueue import config

READY_TIMEOUT_S = 300
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def export(**settings) -> dict:
    """Put the given (non-None) settings in the environment, then read the whole configuration."""
    for name, value in settings.items():
        if value is not None:
            os.environ[config.ENV_PREFIX + name.upper()] = value if isinstance(value, str) else json.dumps(value)
    return config.load()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """genqueue: a self-hosted LLM generation queue."""


# -- model ---------------------------------------------------------------------------------------


@main.group()
def model() -> None:
    """Prepare and list models."""


@model.command("prepare")
@click.argument("source", required=False)
@click.option(
    "--quantization",
    default="int8",
    show_default=True,
    type=click.Choice(["int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "float32"]),
    help="int8 for CPU workers, int8_float16 for GPU workers.",
)
@click.option("--name", help="Directory name under the models directory (default: from the source).")
@click.option("--models-dir", help="Where prepared models live [env GENQUEUE_MODELS_DIR].")
@click.option("--force", is_flag=True, help="Rebuild even if a model of that name is prepared.")
def model_prepare(source, quantization, name, models_dir, force) -> None:
    """Convert SOURCE (a transformers Llama directory or a .gguf file; default: the bundled
    SmolLM2-135M-Instruct) into a CTranslate2 model directory."""
    from engine.errors import ModelPreparationError
    from engine.prepare import prepare_model

    settings = export(models_dir=models_dir)
    try:
        path = prepare_model(
            source, settings["MODELS_DIR"], name, quantization, force, progress=lambda line: click.echo(line, err=True)
        )
    except ModelPreparationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(path)


@model.command("list")
@click.option("--models-dir", help="Where prepared models live [env GENQUEUE_MODELS_DIR].")
def model_list(models_dir) -> None:
    """List the prepared models."""
    settings = export(models_dir=models_dir)
    root = Path(settings["MODELS_DIR"])
    found = sorted(p.parent for p in root.glob("*/genqueue.json")) if root.is_dir() else []
    if not found:
        click.echo(f"no prepared models under {root}; run 'genqueue model prepare'", err=True)
    for path in found:
        meta = json.loads((path / "genqueue.json").read_text())
        click.echo(f"{path.name}\t{meta.get('quantization')}\t{meta.get('source')}")


# -- keys ---------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--name", default="default", show_default=True, help="Owner name the key's jobs are recorded under.")
def keys_create(name) -> None:
    """Make a new API key: prints the key (give it to the client) and the entry to configure."""
    from api.auth import hash_key, new_key

    if ":" in name or not name:
        raise click.BadParameter("a name without ':'", param_hint="--name")
    key = new_key()
    click.echo(f"key:   {key}")
    click.echo(f"entry: {name}:{hash_key(key)}")
    click.echo("Add the entry to GENQUEUE_API_KEYS (comma-separated) or a line of GENQUEUE_API_KEYS_FILE.", err=True)


# -- services ------------------------------------------------------------------------------------


@main.command()
@click.option("--host", help="Address to bind [env GENQUEUE_HOST, default 127.0.0.1].")
@click.option("--port", type=int, help="Port [env GENQUEUE_PORT, default 8000].")
@click.option("--threads", default=64, show_default=True, help="Concurrent requests (each SSE stream holds one).")
def api(host, port, threads) -> None:
    """Serve the HTTP API under gunicorn."""
    settings = export(host=host, port=port)
    from api.auth import load_keys

    host = settings["HOST"]
    if not load_keys(settings):
        if host not in LOOPBACK_HOSTS and not settings["OPEN_API_ANY_HOST"]:
            host = "127.0.0.1"
        click.echo(
            f"no API keys configured (GENQUEUE_API_KEYS / GENQUEUE_API_KEYS_FILE): the API is open, "
            f"so it listens on {host} only",
            err=True,
        )
    bind = f"{host}:{settings['PORT']}"
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            bind,
            "--worker-class",
            "gthread",
            "--workers",
            "1",
            "--threads",
            str(threads),
            "--graceful-timeout",
            "10",
            "--access-logfile",
            "-",
            "api:create_app()",
        ],
    )


@main.command()
@click.option(
    "--queue",
    "queues",
    multiple=True,
    type=click.Choice(config.QUEUES),
    help="Queue to consume (repeatable) [default: the device's, cpu or gpu].",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[env GENQUEUE_DEVICE, default cpu]")
@click.option("--compute-type", help="CTranslate2 compute type [default: int8 on cpu, int8_float16 on cuda].")
@click.option("--model", help="Model name under the models directory, or a path [env GENQUEUE_MODEL].")
@click.option("--concurrency", type=int, help="Jobs taken from the queue at once [env GENQUEUE_CONCURRENCY].")
@click.option("--max-batch-size", type=int, help="Jobs one engine call may batch [env GENQUEUE_MAX_BATCH_SIZE].")
@click.option(
    "--intra-threads",
    type=int,
    help="CPU threads per engine call, 0 for CTranslate2's default [env GENQUEUE_INTRA_THREADS].",
)
@click.option(
    "--inter-threads",
    type=int,
    help="Engine replicas: calls run in parallel on one copy of the weights [env GENQUEUE_INTER_THREADS].",
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker(
    queues, device, compute_type, model, concurrency, max_batch_size, intra_threads, inter_threads, loglevel
) -> None:
    """Run a worker: one model in this process, serving its queue's jobs in batches."""
    settings = export(
        device=device,
        compute_type=compute_type,
        model=model,
        concurrency=concurrency,
        max_batch_size=max_batch_size,
        intra_threads=intra_threads,
        inter_threads=inter_threads,
        queues=list(queues) if queues else None,
    )
    queues = config.worker_queues(settings)
    from tasks.app import celery_app

    # Threads, not prefork: one model copy serves all of the worker's jobs, and nothing forks after
    # CTranslate2 starts.
    celery_app.worker_main(
        [
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(settings["CONCURRENCY"]),
            "--queues",
            ",".join(queues),
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@main.command()
@click.option("--host", help="Address to bind [env GENQUEUE_HOST, default 127.0.0.1].")
@click.option("--port", type=int, help="Port [env GENQUEUE_PORT, default 8000].")
@click.option("--model", help="Model name under the models directory, or a path [env GENQUEUE_MODEL].")
def run(host, port, model) -> None:
    """Everything on this machine: Redis (started if none answers), the default model (prepared if
    missing), the API and one worker, in the foreground. Ctrl-C stops all it started."""
    settings = export(host=host, port=port, model=model)
    ensure_redis(settings["REDIS_URL"])
    model_dir = Path(config.model_path(settings))
    if not (model_dir / "model.bin").is_file():
        if settings["MODEL"] != config.DEFAULTS["MODEL"]:
            raise click.ClickException(f"no prepared model at {model_dir}; run 'genqueue model prepare' first")
        click.echo("preparing the default model (once; about a minute)...", err=True)
        from engine.prepare import prepare_model

        prepare_model(None, settings["MODELS_DIR"], progress=lambda line: click.echo(line, err=True))

    children = [
        subprocess.Popen([sys.executable, "-m", "genqueue.cli", "worker"]),
        subprocess.Popen([sys.executable, "-m", "genqueue.cli", "api"]),
    ]
    url = f"http://{settings['HOST']}:{settings['PORT']}"
    stopping = False

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    announced = False
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stopping and all(child.poll() is None for child in children):
        if not announced and ready(url):
            announced = True
            click.echo(
                f"\ngenqueue is ready at {url}  (Ctrl-C stops it)\n\n"
                f"  curl -sN {url}/v1/jobs -H 'Content-Type: application/json' \\\n"
                f'       -d \'{{"prompt": "What is the capital of France?", "stream": true}}\'\n'
            )
        elif not announced and time.monotonic() > deadline:
            click.echo(f"still not ready after {READY_TIMEOUT_S}s; see {url}/readyz", err=True)
            deadline = float("inf")
        time.sleep(0.5)
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
    if not stopping:
        raise click.ClickException("a genqueue process exited; stopped the others")


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ensure_redis(redis_url: str) -> None:
    """Start a local redis-server (no persistence) when none answers at a local REDIS_URL."""
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
        return
    except redis.RedisError:
        pass
    parsed = urlparse(redis_url)
    if parsed.hostname not in LOOPBACK_HOSTS:
        raise click.ClickException(f"Redis at {redis_url} does not answer")
    server = shutil.which("redis-server")
    if server is None:
        raise click.ClickException("no Redis answers and redis-server is not installed (apt-get install redis-server)")
    port = str(parsed.port or 6379)
    click.echo(f"starting redis-server on port {port}", err=True)
    subprocess.run([server, "--daemonize", "yes", "--port", port, "--save", "", "--appendonly", "no"], check=True)
    for _ in range(50):
        try:
            redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
            return
        except redis.RedisError:
            time.sleep(0.1)
    raise click.ClickException(f"started redis-server, but {redis_url} still does not answer")


if __name__ == "__main__":
    main()
