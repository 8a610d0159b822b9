import json

import pytest
import torch

from engine import GenerationRequest, Model, SamplingOptions
from engine.errors import ModelPreparationError
from engine.lora import variant_dirs
from engine.prepare import prepare_lora, prepare_model
from tests.conftest import LORA_NAME
from tests.helpers import generate

PROMPT = "Hello there, how are you?"
TOKENS = 16


def transformers_greedy(model, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=TOKENS, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_the_merged_variant_matches_transformers_merged_model_and_differs_from_the_base(lora_models):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    options = SamplingOptions(temperature=0, max_tokens=TOKENS)
    base = Model(lora_models.base_dir, compute_type="float32")
    variant = Model(lora_models.variant_dir, compute_type="float32", lora=LORA_NAME)
    request = GenerationRequest(prompt=PROMPT, options=options)
    variant_request = GenerationRequest(
        prompt=PROMPT, options=SamplingOptions(temperature=0, max_tokens=TOKENS, lora=LORA_NAME)
    )
    prompt_ids = [base.tokenizer.token_id(token) for token in base.encode(request).tokens]

    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora_models.hf_dir), lora_models.adapter_dir)
    expected = base.tokenizer.decode(transformers_greedy(merged.merge_and_unload(), prompt_ids))
    plain = base.tokenizer.decode(transformers_greedy(LlamaForCausalLM.from_pretrained(lora_models.hf_dir), prompt_ids))

    assert generate(variant, variant_request).response == expected
    assert generate(base, request).response == plain
    assert expected != plain


def test_the_variant_is_recorded_in_the_base_metadata(lora_models):
    metadata = json.loads((lora_models.base_dir / "genqueue.json").read_text())
    assert variant_dirs(lora_models.base_dir, metadata) == {LORA_NAME: lora_models.variant_dir}
    variant = json.loads((lora_models.variant_dir / "genqueue.json").read_text())
    assert variant["lora_of"] == "base" and variant["quantization"] == "float32"
    assert variant["adapter"] == str(lora_models.adapter_dir)


def test_preparing_again_reuses_the_variant_and_rebuilding_the_base_keeps_it(lora_models):
    lines = []
    before = (lora_models.variant_dir / "model.bin").stat().st_mtime_ns
    prepare_lora(lora_models.base_dir, lora_models.adapter_dir, LORA_NAME, progress=lines.append)
    assert lines == [f"lora {LORA_NAME!r} of 'base' is already prepared at {lora_models.variant_dir}"]
    assert (lora_models.variant_dir / "model.bin").stat().st_mtime_ns == before
    prepare_model(
        lora_models.hf_dir, lora_models.base_dir.parent, "base", "float32", force=True, progress=lambda _: None
    )
    metadata = json.loads((lora_models.base_dir / "genqueue.json").read_text())
    assert metadata["lora"] == {LORA_NAME: lora_models.variant_dir.name}


@pytest.mark.parametrize(
    "setup, name, message",
    [
        (lambda tmp, m: tmp, LORA_NAME, "no adapter_config.json"),
        (lambda tmp, m: (tmp / "adapter_config.json").write_text('{"peft_type": "IA3"}') and tmp, "x", "only LoRA"),
        (lambda tmp, m: m.adapter_dir, "bad/name", "invalid lora name"),
        (lambda tmp, m: m.adapter_dir, "", "invalid lora name"),
    ],
)
def test_bad_adapters_and_names_are_refused(lora_models, tmp_path, setup, name, message):
    with pytest.raises(ModelPreparationError, match=message):
        prepare_lora(lora_models.base_dir, setup(tmp_path, lora_models), name, progress=lambda _: None)


def test_a_variant_needs_a_prepared_base(lora_models, tmp_path):
    with pytest.raises(ModelPreparationError, match="prepare the base model first"):
        prepare_lora(tmp_path, lora_models.adapter_dir, "x", progress=lambda _: None)
    with pytest.raises(ModelPreparationError, match="itself a LoRA variant"):
        prepare_lora(lora_models.variant_dir, lora_models.adapter_dir, "x", progress=lambda _: None)


def cli(*args: str):
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.run(
        [sys.executable, "-m", "genqueue.cli", "model", "prepare", *args], cwd=REPO, capture_output=True, text=True
    )


def test_the_cli_merges_an_adapter_as_a_variant_of_the_base(lora_models, tmp_path):
    import shutil

    base = shutil.copytree(lora_models.base_dir, tmp_path / "base")  # a copy: the lora worker's base stays as is
    done = cli("--lora", str(lora_models.adapter_dir), "--name", "cli", "--base", str(base))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "base.lora-cli")
    metadata = json.loads((base / "genqueue.json").read_text())
    assert metadata["lora"] == {LORA_NAME: f"base.lora-{LORA_NAME}", "cli": "base.lora-cli"}


@pytest.mark.parametrize(
    "args, says",
    [
        (["--name", "x", "some-source"], "not SOURCE"),
        (["--quantization", "int8"], "takes its base model's quantization"),
        ([], "--lora needs --name"),
    ],
)
def test_the_cli_refuses_lora_options_that_cannot_apply(lora_models, args, says):
    base = ["--lora", str(lora_models.adapter_dir), "--base", str(lora_models.base_dir)]
    if "--name" not in args and args:
        args = [*args, "--name", "x"]
    done = cli(*base, *args)
    assert done.returncode == 2 and says in done.stderr, done.stderr
