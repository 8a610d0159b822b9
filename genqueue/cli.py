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
from genqueue.batch_cli import batch

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
@click.option(
    "--name",
    help="Directory name under the models directory (default: from the source); with --lora, "
    "the variant's name, which requests give as `lora`.",
)
@click.option("--models-dir", help="Where prepared models live [env GENQUEUE_MODELS_DIR].")
@click.option("--force", is_flag=True, help="Rebuild even if a model of that name is prepared.")
@click.option(
    "--lora",
    "adapter_dir",
    type=click.Path(exists=True, file_okay=False),
    help="A PEFT LoRA adapter directory: merge it into the base model (--base) as the variant --name.",
)
@click.option("--base", help="With --lora: the prepared base model, a name or a path [env GENQUEUE_MODEL].")
def model_prepare(source, quantization, name, models_dir, force, adapter_dir, base) -> None:
    """Convert SOURCE (a transformers Llama directory or a .gguf file; default: the bundled
    SmolLM2-135M-Instruct) into a CTranslate2 model directory. With --lora, merge an adapter into a
    prepared base model instead; its workers then serve requests whose `lora` is NAME."""
    from engine.errors import ModelPreparationError
    from engine.prepare import prepare_lora, prepare_model

    settings = export(models_dir=models_dir, model=base)
    progress = lambda line: click.echo(line, err=True)  # noqa: E731
    try:
        if adapter_dir:
            if source:
                raise click.UsageError("with --lora, give the base model with --base, not SOURCE")
            if not name:
                raise click.UsageError("--lora needs --name: the name requests will give as `lora`")
            if click.get_current_context().get_parameter_source("quantization").name != "DEFAULT":
                raise click.UsageError("with --lora, the variant takes its base model's quantization")
            path = prepare_lora(config.model_path(settings), adapter_dir, name, force, progress=progress)
        else:
            path = prepare_model(source, settings["MODELS_DIR"], name, quantization, force, progress=progress)
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
@click.option(
    "--workers", default=1, show_default=True, help="gunicorn processes (all share Redis; any serves any job)."
)
@click.option(
    "--threads", default=64, show_default=True, help="Concurrent requests per process (an SSE stream holds one)."
)
def api(host, port, workers, threads) -> None:
    """Serve the HTTP API under gunicorn.

    gthread workers: a stream blocks on Redis in its own thread while the process keeps answering
    gunicorn's heartbeat, so streams of any length are never cut by gunicorn's --timeout."""
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
            str(workers),
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
@click.option("--events", is_flag=True, help="Send Celery task events (for Flower's task views).")
def worker(
    queues, device, compute_type, model, concurrency, max_batch_size, intra_threads, inter_threads, loglevel, events
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
    from tasks.app import celery_app, consumed_queues

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
            ",".join(consumed_queues(queues)),  # each queue's batch items after all interactive jobs
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
            *(["--task-events"] if events else []),
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
                f"\ngenqueue is ready at {url}  (Ctrl-C stops it)\n"
                f"  playground: {url}/\n\n"
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


# -- client commands -----------------------------------------------------------------------------


def client_options(command):
    """--api-url and --api-key, for the commands that talk to the HTTP API."""
    command = click.option("--api-key", help="API key, when the API requires one [env GENQUEUE_API_KEY].")(command)
    url_help = "The genqueue API [env GENQUEUE_API_URL, default http://127.0.0.1:8000]."
    return click.option("--api-url", help=url_help)(command)


def jobs_client(api_url: str | None, api_key: str | None):
    from genqueue.client import JobsClient

    settings = export(api_url=api_url, api_key=api_key)
    return JobsClient(settings["API_URL"], settings["API_KEY"])


@main.command()
@click.argument("prompt")
@click.option("--stream", is_flag=True, help="Print the text as it is generated (Server-Sent Events).")
@click.option("--max-tokens", type=int, help="Tokens to generate at most [API default 256].")
@click.option("--temperature", type=float, help="0 is greedy [API default 0.6].")
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--stop", multiple=True, help="End at this string, left out of the text (repeatable, up to 4).")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--detach", is_flag=True, help="Print the job id and return at once.")
@client_options
def submit(prompt, stream, max_tokens, temperature, top_p, top_k, stop, raw, detach, api_url, api_key) -> None:
    """Submit PROMPT ('-' reads it from standard input) and print the generated text.

    The job id goes to standard error, the text to standard output."""
    from genqueue.client import ApiClientError

    if prompt == "-":
        prompt = sys.stdin.read()
    body = {"prompt": prompt, "raw": raw}
    options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    body.update({name: value for name, value in options.items() if value is not None})
    if stop:
        body["stop"] = list(stop)
    client = jobs_client(api_url, api_key)
    try:
        if stream and not detach:
            stream_job(client, body)
            return
        job = client.submit(body)
        click.echo(f"job {job['id']}", err=True)
        if detach:
            click.echo(job["id"])
            return
        job = client.wait(job["id"])
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc
    if job["status"] != "succeeded":
        raise click.ClickException(f"job {job['id']} {job['status']}: {json.dumps(job['error'])}")
    click.echo(job["result"]["response"])


def stream_job(client, body: dict) -> None:
    for event, data in client.stream(body):
        if event == "job":
            click.echo(f"job {data['id']}", err=True)
        elif event == "error":
            click.echo()
            raise click.ClickException(f"job failed: {json.dumps(data['error'])}")
        elif data.get("response"):
            sys.stdout.write(data["response"])
            sys.stdout.flush()  # each piece as it arrives, not when a buffer fills
    click.echo()


@main.group()
def job() -> None:
    """Read jobs through the HTTP API."""


@job.command("get")
@click.argument("job_id")
@click.option("--wait", "wait_s", type=float, default=0, help="Wait up to this many seconds (0 to 60) for the end.")
@client_options
def job_get(job_id, wait_s, api_url, api_key) -> None:
    """Print the job JOB_ID as JSON: status, timestamps, result or error."""
    from genqueue.client import ApiClientError

    try:
        click.echo(json.dumps(jobs_client(api_url, api_key).get(job_id, wait_s), indent=2, ensure_ascii=False))
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from exc


main.add_command(batch)

if __name__ == "__main__":
    main()
