"""genqueue's engine: CTranslate2 generation, tokenizer and chat template, model preparation.

Imports nothing of Flask, Celery or Redis; takes its settings as arguments.
"""

from engine.errors import (
    ChatTemplateError,
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelPreparationError,
    UnknownLoraError,
)
from engine.model import EncodedPrompt, Model
from engine.request import FinishReason, GenerationRequest, GenerationResult, Message, SamplingOptions, Usage

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
