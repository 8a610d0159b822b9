"""A Llama-2-chat-format model built offline: the test fixture for Llama-2's format, and the tokenizer
of bench/llama7b.py's 7B-shaped checkpoint.

The tokenizer is SentencePiece-style, made with `tokenizers` in Llama's layout: <unk>, <s>, </s> at
ids 0 to 2, the 256 byte-fallback pieces <0x00>..<0xFF> at 3 to 258, then pieces written with `▁` for
a space. Its vocabulary is built directly (a Unigram model: any listed piece can be matched, so no
merges are needed); characters it lacks fall back to their UTF-8 bytes, as Llama's do. Two layouts of
the same vocabulary: "metaspace" (a Metaspace pre-tokenizer and decoder) and "meta-llama" (what
meta-llama/Llama-2-7b-chat-hf's tokenizer.json holds: a Prepend/Replace normalizer and a
Replace/ByteFallback/Fuse/Strip decoder). tokenizer_config.json carries bos/eos/unk and
Llama-2-chat's template (engine/chat_templates.py), or no template (an older snapshot).

The model is a tiny random Llama (2 layers, hidden 64) whose weights are shaped for one reply: the
embeddings of the tokens of CHAIN point along their own hidden axis and the lm_head row of each
token's successor reads that axis, so greedy decoding after `]` (the last token of every chat prompt,
"[/INST]") walks REPLY_PIECES and then emits </s>. The rest stays random and small, so the walk
wins by a wide margin even in int8. A test thus knows the exact reply the stack must return, and
that it stops at </s> by itself.
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

from engine.chat_templates import LLAMA_2_CHAT

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_PIECES = tuple(f"<0x{i:02X}>" for i in range(256))
# The reply, token by token: spaces as ▁, ö (2 bytes) and 👋 (4 bytes) as byte-fallback pieces.
REPLY_PIECES = (
    "▁Hello",
    ",",
    "▁w",
    "<0xC3>",
    "<0xB6>",
    "rld",
    "!",
    "▁",
    "<0xF0>",
    "<0x9F>",
    "<0x91>",
    "<0x8B>",
    "▁<tool_call>",
    '{"name":▁"',
    "get_weather",
    '",▁"arguments":▁{"city":▁"',
    "Paris",
    '"}}',
    "</tool_call>",
)
REPLY = 'Hello, wörld! 👋 <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CHAIN = ("]", *REPLY_PIECES, "</s>")  # each token's greedy successor is the next one
WORDS = (
    "INST SYS What is the capital of France weather in Paris Rome Berlin Madrid Be brief You are a helpful "
    "assistant Hi there Hello How can I help you today Tell me about Write short poem sea and with Thanks "
    "call tools listed below To tool reply only line per If no needed answer normally name arguments object "
    "description Get current city string type properties required"
).split()
FORMAT_PIECES = ("<<", ">>", "<</", "▁[", "▁<<", "INST", "SYS")
LAYOUTS = ("metaspace", "meta-llama")


def vocabulary(size: int | None = None) -> list[str]:
    """Llama's layout; with size, padded with filler word pieces up to size (the 7B's 32000)."""
    pieces = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    pieces += [f"▁{c}" for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [*FORMAT_PIECES, *(p for p in REPLY_PIECES if p not in BYTE_PIECES)]
    pieces += [word for w in WORDS for word in (f"▁{w}", w)]
    pieces = list(dict.fromkeys(pieces))  # each once, in order
    vocab = [*SPECIAL_TOKENS, *BYTE_PIECES, *pieces]
    if size is not None:
        fillers = ("".join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=3))
        known = set(vocab)
        for filler in (form for f in fillers for form in (f"▁{f}", f)):
            if len(vocab) >= size:
                break
            if filler not in known:
                vocab.append(filler)
        if len(vocab) != size:
            raise ValueError(f"cannot pad the vocabulary to {size}")
    return vocab


def build_tokenizer(out_dir: Path, layout: str = "metaspace", vocab_size: int | None = None):
    """Write tokenizer.json to out_dir and return the `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    def score(piece: str) -> float:
        if piece in SPECIAL_TOKENS or piece in BYTE_PIECES:
            return -100.0  # never matched from text: bytes come only from the fallback
        return -1.0 if len(piece) > 1 else -3.0  # prefer the longest pieces

    vocab = vocabulary(vocab_size)
    tokenizer = Tokenizer(models.Unigram([(p, score(p)) for p in vocab], unk_id=0, byte_fallback=True))
    if layout == "metaspace":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tokenizer.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)]
        )
    elif layout == "meta-llama":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        raise ValueError(f"unknown layout {layout!r}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return tokenizer


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False}


def write_tokenizer_files(out_dir: Path, chat_template: bool = True, **tokenizer):
    """tokenizer.json, tokenizer_config.json and generation_config.json, as Llama-2-7b-chat-hf has them;
    returns the `tokenizers.Tokenizer`."""
    built = build_tokenizer(out_dir, **tokenizer)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>"),
        "eos_token": _added_token("</s>"),
        "unk_token": _added_token("<unk>"),
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    if chat_template:
        config["chat_template"] = LLAMA_2_CHAT
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.6}
    (out_dir / "generation_config.json").write_text(json.dumps({**generation, "top_p": 0.9, "max_length": 4096}))
    return built


def llama2_config(vocab_size: int, name_or_path: str | None = None, **shape):
    """Llama-2-7b-chat-hf's config.json, at the shape given (the 7B's by default)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.get("hidden_size", 4096),
        intermediate_size=shape.get("intermediate_size", 11008),
        num_hidden_layers=shape.get("num_hidden_layers", 32),
        num_attention_heads=shape.get("num_attention_heads", 32),
        num_key_value_heads=shape.get("num_attention_heads", 32),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    if name_or_path:
        config._name_or_path = name_or_path
    return config


def build_llama2_chat(hf_dir: Path, chat_template: bool = True, layout: str = "metaspace", seed: int = 0) -> Path:
    """The tiny Llama-2-chat-format model (see the module's docstring) as a transformers directory."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = write_tokenizer_files(hf_dir, chat_template=chat_template, layout=layout)
    config = llama2_config(
        tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if len(CHAIN) - 1 > config.hidden_size:
        raise ValueError("the reply has more steps than the model has hidden axes")
    with torch.no_grad():
        embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
        for axis, (token, successor) in enumerate(itertools.pairwise(CHAIN)):
            embeddings[tokenizer.token_to_id(token)] = torch.nn.functional.one_hot(
                torch.tensor(axis), config.hidden_size
            )
            head[tokenizer.token_to_id(successor)] = torch.nn.functional.one_hot(torch.tensor(axis), config.hidden_size)
    model.save_pretrained(hf_dir)
    return hf_dir
