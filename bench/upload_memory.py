"""The API's memory while it takes the largest batch uploads it accepts, several at once.

    python -m bench.upload_memory [--concurrent 3] [--jsonl-mib 200] [--json-mib 16]

Starts Redis and the API as `genqueue api` serves it (gunicorn, one process; genqueue/launcher.py;
no worker: this measures accepting uploads), then sends `--concurrent` maximal JSONL uploads at once
(GENQUEUE_BATCH_MAX_BYTES, streamed from files of 4 KiB lines), then as many maximal JSON bodies
(GENQUEUE_BATCH_MAX_JSON_BYTES, parsed whole), sampling the API process's RSS every 50 ms. Prints the
idle RSS, the peak during each kind of upload, and the growth over idle, which the README's Security
section quotes as the bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import print_table, rss_mib  # noqa: E402
from genqueue.client import Client  # noqa: E402
from genqueue.launcher import ApiProcess, RedisServer  # noqa: E402

LINE_BYTES = 4096


def write_jsonl(path: Path, size: int) -> int:
    """A JSONL batch of about `size` bytes in LINE_BYTES lines; returns its exact size."""
    filler = "x" * (LINE_BYTES - 120)
    with path.open("w") as out:
        written = index = 0
        while written + LINE_BYTES <= size:
            line = json.dumps({"custom_id": f"r{index}", "body": {"prompt": f"{index} {filler}", "max_tokens": 8}})
            line = line[: LINE_BYTES - 1] if len(line) >= LINE_BYTES else line
            out.write(line + "\n")
            written += len(line) + 1
            index += 1
    return path.stat().st_size


def write_json(path: Path, size: int) -> int:
    filler = "x" * (LINE_BYTES - 100)
    count = max(1, size // LINE_BYTES - 1)
    path.write_text(json.dumps({"requests": [{"prompt": f"{i} {filler}", "max_tokens": 8} for i in range(count)]}))
    return path.stat().st_size


def worker_pid(api: ApiProcess) -> int:
    """gunicorn's one worker process (the child that serves requests)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{api.pid}/task/{api.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("gunicorn started no worker")


def peak_during(pid: int, uploads: list[threading.Thread]) -> float:
    peak = rss_mib(pid)[0]
    for thread in uploads:
        thread.start()
    while any(thread.is_alive() for thread in uploads):
        peak = max(peak, rss_mib(pid)[0])
        time.sleep(0.05)
    return peak


def upload_threads(url: str, path: Path, size: int, jsonl: bool, count: int, errors: list) -> list[threading.Thread]:
    def upload() -> None:
        try:
            with Client(url, timeout_s=900) as client, path.open("rb") as body:
                if jsonl:
                    client.create_batch(body, size)
                else:
                    client.json("POST", "/v1/batches", body.read(), {"Content-Type": "application/json"}, 900, (201,))
        except Exception as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    return [threading.Thread(target=upload) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=3)
    parser.add_argument("--jsonl-mib", type=int, default=200, help="GENQUEUE_BATCH_MAX_BYTES, in MiB")
    parser.add_argument("--json-mib", type=int, default=16, help="GENQUEUE_BATCH_MAX_JSON_BYTES, in MiB")
    args = parser.parse_args()
    jsonl_bytes, json_bytes = args.jsonl_mib << 20, args.json_mib << 20
    with tempfile.TemporaryDirectory(prefix="genqueue-upload-") as work:
        work_dir = Path(work)
        jsonl_size = write_jsonl(work_dir / "batch.jsonl", jsonl_bytes)
        json_size = write_json(work_dir / "batch.json", json_bytes)
        redis_server = RedisServer(data_dir=work_dir / "redis")
        settings = {
            "redis_url": redis_server.url(),
            "batch_max_bytes": jsonl_bytes,
            "batch_max_json_bytes": json_bytes,
            "batch_max_items": 1_000_000,
            "max_queued_jobs": 10_000_000,
            # No worker runs, and the batches' items pile up: the no-worker refusal and the batch limits are off.
            "no_worker_grace_s": 0,
            "max_queued_batch_items": 0,
            "max_queued_batch_items_per_key": 0,
        }
        api = ApiProcess(settings, log_dir=work_dir).wait_ready()
        try:
            pid = worker_pid(api)
            idle = rss_mib(pid)[0]
            errors: list[BaseException] = []
            jsonl_peak = peak_during(
                pid, upload_threads(api.url, work_dir / "batch.jsonl", jsonl_size, True, args.concurrent, errors)
            )
            json_peak = peak_during(
                pid, upload_threads(api.url, work_dir / "batch.json", json_size, False, args.concurrent, errors)
            )
        finally:
            api.stop()
            redis_server.stop()
    if errors:
        raise SystemExit(f"an upload failed: {errors[0]}")
    rows = [
        [
            f"{args.concurrent} JSONL uploads of {jsonl_size / 2**20:.0f} MiB at once",
            idle,
            jsonl_peak,
            jsonl_peak - idle,
        ],
        [f"{args.concurrent} JSON bodies of {json_size / 2**20:.0f} MiB at once", idle, json_peak, json_peak - idle],
    ]
    print_table(
        "API process RSS (MiB) while it takes maximal batch uploads",
        ["", "idle", "peak", "growth"],
        rows,
    )


if __name__ == "__main__":
    main()
