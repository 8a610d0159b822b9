"""Test helpers: building a tiny model, reading SSE streams, waiting for jobs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city name"}},
        "required": ["city"],
    },
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build_tiny_llama(hf_dir: Path, tokenizer_source: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Save a random 2-layer Llama (hidden 64, context 512) with the tokenizer files of another model.
    A larger initializer_range spreads the logits, so greedy outputs vary more than one repeated token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, hf_dir / name)
    return hf_dir


def parse_sse(text: str) -> list[dict]:
    """Events of an SSE body as dicts with 'id', 'event' and 'data' (raw string)."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        event = {"id": None, "event": None, "data": None}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            if name in event:
                event[name] = value
        events.append(event)
    return events


def sse_text(events: list[dict]) -> str:
    """The response text a client assembles from an SSE stream's chunks."""
    return "".join(
        json.loads(e["data"])["response"]
        for e in events
        if e["data"] not in (None, "[DONE]") and "response" in json.loads(e["data"])
    )


def wait_job(client, job_id: str, timeout_s: int = 60) -> dict:
    response = client.get(f"/v1/jobs/{job_id}?wait={timeout_s}")
    assert response.status_code == 200, response.json
    return response.json


def build_lora_adapter(adapter_dir: Path, hf_dir: Path, seed: int = 1) -> Path:
    """Save a PEFT LoRA adapter for the model at hf_dir with random (non-zero) weights, so merging it
    changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(LlamaForCausalLM.from_pretrained(hf_dir), config).save_pretrained(adapter_dir)
    return adapter_dir


def weather_few_shot(city: str) -> list[dict]:
    """Chat turns that teach a small model the documented <tool_call> format, then ask about city."""
    messages = []
    for example in ("Rome", "Berlin", "Madrid"):
        call = json.dumps({"name": "get_weather", "arguments": {"city": example}})
        messages += [
            {"role": "user", "content": f"What is the weather in {example}?"},
            {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
        ]
    return [*messages, {"role": "user", "content": f"What is the weather in {city}?"}]


def generate(model, request):
    """One request through Model.generate_batch alone: its GenerationResult (or its error, raised)."""
    outcome = model.generate_batch([model.encode(request)])[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def native_request(body: dict):
    """The GenerationRequest the native API builds from a request body (POST /v1/jobs)."""
    from api.schemas import GenerationSchema, to_submission

    return to_submission(GenerationSchema().load(body)).request
