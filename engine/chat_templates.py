"""Chat templates genqueue knows by model family, for snapshots whose tokenizer files carry none.

Older snapshots of meta-llama/Llama-2-*-chat-hf have no `chat_template` in tokenizer_config.json;
without one every chat request would fail. Preparation (engine/prepare.py) asks `recognise` and, for
a recognised family, records its template next to the converted model.

LLAMA_2_CHAT is the template that meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json carries,
written out here from knowledge of it (no hub is reachable): `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n
{user} [/INST] {assistant} </s>` per turn, the system message folded into the first user turn.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, read_json

LLAMA_2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# A Llama-2 chat model's name, as its snapshot directory or _name_or_path spells it:
# "Llama-2-7b-chat-hf", "models--meta-llama--Llama-2-13b-chat-hf", "llama2_70b_chat".
_LLAMA_2_CHAT_NAME = re.compile(r"llama[-_ ]?2(?!\d).*chat", re.IGNORECASE)
# Llama's SentencePiece vocabulary begins with these, at these ids.
_LLAMA_SPECIAL_IDS = {0: "<unk>", 1: "<s>", 2: "</s>"}


@dataclass(frozen=True)
class KnownTemplate:
    family: str
    template: str
    signals: tuple[str, ...]  # what the recognition rested on, to say so


def source_names(source: Path) -> list[str]:
    """The names a model source goes by: its own, and in a Hugging Face cache its repository's
    (models--meta-llama--Llama-2-7b-chat-hf/snapshots/<commit>)."""
    names = [source.name]
    if source.parent.name == "snapshots":
        names.append(source.parent.parent.name)
    return names


def recognise(model_dir: Path, names: Iterable[str] = ()) -> KnownTemplate | None:
    """The chat template of a transformers directory's model family, when every signal agrees.

    Llama-2-chat: config.json's model_type is llama, the tokenizer's ids 0, 1, 2 are <unk>, <s>, </s>
    (Llama's SentencePiece layout), and a name says Llama-2 chat: config.json's _name_or_path,
    tokenizer_config.json's name_or_path, or one of `names` (see source_names). Base Llama-2 models,
    Vicuna, TinyLlama and Mistral (the same vocabulary layout, other names or model types) are not it.
    """
    config = read_json(model_dir / "config.json")
    if config.get("model_type") != "llama":
        return None
    added = read_json(model_dir / TOKENIZER_FILE).get("added_tokens") or []
    specials = {token.get("id"): token.get("content") for token in added if isinstance(token, dict)}
    if any(specials.get(i) != content for i, content in _LLAMA_SPECIAL_IDS.items()):
        return None
    candidates = [
        config.get("_name_or_path"),
        read_json(model_dir / TOKENIZER_CONFIG_FILE).get("name_or_path"),
        *names,
    ]
    name = next((n for n in candidates if isinstance(n, str) and _LLAMA_2_CHAT_NAME.search(n)), None)
    if name is None:
        return None
    signals = ("model_type llama", "<unk> <s> </s> at ids 0 1 2", f"name {name!r}")
    return KnownTemplate("llama-2-chat", LLAMA_2_CHAT, signals)
