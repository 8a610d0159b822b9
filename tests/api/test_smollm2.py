"""End-to-end answers of the real default model through a real worker."""

from tests.helpers import parse_sse, sse_text, wait_job


def test_greedy_capital_of_france_mentions_paris(smol_client):
    body = {"prompt": "What is the capital of France?", "temperature": 0}
    job_id = smol_client.post("/v1/jobs", json=body).json["id"]
    job = wait_job(smol_client, job_id)
    assert job["status"] == "succeeded"
    assert "Paris" in job["result"]["response"]
    assert job["result"]["finish_reason"] == "stop"
    events = parse_sse(smol_client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    assert sse_text(events) == job["result"]["response"]


def test_multibyte_output_streams_whole_characters(smol_client):
    body = {"prompt": "Reply with three emoji about the sea and the word café.", "temperature": 0, "max_tokens": 40}
    job_id = smol_client.post("/v1/jobs", json=body).json["id"]
    job = wait_job(smol_client, job_id)
    events = parse_sse(smol_client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    assert "\ufffd" not in job["result"]["response"]
    assert sse_text(events) == job["result"]["response"]
