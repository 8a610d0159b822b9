"""The playground at `/`, used in real headless Chromium against the real app and the SmolLM2 worker."""

from __future__ import annotations

import itertools
import re
import time

import pytest
from playwright.sync_api import expect

from api.auth import hash_key
from tests.browser.conftest import make_app, serve

# SmolLM2 takes seconds for this (about 26 tokens/s on 2 cores): long enough to watch it grow and stop it.
LONG_PROMPT = "Write a very long story about a lighthouse keeper."
ANSWER_TIMEOUT_MS = 120_000

LAST_ANSWER_JS = """() => {
    const answer = [...document.querySelectorAll('.message.assistant')].pop();
    return answer ? {text: answer.querySelector('.text').textContent, status: answer.dataset.status || null} : null;
}"""


def answer(page):
    return page.locator(".message.assistant").last


def answer_text(page) -> str:
    return answer(page).locator(".text").text_content()


def wait_ended(page, status: str) -> None:
    expect(answer(page)).to_have_attribute("data-status", status, timeout=ANSWER_TIMEOUT_MS)


def wait_some_text(page, chars: int = 1) -> None:
    page.wait_for_function(
        f"() => ([...document.querySelectorAll('.message.assistant .text')].pop()?.textContent.length ?? 0) >= {chars}",
        timeout=ANSWER_TIMEOUT_MS,
    )


def no_horizontal_scroll(page) -> bool:
    return page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")


def test_tokens_appear_as_they_stream_and_the_text_equals_the_stored_job(playground, open_page, artifacts):
    page = open_page(playground, viewport={"width": 1280, "height": 900})
    page.fill("#param-temperature", "0")
    page.fill("#param-max_tokens", "120")
    page.fill("#prompt", LONG_PROMPT)
    page.click("#send")

    # Sample the transcript while it streams: the answer must be seen growing, each sample a prefix of the next.
    growing, screenshot_taken = [], False
    deadline = time.monotonic() + ANSWER_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        state = page.evaluate(LAST_ANSWER_JS)
        if state and state["status"]:
            break
        if state and state["text"] and (not growing or growing[-1] != state["text"]):
            growing.append(state["text"])
            if len(growing) == 3 and not screenshot_taken:
                page.screenshot(path=artifacts / "streaming.png")
                screenshot_taken = True
        time.sleep(0.05)
    assert len(growing) >= 3, f"saw the answer at only {len(growing)} stages while it streamed: {growing}"
    assert all(later.startswith(earlier) and later != earlier for earlier, later in itertools.pairwise(growing))

    wait_ended(page, "succeeded")
    text = answer_text(page)
    job = playground.job(answer(page).get_attribute("data-job-id"))
    assert job["status"] == "succeeded"
    assert text == job["result"]["response"]
    assert text.startswith(growing[-1]) and len(text) > len(growing[0])

    usage = job["result"]["usage"]
    stats = answer(page).locator(".stats")
    expect(stats.locator('[data-stat="usage"]')).to_have_text(
        f"tokens: {usage['prompt_tokens']} in, {usage['completion_tokens']} out"
    )
    expect(stats.locator('[data-stat="ttft"]')).to_have_text(re.compile(r"^first token: \d+\.\d\d s$"))
    expect(stats.locator('[data-stat="rate"]')).to_have_text(re.compile(r"^speed: \d+\.\d tokens/s$"))
    expect(stats.locator('[data-stat="finish"]')).to_have_text(f"finish: {job['result']['finish_reason']}")
    expect(page.locator(".message.user .text")).to_have_text(LONG_PROMPT)
    page.screenshot(path=artifacts / "answered.png")


def test_stop_cancels_a_long_answer_and_keeps_what_streamed(playground, open_page, artifacts):
    page = open_page(playground)
    page.fill("#param-temperature", "0")
    page.fill("#param-max_tokens", "400")
    page.fill("#prompt", LONG_PROMPT)
    page.click("#send")
    wait_some_text(page, chars=20)
    expect(page.locator("#send")).to_be_disabled()
    page.click("#stop")

    wait_ended(page, "cancelled")
    job = playground.job(answer(page).get_attribute("data-job-id"))
    assert job["status"] == "cancelled"
    assert job["result"]["finish_reason"] == "cancelled"
    assert job["result"]["usage"]["completion_tokens"] < 400
    assert answer_text(page) == job["result"]["response"]
    expect(answer(page).locator('[data-stat="finish"]')).to_have_text("finish: cancelled")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    page.screenshot(path=artifacts / "stopped.png")


def test_refused_parameters_show_the_api_error_next_to_their_field(playground, open_page, artifacts):
    page = open_page(playground)
    page.fill("#param-temperature", "9")
    page.fill("#param-top_k", "1.5")  # not an integer
    page.fill("#prompt", "Hello")
    page.click("#send")

    refused = playground.app.test_client().post("/v1/jobs", json={"prompt": "Hello", "temperature": 9, "top_k": 1.5})
    assert refused.status_code == 400
    fields = refused.json["error"]["fields"]
    temperature_error = page.locator("#param-temperature-error")
    expect(temperature_error).to_be_visible()
    expect(temperature_error).to_have_text(" ".join(fields["temperature"]))
    expect(page.locator("#param-top_k-error")).to_have_text(" ".join(fields["top_k"]))
    expect(page.locator("#param-temperature")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#param-temperature")).to_be_focused()  # the first refused field, in page order
    expect(page.locator("#param-max_tokens-error")).to_be_hidden()
    expect(page.locator(".message")).to_have_count(0)  # nothing was queued
    expect(page.locator("#prompt")).to_have_value("Hello")  # kept, to send again
    page.screenshot(path=artifacts / "refused.png", full_page=True)

    # Fixed and sent again: the errors go, an empty top_k is not sent, the answer comes.
    page.fill("#param-temperature", "0")
    page.fill("#param-top_k", "")
    page.fill("#param-max_tokens", "5")
    page.click("#send")
    wait_ended(page, "succeeded")
    expect(temperature_error).to_be_hidden()
    expect(page.locator("#param-top_k-error")).to_be_hidden()
    expect(page.locator("#param-temperature")).not_to_have_attribute("aria-invalid", "true")


def test_a_request_over_the_context_is_refused_next_to_max_tokens(playground, open_page):
    page = open_page(playground)
    page.fill("#param-max_tokens", "9000")  # valid for the schema, more than SmolLM2's 8192-token context
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    refused = playground.app.test_client().post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 9000})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "context_length_exceeded"
    message = " ".join(refused.json["error"]["fields"]["max_tokens"])
    expect(page.locator("#param-max_tokens-error")).to_have_text(message)
    expect(page.locator(".message")).to_have_count(0)  # refused at submit: nothing was queued
    expect(page.locator("#send")).to_be_enabled()


def test_a_conversation_sends_its_history_system_prompt_and_parameters(playground, open_page):
    page = open_page(playground)
    bodies = []
    page.on("request", lambda request: bodies.append(request.post_data_json) if request.method == "POST" else None)
    page.fill("#system", "You are terse.")
    page.fill("#param-max_tokens", "5")
    page.fill("#param-top_k", "1")
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    wait_ended(page, "succeeded")
    first_answer = answer_text(page)
    page.fill("#prompt", "And then?")
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant")).to_have_count(2)
    wait_ended(page, "succeeded")

    assert bodies[0] == {
        "stream": True,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "top_k": 1,
    }
    assert bodies[1]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And then?"},
    ]

    # raw sends the message alone, as a prompt; the system prompt is disabled meanwhile.
    page.check("#param-raw")
    expect(page.locator("#system")).to_be_disabled()
    page.fill("#prompt", "The sky is")
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant")).to_have_count(3)
    wait_ended(page, "succeeded")
    assert bodies[2] == {"stream": True, "raw": True, "prompt": "The sky is", "max_tokens": 5, "top_k": 1}

    page.click("#clear")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#prompt")).to_be_focused()


def test_keyboard_alone_sets_parameters_sends_and_stops(playground, open_page, artifacts):
    page = open_page(playground)
    expect(page.locator("#prompt")).to_be_focused()  # the page opens ready to type

    # Tab walks the page in reading order, and every stop shows a visible focus ring.
    order = []
    for _ in range(9):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "() => ({id: document.activeElement.id, outline: getComputedStyle(document.activeElement).outlineStyle,"
            " width: parseFloat(getComputedStyle(document.activeElement).outlineWidth)})"
        )
        assert focused["outline"] != "none" and focused["width"] >= 2, focused
        order.append(focused["id"])
    assert order == [
        "send",
        "clear",
        "system",
        "param-max_tokens",
        "param-temperature",
        "param-top_p",
        "param-top_k",
        "param-raw",
        "api-key",
    ]
    for _ in range(5):
        page.keyboard.press("Shift+Tab")
    expect(page.locator("#param-max_tokens")).to_be_focused()
    page.keyboard.type("300")
    page.keyboard.press("Tab")
    page.keyboard.type("0")
    for _ in range(5):
        page.keyboard.press("Shift+Tab")
    expect(page.locator("#prompt")).to_be_focused()
    page.screenshot(path=artifacts / "keyboard-focus.png")

    page.keyboard.type("Write a very long story about a lighthouse keeper.")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("Give him a name.")
    expect(page.locator(".message")).to_have_count(0)
    page.keyboard.press("Enter")
    expect(page.locator(".message.user .text")).to_have_text(
        "Write a very long story about a lighthouse keeper.\nGive him a name."
    )
    wait_some_text(page, chars=20)
    page.keyboard.press("Escape")
    wait_ended(page, "cancelled")
    job = playground.job(answer(page).get_attribute("data-job-id"))
    assert job["status"] == "cancelled"
    assert answer_text(page) == job["result"]["response"]
    expect(page.locator("#prompt")).to_be_focused()  # ready for the next message


def test_phone_width_stacks_the_page_without_horizontal_scroll(playground, open_page, artifacts):
    page = open_page(
        playground, viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    assert no_horizontal_scroll(page)
    chat, settings = page.locator("main.chat").bounding_box(), page.locator("aside.settings").bounding_box()
    assert settings["y"] >= chat["y"] + chat["height"], "settings sit below the chat at phone width"
    for control in page.locator("textarea, input, button").all():
        box = control.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, control

    # A long unbroken word wraps instead of widening the page.
    page.fill("#param-max_tokens", "5")
    page.fill("#prompt", "Repeat this: " + "x" * 150)
    page.click("#send")
    wait_ended(page, "succeeded")
    assert no_horizontal_scroll(page)
    page.screenshot(path=artifacts / "phone.png", full_page=True)


KEY = "gq_playground-test-key"


@pytest.fixture(scope="module")
def keyed_playground(smol_worker):
    from tests.browser.conftest import Served

    app = make_app(API_KEYS=f"playground:{hash_key(KEY)}")
    with serve(app) as url:
        yield Served(url, app)


def test_with_keys_the_page_loads_without_one_and_sends_the_key_typed(keyed_playground, open_page, artifacts):
    page = open_page(keyed_playground)
    assert page.evaluate("() => getComputedStyle(document.querySelector('.layout')).display") == "grid"  # CSS loaded
    page.fill("#param-max_tokens", "5")
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    key_error = page.locator("#api-key-error")
    expect(key_error).to_contain_text("API key")
    expect(page.locator("#api-key")).to_be_focused()
    page.screenshot(path=artifacts / "key-needed.png", full_page=True)

    page.fill("#api-key", "gq_wrong")
    page.click("#send")
    expect(key_error).to_have_text("this API key is not valid")

    page.fill("#api-key", KEY)
    page.click("#send")
    wait_ended(page, "succeeded")
    expect(key_error).to_be_hidden()
    job = keyed_playground.job(answer(page).get_attribute("data-job-id"), headers={"Authorization": f"Bearer {KEY}"})
    assert answer_text(page) == job["result"]["response"]

    page.reload()
    expect(page.locator("#api-key")).to_have_value(KEY)  # kept for the tab's session
