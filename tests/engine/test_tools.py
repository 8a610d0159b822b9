import json
import shutil

import pytest

from engine import GenerationRequest, Model, SamplingOptions
from engine.tokenizer import ChatTokenizer
from engine.tools import SYSTEM_PROMPT_HEADER, Tool, parse_tool_calls
from tests.helpers import WEATHER, generate, native_request, weather_few_shot

TOOLS = (Tool.from_dict(WEATHER), Tool(name="lookup", code="return db.get(key)"))


@pytest.mark.parametrize(
    "text, calls",
    [
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', [("get_weather", "Paris")]),
        (
            'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
            [("get_weather", "Paris"), ("get_weather", "Rome")],
        ),
        # cut off by max_tokens after the JSON, before the closing tag
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}', [("get_weather", "Oslo")]),
        ('{"name": "get_weather", "arguments": {"city": "Lima"}}', [("get_weather", "Lima")]),
        ('```json\n{"name": "get_weather", "parameters": {"city": "Kyiv"}}\n```', [("get_weather", "Kyiv")]),
        ('[{"name": "get_weather", "arguments": "{\\"city\\": \\"Bern\\"}"}]', [("get_weather", "Bern")]),
    ],
)
def test_tool_calls_are_parsed_into_name_and_arguments(text, calls):
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed == [{"name": name, "arguments": {"city": city}} for name, city in calls]


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is sunny.",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><tool_call>oops</tool_call>',
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',  # not an offered tool
        '{"name": "get_weather", "arguments": ["Paris"]}',  # arguments must be an object
        '{"name": "get_weather", "arguments": "not json"}',
        "42",
        "",
    ],
)
def test_malformed_or_absent_calls_give_no_tool_calls(text):
    assert parse_tool_calls(text, TOOLS) == []


def test_no_tools_offered_means_nothing_is_parsed():
    assert parse_tool_calls('{"name": "get_weather", "arguments": {}}', ()) == []


def test_both_tool_forms_and_functions_become_tools():
    tools = native_request(
        {
            "prompt": "hi",
            "tools": [WEATHER, {"type": "function", "function": {**WEATHER, "name": "get_time"}}],
            "functions": [{"name": "lookup", "code": "return 1"}],
        }
    ).tools
    assert [t.name for t in tools] == ["get_weather", "get_time", "lookup"]
    assert tools[1].parameters == WEATHER["parameters"]
    assert tools[2].code == "return 1"
    request = GenerationRequest(prompt="hi", tools=tools)
    assert GenerationRequest.from_dict(request.to_dict()) == request


def test_a_template_without_tools_gets_them_in_the_system_prompt(smollm2_dir):
    tokenizer = ChatTokenizer(smollm2_dir)
    assert not tokenizer.renders_tools
    rendered = tokenizer.render(GenerationRequest(prompt="Weather in Paris?", tools=TOOLS))
    section = SYSTEM_PROMPT_HEADER + json.dumps([t.to_dict() for t in TOOLS])
    assert rendered == f"<|im_start|>system\n{section}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    # An existing system message keeps its text, and the tools follow it.
    messages = native_request(
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "tools": [WEATHER],
        }
    )
    assert tokenizer.render(messages).startswith(f"<|im_start|>system\nBe brief.\n\n{SYSTEM_PROMPT_HEADER}")


def test_a_template_with_a_tools_section_renders_them_itself(smollm2_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }}({{ t.type }});{% endfor %}{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    tokenizer = ChatTokenizer(tmp_path)
    assert tokenizer.renders_tools
    rendered = tokenizer.render(GenerationRequest(prompt="Hi", tools=TOOLS))
    assert rendered == "TOOLS:get_weather(function);lookup(function);user: Hi\n"  # trim_blocks eats the newline


def test_the_real_model_calls_a_tool_and_the_call_is_parsed(smollm2_dir):
    # Few-shot turns teach the 135M model the documented format; it then calls the tool for Paris.
    messages = weather_few_shot("Paris")
    request = native_request({"messages": messages, "tools": [WEATHER], "temperature": 0})
    result = generate(Model(smollm2_dir), request)
    assert result.tool_calls == ({"name": "get_weather", "arguments": {"city": "Paris"}},)
    assert "<tool_call>" in result.response  # the text stays in the response


def test_random_output_with_tools_leaves_tool_calls_empty(tiny_dir):
    request = GenerationRequest(prompt="Weather?", tools=TOOLS, options=SamplingOptions(temperature=1, max_tokens=30))
    result = generate(Model(tiny_dir), request)
    assert result.tool_calls == ()
    assert result.usage.completion_tokens == 30
