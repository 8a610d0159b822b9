"""LoRA variants of a prepared model: merging a PEFT adapter, and finding the merged variants.

CTranslate2 cannot apply an adapter at run time, so each adapter is merged into the base model's
weights and converted on its own (`engine.prepare.prepare_lora`). The result is a sibling directory
of the base, `<base>.lora-<name>`, and the base's genqueue.json lists it under "lora" (name ->
directory name). A worker loads the base and every variant listed there; a request's `lora` picks
one, and the batcher only batches requests of the same variant together.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from engine.errors import ModelPreparationError

METADATA_KEY = "lora"  # in the base's genqueue.json: {name: sibling directory name}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_CONFIG = "adapter_config.json"


def variant_dir_name(base_name: str, lora: str) -> str:
    return f"{base_name}.lora-{lora}"


def variant_dirs(model_dir: str | Path, metadata: dict) -> dict[str, Path]:
    """The merged variants recorded in a base model's metadata, by name."""
    parent = Path(model_dir).parent
    return {name: parent / dirname for name, dirname in sorted((metadata.get(METADATA_KEY) or {}).items())}


def check_name(name: str, what: str = "lora name") -> None:
    """A plain name (a directory name under the models directory): no '/', no '..', not absolute."""
    if not NAME_PATTERN.match(name or "") or ".." in name:
        raise ModelPreparationError(
            f"invalid {what} {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (a plain name, not a path)"
        )


def check_adapter(adapter_dir: Path) -> dict:
    """The adapter's PEFT config; raises unless adapter_dir holds a LoRA adapter."""
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelPreparationError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    config = json.loads(config_path.read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ModelPreparationError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; only LoRA is merged")
    return config


def merge_adapter(hf_dir: Path, adapter_dir: Path, merged_dir: Path, copy_files: list[str]) -> None:
    """Write the base model at hf_dir with the adapter merged into its weights (float32) to merged_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    except Exception as exc:  # shape mismatches, missing target modules, unreadable weights
        raise ModelPreparationError(f"could not merge the adapter {adapter_dir} into {hf_dir}: {exc}") from exc
    merged.save_pretrained(merged_dir)
    for name in copy_files:
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, merged_dir / name)
