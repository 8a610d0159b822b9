"""Webhooks end to end: a real local HTTP receiver that verifies every request with the Standard Webhooks
reference library, real webhook worker processes (`genqueue webhooks worker`), the tiny model's worker.
Delivery, a retry after a 500, no redirects, giving up, refusals at submit, a batch, and a webhook
worker killed mid-delivery."""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from genqueue.launcher import WebhookWorkerProcess
from tasks.store import keys
from tests.conftest import REPO, TINY_DB, WEBHOOK_DB, make_client, redis_url
from tests.helpers import wait_job

SECRET = "whsec_" + base64.b64encode(b"genqueue-webhook-test-secret-32b").decode()
ALLOWED = "*,127.0.0.1"  # any public address, and the receiver's loopback address: no other private one
MAX_ATTEMPTS, RETRY_BASE_S, TIMEOUT_S = 3, 0.5, 2
LEASE_S = 3 * TIMEOUT_S + 5  # tasks/runtime/webhooks.py lease_s: how long a worker keeps an event it was handed
DELIVERY_TIMEOUT_S = 60  # every wait for a delivery is bounded by this (a loaded machine is slow)


class Receiver:
    """An HTTP server on loopback that records each POST and verifies its signature. plan[path] lists
    the statuses to answer in order (then 200); hold[path] makes the first request wait for an Event."""

    def __init__(self):
        self.requests: list[dict] = []
        self.plan: dict[str, list[int]] = {}
        self.hold: dict[str, threading.Event] = {}
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {name.lower(): value for name, value in self.headers.items()}
                try:
                    payload, error = Webhook(SECRET).verify(body, headers), None
                except WebhookVerificationError as exc:
                    payload, error = None, str(exc)
                record = {"path": self.path, "headers": headers, "body": body, "payload": payload, "error": error}
                record["at"] = time.monotonic()
                with receiver.arrived:
                    receiver.requests.append(record)
                    receiver.arrived.notify_all()
                held = receiver.hold.pop(self.path, None)
                if held is not None:
                    held.wait(DELIVERY_TIMEOUT_S)
                status = (receiver.plan.get(self.path) or [200]).pop(0)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/hooks/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]

    def wait(self, path: str, count: int = 1, timeout_s: float = DELIVERY_TIMEOUT_S) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        with self.arrived:
            while len(self.at(path)) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.at(path))} of {count} requests at {path}: {self.requests}"
                self.arrived.wait(left)
        return self.at(path)


def webhook_settings(db: int) -> dict:
    return {
        "redis_url": redis_url(db),
        "webhook_secret": SECRET,
        "webhook_allowed_hosts": ALLOWED,
        "webhook_max_attempts": MAX_ATTEMPTS,
        "webhook_retry_base_s": RETRY_BASE_S,
        "webhook_timeout_s": TIMEOUT_S,
        "webhook_concurrency": 2,
    }


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def webhook_worker(tiny_worker, tmp_path_factory):
    worker = WebhookWorkerProcess(webhook_settings(TINY_DB), log_dir=tmp_path_factory.mktemp("webhooks"), cwd=REPO)
    yield worker
    worker.stop()


@pytest.fixture
def client(webhook_worker):
    return make_client(TINY_DB, WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS=ALLOWED)


def metric(client, name: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_a_job_end_is_delivered_signed_with_the_job_as_get_returns_it(client, receiver):
    delivered_before = metric(client, 'genqueue_webhook_attempts_total{outcome="delivered"}')
    job_id = client.post(
        "/v1/jobs", json={"prompt": "Hi", "max_tokens": 3, "webhook": receiver.url + "/hooks/ok?team=a"}
    )
    job_id = job_id.json["id"]
    job = wait_job(client, job_id)
    [request] = receiver.wait("/hooks/ok?team=a")
    assert request["error"] is None, request["error"]  # the reference library verified the signature
    assert request["headers"]["webhook-id"] == f"msg_{job_id}"
    assert request["headers"]["content-type"] == "application/json"
    assert request["payload"]["type"] == "job.succeeded"
    assert request["payload"]["data"] == job == client.get(f"/v1/jobs/{job_id}").json
    assert request["payload"]["timestamp"] >= job["finished_at"][:19]
    with pytest.raises(WebhookVerificationError):  # the signature is bound to the secret and the body
        Webhook(SECRET).verify(request["body"].replace(b"succeeded", b"failed"), request["headers"])
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(request["body"], request["headers"])
    deadline = time.monotonic() + 10
    while metric(client, 'genqueue_webhook_attempts_total{outcome="delivered"}') < delivered_before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_500_is_retried_after_its_backoff_with_the_same_id_and_body(client, receiver):
    failed_before = metric(client, 'genqueue_webhook_attempts_total{outcome="failed"}')
    receiver.plan["/hooks/flaky"] = [500]
    job_id = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 2, "webhook": receiver.url + "/hooks/flaky"})
    first, second = receiver.wait("/hooks/flaky", 2)
    assert first["error"] is None and second["error"] is None
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == f"msg_{job_id.json['id']}"
    assert first["body"] == second["body"]
    assert int(second["headers"]["webhook-timestamp"]) >= int(first["headers"]["webhook-timestamp"])
    # after its backoff, and well before a lease (3 timeouts and 5 s) could have run out: a retry
    assert RETRY_BASE_S <= second["at"] - first["at"] < LEASE_S - 3
    time.sleep(RETRY_BASE_S * 4 + 1)  # delivered: no third attempt comes
    assert len(receiver.at("/hooks/flaky")) == 2
    assert metric(client, 'genqueue_webhook_attempts_total{outcome="failed"}') >= failed_before + 1


def test_a_redirect_is_not_followed_and_the_event_is_given_up_after_the_last_attempt(client, receiver):
    abandoned_before = metric(client, "genqueue_webhooks_abandoned_total")
    receiver.plan["/hooks/moved"] = [302] * MAX_ATTEMPTS
    job_id = client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 2, "webhook": receiver.url + "/hooks/moved"})
    job_id = job_id.json["id"]
    receiver.wait("/hooks/moved", MAX_ATTEMPTS)
    redis_client = client.application.extensions["genqueue.jobs"].store.redis
    deadline = time.monotonic() + 10
    while redis_client.exists(keys.webhook(f"msg_{job_id}")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(RETRY_BASE_S * 16 + 1)  # longer than another backoff: nothing more comes
    assert len(receiver.at("/hooks/moved")) == MAX_ATTEMPTS
    assert receiver.at("/hooks/redirected") == []
    assert metric(client, "genqueue_webhooks_abandoned_total") >= abandoned_before + 1


def test_a_batch_end_is_delivered_once_with_the_batch_as_get_returns_it(client, receiver):
    requests = [{"custom_id": f"r{i}", "prompt": f"item {i}", "max_tokens": 2} for i in range(2)]
    created = client.post("/v1/batches", json={"requests": requests, "webhook": receiver.url + "/hooks/batch"})
    assert created.status_code == 201, created.json
    [request] = receiver.wait("/hooks/batch")
    assert request["error"] is None
    assert request["payload"]["type"] == "batch.completed"
    assert request["headers"]["webhook-id"] == f"msg_{created.json['id']}"
    data, now = request["payload"]["data"], client.get(f"/v1/batches/{created.json['id']}").json
    assert data["status"] == "completed" and data["request_counts"]["completed"] == 2
    assert data.pop("expires_at")[:15] == now.pop("expires_at")[:15]  # read from the TTL left, to the second
    assert data == now
    time.sleep(1)
    assert len(receiver.at("/hooks/batch")) == 1  # one call for the batch, none per item


def test_a_queued_job_cancelled_by_the_api_is_delivered_as_cancelled(client, receiver):
    body = {"prompt": "Hi", "queue": "gpu", "webhook": receiver.url + "/hooks/cancelled"}  # no gpu worker: queued
    job_id = client.post("/v1/jobs", json=body).json["id"]
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    [request] = receiver.wait("/hooks/cancelled")
    assert request["payload"]["type"] == "job.cancelled" and request["payload"]["data"]["status"] == "cancelled"


def test_a_url_that_can_never_be_delivered_is_a_400_at_submit_on_every_surface(client, receiver):
    for url, why in [
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]:9/hook", "loopback"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
        ("ftp://127.0.0.1/hook", "http"),
        ("http://user:secret@127.0.0.1/hook", "credentials"),
    ]:
        response = client.post("/v1/jobs", json={"prompt": "Hi", "webhook": url})
        assert response.status_code == 400, (url, response.json)
        assert response.json["error"]["code"] == "invalid_webhook" and why in response.json["error"]["message"], url
        assert list(response.json["error"]["fields"]) == ["webhook"]
    private = "http://192.168.1.1/hook"
    model = client.get("/v1/models").json["data"][0]["id"]
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "webhook": private}
    openai = client.post("/v1/chat/completions", json=chat)
    assert openai.status_code == 400 and openai.json["error"]["param"] == "webhook"
    workers_ai = client.post("/ai/run/@cf/meta/llama-2-7b-chat-int8", json={"prompt": "Hi", "webhook": private})
    assert workers_ai.status_code == 400 and workers_ai.json["errors"][0]["code"] == "invalid_webhook"
    batch = client.post("/v1/batches", json={"requests": [{"prompt": "Hi"}], "webhook": private})
    assert batch.status_code == 400 and batch.json["error"]["code"] == "invalid_webhook"
    jsonl = client.post(
        "/v1/batches",
        query_string={"webhook": private},
        data=b'{"body": {"prompt": "Hi"}}\n',
        content_type="application/jsonl",
    )
    assert jsonl.status_code == 400 and jsonl.json["error"]["code"] == "invalid_webhook"
    per_item = client.post("/v1/batches", json={"requests": [{"prompt": "Hi", "webhook": receiver.url + "/x"}]})
    assert per_item.status_code == 400 and "webhook" in per_item.json["error"]["fields"]["requests"]["0"]
    unsigned = make_client(TINY_DB).post("/v1/jobs", json={"prompt": "Hi", "webhook": receiver.url + "/x"})
    assert unsigned.status_code == 400 and "not enabled" in unsigned.json["error"]["message"]
    assert receiver.at("/x") == []


def test_a_webhook_worker_killed_mid_delivery_leaves_the_event_to_another(receiver, tmp_path):
    """At least once: the worker dies (kill -9) while the receiver holds its request; a new worker
    delivers the event again, with the same id, once the lease runs out."""
    client = make_client(WEBHOOK_DB, WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS=ALLOWED)
    client.application.extensions["genqueue.jobs"].store.redis.flushdb()
    first = WebhookWorkerProcess(webhook_settings(WEBHOOK_DB), log_dir=tmp_path, cwd=REPO)
    second = None
    release = receiver.hold["/hooks/held"] = threading.Event()
    try:
        body = {"prompt": "Hi", "queue": "gpu", "webhook": receiver.url + "/hooks/held"}  # no model worker here
        job_id = client.post("/v1/jobs", json=body).json["id"]
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200  # its end: the event is queued
        [held] = receiver.wait("/hooks/held")
        first.kill()  # SIGKILL while its request is held open
        release.set()
        second = WebhookWorkerProcess(webhook_settings(WEBHOOK_DB), log_dir=tmp_path, cwd=REPO)
        again = receiver.wait("/hooks/held", 2)[1]
        assert again["error"] is None
        assert again["headers"]["webhook-id"] == held["headers"]["webhook-id"] == f"msg_{job_id}"
        assert json.loads(again["body"]) == json.loads(held["body"])
    finally:
        release.set()
        first.stop()
        if second is not None:
            second.stop()
