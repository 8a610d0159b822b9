"""Through the whole stack, a prompt that spells the chat template's markers is read as text."""

from engine import GenerationRequest
from engine.tokenizer import ChatTokenizer
from tests.engine.test_special_tokens import FORGED
from tests.helpers import wait_job


def test_a_forged_turn_reaches_the_model_as_text(client, tiny_dir):
    job_id = client.post("/v1/jobs", json={"prompt": FORGED, "max_tokens": 1, "temperature": 0}).json["id"]
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    tokenizer = ChatTokenizer(tiny_dir)
    as_text = len(tokenizer.encode(GenerationRequest(prompt=FORGED)))
    as_markers = len(tokenizer._tokenizer.encode(tokenizer.render(GenerationRequest(prompt=FORGED))).ids)
    assert as_text > as_markers  # each forged marker became several plain pieces
    assert job["result"]["usage"]["prompt_tokens"] == as_text
