"""End-to-end answers of the real default model through a real worker."""

import json

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
    # Continuing Japanese, SmolLM2 writes 3-byte UTF-8 characters, most split over byte-level tokens.
    body = {"prompt": "日本の首都は", "raw": True, "temperature": 0, "max_tokens": 40}
    job_id = smol_client.post("/v1/jobs", json=body).json["id"]
    response = wait_job(smol_client, job_id)["result"]["response"]
    assert sum(ord(c) > 0x7FF for c in response) >= 5, response  # the output really is multibyte
    assert "\ufffd" not in response
    events = parse_sse(smol_client.get(f"/v1/jobs/{job_id}/stream").get_data(as_text=True))
    *chunks, end = [json.loads(e["data"]) for e in events[:-1]]
    texts = [chunk["response"] for chunk in chunks]
    assert all("\ufffd" not in text for text in texts)  # no chunk ends or starts inside a character
    assert "".join(texts) == response
    # Some characters took several tokens: fewer chunks than tokens, each character sent once whole.
    assert len(texts) < end["usage"]["completion_tokens"]
