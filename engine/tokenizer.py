"""Tokenizer and chat template of a prepared model, without importing transformers.

The worker needs only `tokenizers` and jinja2 here; the template is rendered the way transformers'
`apply_chat_template` does it (sandboxed jinja2, trim_blocks, lstrip_blocks), so prompts match.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from engine.errors import ChatTemplateError, InvalidRequestError, ModelNotFoundError
from engine.request import GenerationRequest
from engine.tools import Tool, system_prompt_section

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


def _token_content(value) -> str | None:
    # tokenizer_config stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str):
    raise ChatTemplateError(message)


class ChatTokenizer:
    """Turns a request into the token strings CTranslate2 takes, and ids back into text."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ModelNotFoundError(
                f"{model_dir} has no {TOKENIZER_FILE}; prepare the model with 'genqueue model prepare'"
            )
        self._tokenizer = Tokenizer.from_file(str(path))
        config = _read_json(model_dir / TOKENIZER_CONFIG_FILE)
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))

        template_path = model_dir / CHAT_TEMPLATE_FILE
        source = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        if isinstance(source, list):  # several named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        self._template = None
        # A template that mentions `tools` renders them itself; others get them in the system prompt.
        self.renders_tools = bool(source) and "tools" in source
        if source:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            self._template = env.from_string(source)

        self.end_tokens = self._end_tokens(model_dir)

    def _end_tokens(self, model_dir: Path) -> list[str]:
        """The tokens that end a turn: the eos token and any listed in generation_config.json."""
        ends = [self.eos_token] if self.eos_token else []
        ids = _read_json(model_dir / GENERATION_CONFIG_FILE).get("eos_token_id")
        for token_id in [ids] if isinstance(ids, int) else ids or []:
            token = self._tokenizer.id_to_token(token_id)
            if token and token not in ends:
                ends.append(token)
        return ends

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render(self, request: GenerationRequest) -> str:
        """The prompt text the model sees: the chat template applied, unless the request is raw."""
        if request.raw:
            if request.prompt is None:
                raise InvalidRequestError("raw=true takes a prompt, not messages: messages need the chat template")
            if request.tools:
                raise InvalidRequestError("raw=true sends the prompt as is: tools need the chat template")
            return request.prompt
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; send the prompt with raw=true")
        messages = (
            [{"role": "user", "content": request.prompt}]
            if request.prompt is not None
            else [{"role": m.role, "content": m.content} for m in request.messages]
        )
        extra = {}
        if request.tools and self.renders_tools:
            extra["tools"] = [tool.template_form() for tool in request.tools]
        elif request.tools:
            messages = _with_tools_in_system_prompt(messages, request.tools)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc

    def encode(self, request: GenerationRequest) -> list[str]:
        """Token strings for CTranslate2. A rendered template already holds its special tokens."""
        text = self.render(request)
        return self._tokenizer.encode(text, add_special_tokens=request.raw).tokens

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def _with_tools_in_system_prompt(messages: list[dict], tools: Sequence[Tool]) -> list[dict]:
    """The tools section appended to the first system message, or as a new first system message."""
    section = system_prompt_section(tools)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{section}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
