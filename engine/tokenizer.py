"""Tokenizer and chat template of a prepared model, without importing transformers.

The worker needs only `tokenizers` and jinja2 here; the template is rendered the way transformers'
`apply_chat_template` does it (sandboxed jinja2, trim_blocks, lstrip_blocks), so prompts match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from engine.errors import ChatTemplateError, ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from engine.request import GenerationRequest
from engine.tools import Tool, system_prompt_section

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
# What a ChatTokenizer is built from (a worker publishes them for the API: tasks/store/tokenizers.py).
CHAT_TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE)
METASPACE = "\u2581"  # SentencePiece's word-start mark


def _token_content(value) -> str | None:
    # tokenizer_config stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str):
    raise ChatTemplateError(message)


class ChatTokenizer:
    """Turns a request into the token strings CTranslate2 takes, and ids back into text.

    Built from a model directory, or from its tokenizer files' contents (`from_files`): the API
    counts a request's tokens with the files a worker published, exactly as that worker will."""

    def __init__(self, model_dir: str | Path):
        self._load(read_tokenizer_files(Path(model_dir)))

    @classmethod
    def from_files(cls, files: Mapping[str, str]) -> ChatTokenizer:
        """A tokenizer from the contents of CHAT_TOKENIZER_FILES (as read_tokenizer_files returns them)."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(files)
        return tokenizer

    def _load(self, files: Mapping[str, str]) -> None:
        self._tokenizer = Tokenizer.from_str(files[TOKENIZER_FILE])
        # A copy that reads special tokens' text as plain text (a separate object: the flag is per
        # tokenizer, and threads share the first one).
        self._plain = Tokenizer.from_str(files[TOKENIZER_FILE])
        self._plain.encode_special_tokens = True
        self._special_ids = {i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
        config = _parse_json(files.get(TOKENIZER_CONFIG_FILE))
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))

        source = template_of(files)
        self._template = None
        # A template that mentions `tools` renders them itself; others get them in the system prompt.
        self.renders_tools = isinstance(source, str) and "tools" in source
        if source:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            self._template = env.from_string(source)

        self.end_tokens = self._end_tokens(_parse_json(files.get(GENERATION_CONFIG_FILE)))

    def _end_tokens(self, generation_config: dict) -> list[str]:
        """The tokens that end a turn: the eos token and any listed in generation_config.json."""
        ends = [self.eos_token] if self.eos_token else []
        ids = generation_config.get("eos_token_id")
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
        return self._render(request)[0]

    def _render(self, request: GenerationRequest) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text, and the spans of it that came from the caller (message contents, the tools
        section): those are text, whatever special tokens they spell."""
        if request.raw:
            if request.prompt is None:
                raise InvalidRequestError("raw=true takes a prompt, not messages: messages need the chat template")
            if request.tools:
                raise InvalidRequestError("raw=true sends the prompt as is: tools need the chat template")
            return request.prompt, []
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; send the prompt with raw=true")
        messages = (
            [{"role": "user", "content": request.prompt}]
            if request.prompt is not None
            else [{"role": m.role, "content": m.content} for m in request.messages or ()]
        )
        extra = {}
        if request.tools and self.renders_tools:  # as JSON: tojson escapes '<' and '>'
            extra["tools"] = [tool.template_form() for tool in request.tools]
        elif request.tools:
            messages = _with_tools_in_system_prompt(messages, request.tools)
        marks = _Marks.for_texts(m["content"] for m in messages)
        try:
            marked = self._template.render(
                messages=[{**m, "content": marks.wrap(m["content"])} for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc
        return marks.unwrap(marked)

    def encode(self, request: GenerationRequest) -> list[str]:
        """Token strings for CTranslate2. Only the template's own markers become special tokens: the
        caller's text is tokenized as plain text, so `<|im_end|>` in a message cannot forge a turn. A raw
        prompt is tokenized as it is, special tokens included (the caller writes the whole prompt)."""
        return self._encode(*self._render(request), raw=request.raw)

    def _encode(self, text: str, spans: list[tuple[int, int]], raw: bool) -> list[str]:
        # A raw prompt gets the tokenizer's own additions (a BOS), unless it writes its BOS itself.
        writes_bos = bool(self.bos_token) and text.startswith(self.bos_token or "")
        encoding = self._tokenizer.encode(text, add_special_tokens=raw and not writes_bos)
        forged = [
            index
            for index, (token_id, (start, end)) in enumerate(zip(encoding.ids, encoding.offsets, strict=True))
            if token_id in self._special_ids and any(a < end and start < b for a, b in spans)
        ]
        if not forged:
            return encoding.tokens
        tokens = list(encoding.tokens)
        for index in reversed(forged):  # each forged special token becomes the plain pieces of its text
            start, end = encoding.offsets[index]
            tokens[index : index + 1] = self._plain_pieces(text[start:end])
        return tokens

    def fixed_prefix(self) -> tuple[str, ...]:
        """The tokens every chat prompt without a system message of its own starts with (the template's
        default system turn, when it has one), up to the last special token in them: text after a
        special token is tokenized on its own, so any user turn leaves them as they are."""
        if self._template is None:
            return ()
        a, b = (self.encode(GenerationRequest(prompt=text)) for text in ("a", "b"))
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        specials = {self._tokenizer.id_to_token(i) for i in self._special_ids}
        ends = [n + 1 for n in range(common) if a[n] in specials]
        return tuple(a[: ends[-1]]) if ends else ()

    def encode_within(self, request: GenerationRequest, max_context: int) -> list[str]:
        """encode(), refusing a request that cannot run: an empty prompt, or one whose tokens plus
        max_tokens exceed max_context (ContextLengthExceededError). The worker's check."""
        return self._within(*self._render(request), request, max_context)

    def check_within(self, request: GenerationRequest, max_context: int) -> None:
        """Raise as encode_within would, tokenizing only a prompt that might not fit: one whose tokens
        are at most most_tokens(), and that bound plus max_tokens fits, fits whatever its exact count
        (the API's check, run for every request of a batch: most need no tokenizing)."""
        text, spans = self._render(request)
        if text.strip() and self.most_tokens(text) + request.options.max_tokens <= max_context:
            return
        self._within(text, spans, request, max_context)

    def most_tokens(self, text: str) -> int:
        """An upper bound of the tokens of a rendered prompt, whatever the tokenizer: every token covers
        at least one byte of the normalized text, a SentencePiece pre-tokenizer's word marks (3 bytes)
        at most triple its bytes, and the post-processor adds a few special tokens (BOS, EOS)."""
        normalizer = self._tokenizer.normalizer
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        return 3 * len(normalized.encode("utf-8")) + 8

    def _within(
        self, text: str, spans: list[tuple[int, int]], request: GenerationRequest, max_context: int
    ) -> list[str]:
        tokens = self._encode(text, spans, request.raw)
        if not tokens:
            raise InvalidRequestError("the prompt is empty after tokenization")
        check_fits(len(tokens), request.options.max_tokens, max_context)
        return tokens

    def _plain_pieces(self, text: str) -> list[str]:
        pieces = self._plain.encode(text, add_special_tokens=False).tokens
        if len(pieces) > 1 and pieces[0] == METASPACE:  # a SentencePiece word start the text did not have
            pieces = pieces[1:]
        return pieces

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def token(self, token_id: int) -> str:
        """The token string of an id (what CTranslate2 reads), for going on from logged ids."""
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        return token

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


class _Marks:
    """Two characters no caller text holds, put around each caller text before the template renders,
    then taken out again to find where that text landed. They go inside any surrounding whitespace, so
    a template that strips the content (Llama-2's) renders the same text as without them."""

    def __init__(self, open_mark: str, close_mark: str):
        self.open, self.close = open_mark, close_mark

    @classmethod
    def for_texts(cls, texts: Iterable[str]) -> _Marks:
        seen = set("".join(texts))
        free = (chr(code) for code in range(0xF0000, 0xFFFFE) if chr(code) not in seen)  # private use
        return cls(next(free), next(free))

    def wrap(self, text: str) -> str:
        core = text.strip()
        if not core:
            return text
        start = text.index(core)
        return f"{text[:start]}{self.open}{core}{self.close}{text[start + len(core) :]}"

    def unwrap(self, marked: str) -> tuple[str, list[tuple[int, int]]]:
        """The text without the marks, and the spans they enclosed (a mark the template dropped or
        repeated closes the span at the text's end: more is treated as the caller's, never less)."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length, start = 0, None
        for part in re.split(f"([{self.open}{self.close}])", marked):
            if part == self.open:
                start = length if start is None else start
            elif part == self.close:
                if start is not None:
                    spans.append((start, length))
                start = None
            else:
                parts.append(part)
                length += len(part)
        if start is not None:
            spans.append((start, length))
        return "".join(parts), spans


def _with_tools_in_system_prompt(messages: list[dict], tools: Sequence[Tool]) -> list[dict]:
    """The tools section appended to the first system message, or as a new first system message."""
    section = system_prompt_section(tools)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{section}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def read_tokenizer_files(model_dir: Path) -> dict[str, str]:
    """The contents of the model's CHAT_TOKENIZER_FILES that exist, by name; tokenizer.json must."""
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise ModelNotFoundError(
            f"{model_dir} has no {TOKENIZER_FILE}; prepare the model with 'genqueue model prepare'"
        )
    return {name: (model_dir / name).read_text() for name in CHAT_TOKENIZER_FILES if (model_dir / name).is_file()}


def check_fits(prompt_tokens: int, max_tokens: int, max_context: int) -> None:
    """Raise ContextLengthExceededError when the prompt plus max_tokens exceeds the model's context
    (the worker's check, and the API's before it queues anything)."""
    needed = prompt_tokens + max_tokens
    if needed > max_context:
        raise ContextLengthExceededError(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
            f"{needed} tokens, over this model's context of {max_context}"
        )


def template_of(files: Mapping[str, str]) -> str | None:
    """The chat template among a model's tokenizer files: chat_template.jinja, else tokenizer_config.json's."""
    source = files.get(CHAT_TEMPLATE_FILE) or _parse_json(files.get(TOKENIZER_CONFIG_FILE)).get("chat_template")
    if isinstance(source, list):  # several named templates: take the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return source or None


def chat_template_source(model_dir: Path) -> str | None:
    """The chat template of a model directory (prepared, or a transformers snapshot)."""
    names = (TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE)
    return template_of({name: (model_dir / name).read_text() for name in names if (model_dir / name).is_file()})


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _parse_json(text: str | None) -> dict:
    return json.loads(text) if text else {}
