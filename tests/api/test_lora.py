"""A request's `lora` picks the merged variant that the worker loaded next to its base model."""

import torch

from engine import GenerationRequest, Model
from tests.conftest import LORA_NAME
from tests.helpers import wait_job

PROMPT = "Hello there, how are you?"
TOKENS = 16


def generate(client, **extra) -> dict:
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": TOKENS, **extra}
    job = wait_job(client, client.post("/v1/jobs", json=body).json["id"])
    assert job["status"] == "succeeded", job
    return job["result"]


def test_lora_picks_the_merged_variant_which_matches_transformers(lora_client, lora_models):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tokenizer = Model(lora_models.base_dir, compute_type="float32").tokenizer
    prompt_ids = tokenizer._tokenizer.encode(
        tokenizer.render(GenerationRequest(prompt=PROMPT)), add_special_tokens=False
    ).ids
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(lora_models.hf_dir), lora_models.adapter_dir
    ).merge_and_unload()
    with torch.no_grad():
        out = merged.generate(torch.tensor([prompt_ids]), max_new_tokens=TOKENS, do_sample=False)
    expected = tokenizer.decode(out[0, len(prompt_ids) :].tolist())

    with_lora = generate(lora_client, lora=LORA_NAME)
    base = generate(lora_client)
    assert with_lora["response"] == expected
    assert base["response"] != with_lora["response"]


def test_concurrent_requests_for_base_and_variant_each_get_their_own_model(lora_client):
    alone = {name: generate(lora_client, **({"lora": name} if name else {}))["response"] for name in (None, LORA_NAME)}
    ids = [
        (
            name,
            lora_client.post(
                "/v1/jobs",
                json={"prompt": PROMPT, "temperature": 0, "max_tokens": TOKENS, **({"lora": name} if name else {})},
            ).json["id"],
        )
        for name in (None, LORA_NAME) * 3
    ]
    for name, job_id in ids:
        assert wait_job(lora_client, job_id)["result"]["response"] == alone[name]


def test_an_unknown_lora_is_a_400_listing_the_known_ones(lora_client):
    response = lora_client.post("/v1/jobs", json={"prompt": "hi", "lora": "nope"})
    assert response.status_code == 400
    message = response.json["error"]["fields"]["lora"][0]
    assert message == f"unknown lora 'nope'; the workers serve: {LORA_NAME}"


def test_the_worker_announces_its_variants(lora_client):
    workers = lora_client.get("/readyz").json["workers"]
    assert [w["loras"] for w in workers] == [[LORA_NAME]]


def test_the_openai_model_list_names_the_variant_and_selecting_it_runs_the_lora(lora_client):
    models = [m["id"] for m in lora_client.get("/v1/models").json["data"]]
    base = lora_client.get("/readyz").json["workers"][0]["model"]
    assert models == [base, f"{base}:{LORA_NAME}"]
    for model, lora in ((base, None), (f"{base}:{LORA_NAME}", LORA_NAME)):
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0}
        answer = lora_client.post("/v1/chat/completions", json={**body, "max_tokens": TOKENS})
        assert answer.status_code == 200, answer.json
        native = generate(lora_client, **({"lora": lora} if lora else {}))
        assert answer.json["choices"][0]["message"]["content"] == native["response"], model
