"""The OpenAPI document is complete enough for a generated client: openapi-python-client (a maintained
generator from the package index) builds a client from the live server's /openapi.json, and that
client drives the main flows against the server and a real worker, bearer key included."""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from api.auth import hash_key
from tests.conftest import TINY_DB, serve

KEY = "gq_generated-client-key"
PACKAGE = "genqueue_generated_client"
GENERATOR = Path(sys.executable).parent / "openapi-python-client"
CONFIG = f"""
project_name_override: {PACKAGE}
package_name_override: {PACKAGE}
post_hooks: []
content_type_overrides:
  application/jsonl: application/octet-stream
"""


@pytest.fixture(scope="module")
def keyed_api(tiny_worker):
    server = serve(TINY_DB, API_KEYS=f"gen:{hash_key(KEY)}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def spec(keyed_api) -> dict:
    with urllib.request.urlopen(f"{keyed_api.url}/openapi.json", timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def generated(spec, tmp_path_factory):
    """The client package openapi-python-client generates from the served document."""
    if not GENERATOR.is_file():
        pytest.fail("the generated-client test needs openapi-python-client (pip install -e '.[test]')")
    work = tmp_path_factory.mktemp("generated")
    (work / "openapi.json").write_text(json.dumps(spec))
    (work / "config.yml").write_text(CONFIG)
    command = [str(GENERATOR), "generate", "--path", "openapi.json", "--config", "config.yml", "--meta", "none"]
    result = subprocess.run([*command, "--output-path", PACKAGE], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = [line for line in result.stdout.splitlines() if "will be omitted" in line or "ERROR" in line]
    assert skipped == [], result.stdout  # every operation and response of the document could be generated
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(work))


def test_the_document_bounds_max_tokens_by_the_served_model_and_names_the_key_scheme(spec):
    schemas = spec["components"]["schemas"]
    assert schemas["Generation"]["properties"]["max_tokens"]["maximum"] == 511  # the tiny model's context is 512
    assert schemas["ChatCompletion"]["properties"]["max_tokens"]["maximum"] == 511
    assert schemas["ChatCompletion"]["additionalProperties"] is False
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    submit = spec["paths"]["/v1/jobs"]["post"]
    assert {"401", "403", "429", "503"} <= set(submit["responses"])
    assert "Retry-After" in submit["responses"]["429"]["headers"]
    assert [p["name"] for p in submit["parameters"]] == ["Idempotency-Key", "wait"]
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert "content" in response or status in ("204",), f"{method} {path} {status} has no schema"


def test_a_generated_client_drives_jobs_chat_batches_and_models(generated, keyed_api):
    from genqueue_generated_client import AuthenticatedClient, Client
    from genqueue_generated_client.api.batches import create_batch, get_batch, list_batches
    from genqueue_generated_client.api.jobs import cancel_job, create_job, get_job, list_jobs
    from genqueue_generated_client.api.open_ai_compatible import chat_completions, list_models
    from genqueue_generated_client.api.open_ai_compatible_batches import upload
    from genqueue_generated_client.models import (
        Batch,
        BatchCreate,
        BatchItem,
        ChatCompletion,
        ChatMessage,
        ChatMessageRole,
        Error,
        FileObject,
        FileUpload,
        Generation,
        GenerationMetadata,
        Job,
        OpenAIBatch,
        OpenAIBatchCompletionWindow,
        OpenAIBatchEndpoint,
        OpenAIBatchObject,
    )
    from genqueue_generated_client.types import File

    client = AuthenticatedClient(base_url=keyed_api.url, token=KEY, timeout=60)
    body = Generation(
        prompt="Tell me", max_tokens=4, temperature=0.0, metadata=GenerationMetadata.from_dict({"a": "b"})
    )
    queued = create_job.sync_detailed(client=client, body=body, idempotency_key="gen-1")
    assert queued.status_code == 202 and isinstance(queued.parsed, Job)
    assert queued.headers["Location"] == f"/v1/jobs/{queued.parsed.id}"
    again = create_job.sync(client=client, body=body, idempotency_key="gen-1")
    assert again.id == queued.parsed.id  # the Idempotency-Key header went out

    job = get_job.sync(queued.parsed.id, client=client, wait=30)
    assert isinstance(job, Job) and job.status == "succeeded"
    assert job.result.usage.completion_tokens == 4 and job.metadata.to_dict() == {"a": "b"}
    listed = list_jobs.sync(client=client, limit=5)
    assert queued.parsed.id in [item.id for item in listed.data]
    waited = create_job.sync_detailed(client=client, body=body, wait=30)  # submit and wait in one request
    assert waited.status_code == 200 and isinstance(waited.parsed, Job) and waited.parsed.status == "succeeded"
    assert waited.parsed.id != job.id and waited.parsed.result.usage.completion_tokens == 4
    refused = cancel_job.sync_detailed(job.id, client=client)
    assert refused.status_code == 409 and isinstance(refused.parsed, Error)
    assert refused.parsed.error.code == "job_already_ended"

    chat = chat_completions.sync(
        client=client,
        body=ChatCompletion(
            model="tiny", messages=[ChatMessage(role=ChatMessageRole.USER, content="Hi")], max_tokens=3
        ),
    )
    assert chat.object_ == "chat.completion" and chat.usage.completion_tokens == 3
    assert isinstance(chat.choices[0].message.content, str)
    assert [model.id for model in list_models.sync(client=client).data] == ["tiny"]

    created = create_batch.sync(
        client=client, body=BatchCreate(requests=[BatchItem(prompt=f"n{i}", max_tokens=2) for i in range(3)])
    )
    assert isinstance(created, Batch) and created.request_counts.total == 3
    deadline = time.monotonic() + 60
    while (batch := get_batch.sync(created.id, client=client)).status not in ("completed", "completed_with_errors"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert isinstance(batch, Batch) and batch.request_counts.completed == 3

    # OpenAI's batch workflow through the same generated client: a multipart upload, then the other form.
    line = {"custom_id": "o1", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "Hi"}}
    upload_body = FileUpload(
        file=File(payload=io.BytesIO(json.dumps(line).encode()), file_name="in.jsonl"), purpose="batch"
    )
    source = upload.sync(client=client, body=upload_body)
    assert isinstance(source, FileObject) and source.purpose == "batch"
    made = create_batch.sync(
        client=client,
        body=OpenAIBatch(
            input_file_id=source.id,
            endpoint=OpenAIBatchEndpoint("/v1/completions"),
            completion_window=OpenAIBatchCompletionWindow("24h"),
        ),
    )
    assert isinstance(made, OpenAIBatchObject) and made.input_file_id == source.id
    listed_batches = {item.id: item for item in list_batches.sync(client=client, limit=10).data}
    assert isinstance(listed_batches[made.id], OpenAIBatchObject) and isinstance(listed_batches[created.id], Batch)

    anonymous = create_job.sync_detailed(client=Client(base_url=keyed_api.url), body=body)
    assert anonymous.status_code == 401 and isinstance(anonymous.parsed, Error)
    over = create_job.sync_detailed(client=client, body=Generation(prompt="Hi", max_tokens=511))
    assert over.status_code == 400 and over.parsed.error.code == "context_length_exceeded"
