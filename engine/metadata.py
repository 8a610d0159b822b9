"""genqueue.json, the record a prepared model directory keeps of itself: the one reader and writer.

It names the model, its source and quantization, its context length, when it was prepared, and
the LoRA variants merged from it (engine/lora.py). A directory is a prepared model when it holds
both this file and CTranslate2's model.bin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METADATA_FILE = "genqueue.json"
WEIGHTS_FILE = "model.bin"


def is_prepared(model_dir: str | Path) -> bool:
    return (Path(model_dir) / WEIGHTS_FILE).is_file()


def read_metadata(model_dir: str | Path) -> dict[str, Any] | None:
    """The directory's record, or None unless it holds a prepared model."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file() or not is_prepared(model_dir):
        return None
    return json.loads(path.read_text())


def write_metadata(model_dir: str | Path, metadata: dict[str, Any]) -> None:
    """Replace the record atomically: readers see the old file or the new one, never half of one."""
    model_dir = Path(model_dir)
    temporary = model_dir / f".{METADATA_FILE}.tmp"
    temporary.write_text(json.dumps(metadata, indent=2) + "\n")
    temporary.replace(model_dir / METADATA_FILE)


def prepared_models(models_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every prepared model directly under models_dir, by name, with its record."""
    root = Path(models_dir)
    found = []
    for path in sorted(root.glob(f"*/{METADATA_FILE}")) if root.is_dir() else []:
        metadata = read_metadata(path.parent)
        if metadata is not None:
            found.append((path.parent, metadata))
    return found
