"""Property-based tests of every documented operation against /openapi.json (schemathesis).

Requests run in-process against the real app, a real Redis and the tiny model's real worker: no
response may be a 5xx, and every response must match what the document says of it.
"""

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
