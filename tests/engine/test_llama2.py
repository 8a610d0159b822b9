"""Llama-2-chat's format in the engine: its chat template, its SentencePiece-style tokenizer (one <s>,
`▁` spaces, byte fallback), a reply that ends at </s>, and recognising a snapshot without a template.

The expected prompts are written out by hand from Llama-2-chat's format; token counts are checked
against transformers' own apply_chat_template, which renders the template with its own code."""

import json

import pytest

from engine import ChatTemplateError, FinishReason, GenerationRequest, Message, Model, SamplingOptions
from engine.chat_templates import recognise, source_names
from engine.detokenize import IncrementalDetokenizer
from engine.prepare import prepare_model
from engine.tokenizer import ChatTokenizer
from engine.tools import Tool
from tests.helpers import WEATHER, generate
from tests.llama2 import LAYOUTS, REPLY, REPLY_PIECES, build_llama2_chat, write_tokenizer_files

GREEDY = SamplingOptions(temperature=0, max_tokens=64)
SYSTEM = Message("system", "Be brief.")
TURNS = (Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Tell me about Rome"))
# The reply's text chunk by chunk: each ▁ piece brings its space, each multi-byte character comes whole.
REPLY_CHUNKS = [
    "Hello",
    ",",
    " w",
    "ö",
    "rld",
    "!",
    " ",
    "👋",
    " <tool_call>",
    '{"name": "',
    "get_weather",
    '", "arguments": {"city": "',
    "Paris",
    '"}}',
    "</tool_call>",
]


def request(*messages: Message, **fields) -> GenerationRequest:
    return GenerationRequest(messages=messages, options=GREEDY, **fields)


@pytest.fixture(scope="module", params=LAYOUTS)
def tokenizer_dir(request, tmp_path_factory):
    """Llama-2-chat's tokenizer files alone (no weights), in each tokenizer.json layout."""
    directory = tmp_path_factory.mktemp(request.param)
    write_tokenizer_files(directory, layout=request.param)
    return directory


@pytest.fixture(scope="module")
def llama2(llama2_dir):
    return Model(llama2_dir)


@pytest.mark.parametrize(
    "req, prompt",
    [
        (
            GenerationRequest(prompt="What is the capital of France?"),
            "<s>[INST] What is the capital of France? [/INST]",
        ),
        (request(SYSTEM, Message("user", "Hi")), "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"),
        (request(*TURNS), "<s>[INST] Hi [/INST] Hello </s><s>[INST] Tell me about Rome [/INST]"),
        (
            request(SYSTEM, *TURNS),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Tell me about Rome [/INST]",
        ),
    ],
)
def test_the_template_renders_llama_2_chats_format(tokenizer_dir, req, prompt):
    assert ChatTokenizer(tokenizer_dir).render(req) == prompt


def test_tools_go_into_the_system_block(tokenizer_dir):
    tokenizer = ChatTokenizer(tokenizer_dir)
    tools = (Tool.from_dict(WEATHER),)
    question = Message("user", "What is the weather in Paris?")
    listed = '"required": ["city"]}}]\n<</SYS>>\n\nWhat is the weather in Paris? [/INST]'
    alone = tokenizer.render(request(question, tools=tools))
    assert alone.startswith("<s>[INST] <<SYS>>\nYou can call the tools listed below.") and alone.endswith(listed)
    with_system = tokenizer.render(request(SYSTEM, question, tools=tools))
    assert with_system.startswith("<s>[INST] <<SYS>>\nBe brief.\n\nYou can call the tools listed below.")
    assert with_system.endswith(listed) and with_system.count("<<SYS>>") == 1


def test_roles_out_of_turn_are_a_template_error(tokenizer_dir):
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTokenizer(tokenizer_dir).encode(request(Message("user", "Hi"), Message("user", "Again")))


def test_a_chat_prompt_and_a_raw_prompt_start_with_one_bos(tokenizer_dir):
    tokenizer = ChatTokenizer(tokenizer_dir)
    opening = "[" if tokenizer_dir.name.startswith("metaspace") else "▁["  # "first" vs every segment
    chat = tokenizer.encode(GenerationRequest(prompt="Hi there"))
    assert chat == ["<s>", opening, "INST", "]", "▁Hi", "▁there", "▁[", "/", "INST", "]"]
    assert tokenizer.encode(GenerationRequest(prompt="Hi there", raw=True)) == ["<s>", "▁Hi", "▁there"]
    # A raw prompt that writes its own <s> gets no second one.
    assert tokenizer.encode(GenerationRequest(prompt="<s>Hi there", raw=True)).count("<s>") == 1
    # Each user turn opens with <s>, each assistant turn closes with </s>: once each, never doubled.
    turns = tokenizer.encode(request(SYSTEM, *TURNS))
    assert turns.count("<s>") == 2 and turns.count("</s>") == 1
    assert turns[:2] == ["<s>", opening] and turns[turns.index("</s>") : turns.index("</s>") + 2] == ["</s>", "<s>"]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi there"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello, how can I help you today?"},
            {"role": "user", "content": "Tell me about Rome. 👋"},
        ],
    ],
)
def test_token_ids_match_transformers_apply_chat_template(tokenizer_dir, messages):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    reference.chat_template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    expected = reference.apply_chat_template(messages, tokenize=True)["input_ids"]
    tokenizer = ChatTokenizer(tokenizer_dir)
    ours = tokenizer.encode(request(*(Message(m["role"], m["content"]) for m in messages)))
    assert [tokenizer.token_id(token) for token in ours] == expected


def test_streamed_chunks_bring_their_spaces_and_whole_characters(tokenizer_dir):
    tokenizer = ChatTokenizer(tokenizer_dir)
    detokenizer = IncrementalDetokenizer(tokenizer.decode)
    chunks = [detokenizer.add(tokenizer.token_id(piece)) for piece in REPLY_PIECES]
    assert [chunk for chunk in chunks if chunk] == REPLY_CHUNKS
    assert detokenizer.flush() == "" and "".join(chunks) == REPLY


def test_the_reply_stops_at_eos_by_itself(llama2):
    seen: list[str] = []
    prompt = llama2.encode(request(SYSTEM, *TURNS))
    result = llama2.generate_batch([prompt], on_chunk=lambda _index, text: seen.append(text))[0]
    assert result.response == REPLY and seen == REPLY_CHUNKS
    assert result.finish_reason is FinishReason.STOP
    assert result.usage.completion_tokens == len(REPLY_PIECES) < GREEDY.max_tokens
    assert result.usage.prompt_tokens == len(prompt.tokens)
    assert llama2.tokenizer.end_tokens == ["</s>"]


def test_max_tokens_and_stop_strings_cut_the_reply(llama2):
    cut = generate(llama2, GenerationRequest(prompt="Hi", options=SamplingOptions(temperature=0, max_tokens=5)))
    assert (cut.response, cut.finish_reason, cut.usage.completion_tokens) == ("Hello, wö", FinishReason.LENGTH, 5)
    # The generation ends at the piece that completes the stop string (the 6th, 12th, 17th).
    for stop, response, tokens in [("wörld", "Hello, ", 6), ("👋", "Hello, wörld! ", 12), ("Paris", REPLY[:74], 17)]:
        seen: list[str] = []
        options = SamplingOptions(temperature=0, max_tokens=64, stop=(stop,))
        prompt = llama2.encode(GenerationRequest(prompt="Hi", options=options))
        result = llama2.generate_batch([prompt], on_chunk=lambda _index, text, seen=seen: seen.append(text))[0]
        assert (result.response, result.finish_reason) == (response, FinishReason.STOP), stop
        assert result.usage.completion_tokens == tokens and "".join(seen) == response


def test_tool_calls_are_read_from_the_reply(llama2):
    tools = (Tool.from_dict(WEATHER),)
    result = generate(llama2, request(Message("user", "What is the weather in Paris?"), tools=tools))
    assert result.response == REPLY
    assert list(result.tool_calls) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert generate(llama2, request(Message("user", "Hi"))).tool_calls == ()


# -- snapshots without a chat template --------------------------------------------------------------


def prepare(hf_dir, models_dir):
    lines: list[str] = []
    return prepare_model(hf_dir, models_dir, name="model", progress=lines.append), lines


def test_a_llama_2_chat_snapshot_without_a_template_gets_llama_2s(tmp_path):
    model_dir, lines = prepare(build_llama2_chat(tmp_path / "Llama-2-7b-chat-hf", chat_template=False), tmp_path / "m")
    said = [line for line in lines if "recognised" in line]
    assert said and "llama-2-chat" in said[0] and "name 'Llama-2-7b-chat-hf'" in said[0]
    assert json.loads((model_dir / "genqueue.json").read_text())["chat_template"] == "llama-2-chat"
    prompt = ChatTokenizer(model_dir).render(request(SYSTEM, Message("user", "Hi")))
    assert prompt == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    assert generate(Model(model_dir), request(Message("user", "Hi"))).response == REPLY


def test_an_unrecognised_snapshot_without_a_template_is_said_to_take_raw_prompts(tmp_path):
    model_dir, lines = prepare(build_llama2_chat(tmp_path / "Llama-2-7b-hf", chat_template=False), tmp_path / "m")
    assert any(line.startswith("warning:") and "raw=true" in line for line in lines)
    assert "chat_template" not in json.loads((model_dir / "genqueue.json").read_text())
    assert not ChatTokenizer(model_dir).has_chat_template


def test_a_snapshots_own_template_is_kept(tmp_path):
    hf_dir = build_llama2_chat(tmp_path / "Llama-2-7b-chat-hf")
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": "{{ bos_token }}own: {{ messages[0]['content'] }}"}))
    model_dir, lines = prepare(hf_dir, tmp_path / "m")
    assert not any("recognised" in line or "warning" in line for line in lines)
    assert ChatTokenizer(model_dir).render(GenerationRequest(prompt="Hi")) == "<s>own: Hi"


def write_snapshot(directory, config: dict, tokenizer_config: dict | None = None, layout: str = "metaspace"):
    directory.mkdir(parents=True)
    write_tokenizer_files(directory, chat_template=False, layout=layout)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    if tokenizer_config is not None:
        path = directory / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **tokenizer_config}))
    return directory


@pytest.mark.parametrize(
    "name, config, tokenizer_config, known",
    [
        ("snapshot", {"_name_or_path": "meta-llama/Llama-2-13b-chat-hf"}, None, True),
        ("snapshot", {}, {"name_or_path": "meta-llama/Llama-2-70b-chat-hf"}, True),
        ("llama2_7b_chat", {}, None, True),
        ("models--meta-llama--Llama-2-7b-chat-hf/snapshots/0123abcd", {}, None, True),  # a Hugging Face cache
        ("snapshot", {}, None, False),  # no name says what it is
        ("Llama-2-7b-hf", {}, None, False),  # the base model: no chat format
        ("TinyLlama-1.1B-Chat-v1.0", {}, None, False),
        ("Mistral-7B-Instruct-Llama-2-chat", {"model_type": "mistral"}, None, False),
    ],
)
def test_the_family_needs_every_signal(tmp_path, name, config, tokenizer_config, known):
    directory = write_snapshot(tmp_path / name, config, tokenizer_config)
    found = recognise(directory, source_names(directory))
    assert (found is not None) == known
    if known:
        assert found.family == "llama-2-chat" and "model_type llama" in found.signals


def test_another_vocabulary_layout_is_not_llama_2(tmp_path, smollm2_dir):
    directory = tmp_path / "Llama-2-7b-chat-hf"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert recognise(directory, source_names(directory)) is None
