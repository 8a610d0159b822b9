import json

import pytest

from engine.errors import ModelPreparationError
from engine.prepare import prepare_model


def test_preparing_again_reuses_the_prepared_model(smollm2_dir):
    lines = []
    before = (smollm2_dir / "model.bin").stat().st_mtime_ns
    again = prepare_model(None, smollm2_dir.parent, progress=lines.append)
    assert again == smollm2_dir
    assert (smollm2_dir / "model.bin").stat().st_mtime_ns == before
    assert lines == [f"model 'smollm2-135m-instruct' is already prepared at {smollm2_dir}"]


def test_a_prepared_model_holds_tokenizer_and_metadata(smollm2_dir):
    for name in ("model.bin", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "genqueue.json"):
        assert (smollm2_dir / name).is_file(), name
    metadata = json.loads((smollm2_dir / "genqueue.json").read_text())
    assert metadata["quantization"] == "int8"
    assert metadata["max_context"] == 8192
    assert metadata["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_a_transformers_directory_converts_with_progress(tiny_dir):
    metadata = json.loads((tiny_dir / "genqueue.json").read_text())
    assert metadata["architecture"] == "LlamaForCausalLM"
    assert metadata["max_context"] == 512


def test_a_different_source_under_a_taken_name_is_refused(tiny_dir, smollm2_dir, tmp_path):
    hf_dir = tmp_path / "other"
    from tests.helpers import build_tiny_llama

    build_tiny_llama(hf_dir, smollm2_dir, seed=1)
    with pytest.raises(ModelPreparationError, match="--force"):
        prepare_model(hf_dir, tiny_dir.parent, name=tiny_dir.name, progress=lambda line: None)


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no config.json"),
        (lambda tmp: (tmp / "notes.txt").write_text("hi") and tmp / "notes.txt", "neither a .gguf file"),
    ],
)
def test_a_wrong_source_fails_with_a_clear_message(tmp_path, make_source, message):
    with pytest.raises(ModelPreparationError, match=message):
        prepare_model(make_source(tmp_path), tmp_path / "models", progress=lambda line: None)


def test_a_model_of_another_architecture_is_refused(tmp_path):
    source = tmp_path / "bert"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelPreparationError, match="BertModel"):
        prepare_model(source, tmp_path / "models", progress=lambda line: None)


def test_an_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(ModelPreparationError, match="unknown quantization"):
        prepare_model(None, tmp_path, quantization="int3", progress=lambda line: None)


@pytest.mark.parametrize("name", ["../escape", "/tmp/absolute", "a/b", "..", ".hidden", ""])
def test_a_model_name_must_be_a_plain_name(tiny_dir, tmp_path, name):
    hf_dir = tiny_dir.parent.parent / "hf"
    with pytest.raises(ModelPreparationError, match="plain name"):
        prepare_model(hf_dir, tmp_path / "models", name=name or "..", progress=lambda _: None)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "models").exists()


def test_a_directory_that_is_no_genqueue_model_is_never_replaced_without_force(tiny_dir, tmp_path):
    hf_dir = tiny_dir.parent.parent / "hf"
    taken = tmp_path / "models" / "notes"
    taken.mkdir(parents=True)
    (taken / "thesis.txt").write_text("years of work")
    with pytest.raises(ModelPreparationError, match="not a prepared genqueue model.*--force"):
        prepare_model(hf_dir, tmp_path / "models", name="notes", progress=lambda _: None)
    assert (taken / "thesis.txt").read_text() == "years of work"
    prepared = prepare_model(hf_dir, tmp_path / "models", name="notes", force=True, progress=lambda _: None)
    assert (prepared / "model.bin").is_file() and not (prepared / "thesis.txt").exists()
