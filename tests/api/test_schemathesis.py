"""Property-based tests of every documented operation against /openapi.json (schemathesis).

Requests run in-process against the real app, a real Redis and the tiny model's real worker: no
response may be a 5xx, and every response must match what the document says of it.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import TINY_DB, make_client

EXAMPLES_PER_OPERATION = 15
# No 5xx, and every response as documented. (Not "every schema-valid body is accepted": some rules span
# fields, e.g. exactly one of prompt or messages, and OpenAPI 3.0 cannot state them.)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def test_no_server_errors_and_responses_match_the_document(tiny_worker):
    # A short sync timeout: a synchronous endpoint that waits for a job answers 504, not after minutes.
    app = make_client(TINY_DB, SYNC_TIMEOUT_S=5).application
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    failures, checked = {}, []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case):
            case.call_and_validate(checks=CHECKS)

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every operation is tried; all failures are reported
            failures[operation.label] = str(exc)[:2000]
        checked.append(operation.label)
    assert len(checked) >= 20, checked
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def deep(depth: int) -> dict:
    """A body whose prompt nests lists depth deep: past the API's limit (64), within json.dumps'."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return {"prompt": value}


NOT_AN_ID = "job_" + "a" * 24 + ":log"
UNKNOWN = {"job_id": "job_" + "a" * 24}  # an id of the right form that no job has
MODEL = {"model": "@cf/meta/llama-2-7b-chat-int8"}
JSON_PATHS = (
    ("/v1/jobs", {}),
    ("/v1/chat/completions", {}),
    ("/v1/completions", {}),
    ("/ai/run/{model}", {"path_parameters": MODEL}),
    ("/v1/batches", {}),
)
# Odd input (issue 13) as cases of the documented operations: each must be answered as documented, with
# this status (and for a body, this error code).
ODD_INPUTS = [
    *(("POST", path, {"body": deep(200), "media_type": "application/json", **more}, 400) for path, more in JSON_PATHS),
    ("POST", "/v1/jobs", {"body": {"prompt": "hi"}, "media_type": "application/json", "query": {"wait": "1.5"}}, 400),
    ("GET", "/v1/jobs/{job_id}", {"path_parameters": {"job_id": NOT_AN_ID}}, 404),
    ("GET", "/v1/jobs/{job_id}", {"path_parameters": UNKNOWN, "query": {"wait": "1.5"}}, 400),
    ("GET", "/v1/jobs/{job_id}", {"path_parameters": UNKNOWN, "query": {"wait": "9" * 26}}, 400),
    ("GET", "/v1/jobs/{job_id}/stream", {"path_parameters": {"job_id": NOT_AN_ID}}, 404),
    ("GET", "/v1/jobs/{job_id}/stream", {"path_parameters": UNKNOWN, "headers": {"Last-Event-ID": "9" * 26}}, 400),
    ("GET", "/v1/jobs/{job_id}/stream", {"path_parameters": UNKNOWN, "headers": {"Last-Event-ID": "²"}}, 400),
    ("DELETE", "/v1/jobs/{job_id}", {"path_parameters": {"job_id": NOT_AN_ID}}, 404),
    ("GET", "/v1/batches/{batch_id}", {"path_parameters": {"batch_id": "batch_x:results"}}, 404),
]


@pytest.mark.parametrize(
    "method, path, case, status", ODD_INPUTS, ids=[f"{m} {p} {sorted(c)}" for m, p, c, _ in ODD_INPUTS]
)
def test_odd_input_is_a_documented_4xx(tiny_worker, method, path, case, status):
    app = make_client(TINY_DB).application
    operation = schemathesis.openapi.from_wsgi("/openapi.json", app)[path][method]
    response = operation.Case(**case).call_and_validate(checks=CHECKS)
    assert response.status_code == status
    if "wait" in case.get("query", {}):
        assert response.json()["error"]["fields"] == {"wait": ["Must be an integer from 0 to 60."]}
    elif "body" in case:
        assert "json_too_deep" in response.text
