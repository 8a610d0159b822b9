"""genqueue's engine: CTranslate2 generation, tokenizer and chat template, model preparation.

Imports nothing of Flask, Celery or Redis; takes its settings as arguments. The request and result
types and the errors import no engine runtime, so the API can build requests without loading
CTranslate2: `Model` (and with it ctranslate2) is imported on first use only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import (
    ChatTemplateError,
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelPreparationError,
    UnknownLoraError,
)
from engine.request import FinishReason, GenerationRequest, GenerationResult, Message, SamplingOptions, Usage

if TYPE_CHECKING:
    from engine.model import EncodedPrompt, Model

_RUNTIME = {"Model": "engine.model", "EncodedPrompt": "engine.model"}


def __getattr__(name: str) -> Any:
    if name in _RUNTIME:
        import importlib

        return getattr(importlib.import_module(_RUNTIME[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "ChatTemplateError",
    "ContextLengthExceededError",
    "EncodedPrompt",
    "EngineError",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequestError",
    "Message",
    "Model",
    "ModelNotFoundError",
    "ModelPreparationError",
    "SamplingOptions",
    "UnknownLoraError",
    "Usage",
]
