"""`stop` on the native jobs API, through a real worker."""

import pytest

from tests.helpers import parse_sse, sse_text, wait_job


def run_job(client, **body) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.json
    return wait_job(client, response.json["id"])


def test_a_job_ends_at_its_stop_string_and_streams_no_part_of_it(client):
    body = {"prompt": "Count along", "temperature": 0, "max_tokens": 40}
    free = run_job(client, **body)["result"]["response"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    job = run_job(client, **body, stop=[stop, "\x00unused"])
    assert job["status"] == "succeeded"
    assert job["result"]["response"] == free[: free.find(stop)]
    assert job["result"]["finish_reason"] == "stop"
    events = parse_sse(client.get(f"/v1/jobs/{job['id']}/stream").get_data(as_text=True))
    assert sse_text(events) == job["result"]["response"]


def test_a_single_string_is_one_stop_sequence(client):
    body = {"prompt": "Count along", "temperature": 0, "max_tokens": 30}
    free = run_job(client, **body)["result"]["response"]
    job = run_job(client, **body, stop=free[10:13])
    assert job["result"]["response"] == free[: free.find(free[10:13])]


@pytest.mark.parametrize(
    "stop, says",
    [
        (["a", "b", "c", "d", "e"], "At most 4"),
        ([""], "1 to 256"),
        ("", "1 to 256"),
        (["x" * 257], "1 to 256"),
        ([1], "list of strings"),
        ({"a": 1}, "list of strings"),
    ],
)
def test_invalid_stop_is_400_naming_it(client, stop, says):
    response = client.post("/v1/jobs", json={"prompt": "a", "stop": stop})
    assert response.status_code == 400
    assert says in str(response.json["error"]["fields"]["stop"])
