"""Every error the engine raises, in one hierarchy.

Input errors (the request cannot be served as asked) are apart from engine failures, so callers can
refuse the first and retry or report the second.
"""


class EngineError(Exception):
    """Base class of every error raised by genqueue's engine."""

    code = "engine_error"


class InvalidRequestError(EngineError):
    """Raised when a request cannot be served as asked; retrying it unchanged cannot succeed."""

    code = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    """Raised when the prompt plus max_tokens does not fit in the model's context window."""

    code = "context_length_exceeded"


class ChatTemplateError(InvalidRequestError):
    """Raised when the chat template cannot render the messages (or the model has no template)."""

    code = "chat_template_error"


class UnknownLoraError(InvalidRequestError):
    """Raised when a request names a LoRA variant the model does not have."""

    code = "unknown_lora"


class ModelNotFoundError(EngineError):
    """Raised when a model directory is missing or does not hold a prepared model."""

    code = "model_not_found"


class ModelPreparationError(EngineError):
    """Raised when a model source is missing, of the wrong kind, or fails to convert."""

    code = "model_preparation_failed"


class EngineOutOfMemoryError(EngineError):
    """Raised when the engine ran out of memory even for a request alone (a batch that does is split)."""

    code = "out_of_memory"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an engine failure is an out-of-memory one (CUDA's RuntimeError, or the host's MemoryError)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
