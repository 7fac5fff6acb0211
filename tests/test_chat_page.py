"""The chat page (tinyinfer/server/static/) in a real browser: Debian's chromium, headless,
driven by Playwright, against the real server (create_app on bard, uvicorn on 127.0.0.1).

A person's view of it: type a message, press Send, watch the answer arrive piece by piece, stop
it, see the server's refusal. bard answers a speech in about 50 ms, too quick to watch or to
stop, so each of its forward passes here takes STEP_SECONDS longer, as a bigger model's would
(and is counted, so the test can see the server stop computing an answer the page stopped).

Chromium is a system package, not a pip one: `apt-get install chromium` (.ci/run installs it).
Playwright only drives it; `playwright install` (which downloads browsers) is never needed.
"""

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn
from playwright.sync_api import sync_playwright

import tinyinfer
from tinyinfer.server.app import create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
STEP_SECONDS = 0.08  # added to every forward pass: about 12 tokens a second
API_KEY = "open-sesame"
QUESTION = "Who are you?"  # bard's greedy answer is a speech of about 20 tokens


# ---- a live server in this process ---------------------------------------------------------

class ForwardPasses:
    """Slows each forward pass of `llm` by `seconds` and counts them (the engine calls
    llm.model.submit once per step, whichever requests the step serves)."""

    def __init__(self, llm, seconds: float):
        self.count = 0
        submit = llm.model.submit

        def slow_submit(batch):
            time.sleep(seconds)
            self.count += 1
            return submit(batch)

        llm.model.submit = slow_submit

    def settled(self, quiet_seconds: float = 0.6, timeout: float = 10.0) -> int:
        """The count once no pass has run for `quiet_seconds`: the engine has nothing left to do."""
        deadline = time.monotonic() + timeout
        last = self.count
        while time.monotonic() < deadline:
            time.sleep(quiet_seconds)
            if self.count == last:
                return last
            last = self.count
        raise AssertionError(f"the engine kept running forward passes for {timeout} s")


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))  # the port is ours from here on: no race for it
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def post(self, path: str, body: dict, api_key: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def get(self, path: str, api_key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=60) as response:
            return json.load(response)

    def model_name(self, api_key: str | None = None) -> str:
        return self.get("/v1/models", api_key)["data"][0]["id"]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def bard():
    llm = tinyinfer.load(backend="numpy")
    llm.passes = ForwardPasses(llm, STEP_SECONDS)
    return llm


@pytest.fixture(scope="module")
def server(bard):
    live = LiveServer(create_app(bard))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server():
    live = LiveServer(create_app(tinyinfer.load(backend="numpy"), api_key=API_KEY))
    yield live
    live.stop()


def metric(server: LiveServer, name: str) -> float:
    """One sample of GET /metrics (Prometheus text: `name{labels} value` lines)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"/metrics has no {name}")


def greedy_answer(server: LiveServer, question: str, max_tokens: int) -> dict:
    """What the API answers, not streamed, to the request the page sends at temperature 0:
    the chat.completion (choices[0].message.content, usage)."""
    status, body = server.post("/v1/chat/completions", {
        "model": server.model_name(), "messages": [{"role": "user", "content": question}], "temperature": 0,
        "max_tokens": max_tokens,
    })
    assert status == 200, body
    return body


# ---- the browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed, and the chat page's tests need a real browser: "
                    "install it with `sudo apt-get install chromium` (.ci/run does this in CI). "
                    "`playwright install` is not needed.", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (its own localStorage) with one page; JavaScript errors and
    every URL the page asks for are recorded."""
    context = browser.new_context()
    page = context.new_page()
    page.errors = []
    page.requested = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("request", lambda request: page.requested.append(request.url))
    page.set_default_timeout(30_000)
    yield page
    context.close()


def open_chat(page, server: LiveServer, temperature: float, max_tokens: int):
    page.goto(server.url + "/")
    page.fill("#temperature", str(temperature))
    page.fill("#max-tokens", str(max_tokens))


def watch_answer(page):
    """Record every text the answer shows, as the page changes (a MutationObserver on the
    conversation: it runs after each change, before the next piece arrives)."""
    page.evaluate("""() => {
        window.answerTexts = [];
        new MutationObserver(() => {
            const turns = document.querySelectorAll(".turn.assistant .text");
            if (turns.length) window.answerTexts.push(turns[turns.length - 1].textContent);
        }).observe(document.getElementById("conversation"), {childList: true, subtree: true, characterData: true});
    }""")


def wait_until_answered(page):
    page.wait_for_selector(".turn.assistant")
    page.wait_for_selector("body[data-state=idle]")


def answer_text(page) -> str:
    return page.locator(".turn.assistant .text").last.text_content()


# ---- the tests -------------------------------------------------------------------------------

def test_the_page_shows_the_served_model(page, server):
    page.goto(server.url + "/")
    served = server.model_name()
    page.wait_for_function("name => document.getElementById('model').textContent === name", arg=served)
    assert page.locator("#error").is_hidden()
    assert not page.errors


def test_the_answer_streams_in_piece_by_piece_and_is_the_greedy_answer(page, server):
    completion = greedy_answer(server, QUESTION, max_tokens=48)
    expected = completion["choices"][0]["message"]["content"]
    open_chat(page, server, temperature=0, max_tokens=48)
    watch_answer(page)
    page.fill("#message", QUESTION)
    page.click("#send")
    wait_until_answered(page)

    answer = answer_text(page)
    assert answer == expected and answer
    assert page.locator(".turn.user .text").text_content() == QUESTION
    assert page.locator("#message").input_value() == ""  # the box is cleared for the next turn

    # the answer grew: several partial texts were on screen, each a prefix of the next
    shown = [text for text in page.evaluate("window.answerTexts") if text]
    partial = list(dict.fromkeys(text for text in shown if text != answer))
    assert len(partial) >= 2, f"the answer appeared at once, not streamed: {shown}"
    assert all(answer.startswith(text) for text in partial)
    assert [len(text) for text in partial] == sorted(len(text) for text in partial)

    tokens = completion["usage"]["completion_tokens"]
    assert page.locator("#stats").text_content().startswith(f"{tokens} tokens · first after ")
    assert not page.errors
    assert all(url.startswith(server.url) for url in page.requested), page.requested  # nothing from outside


def test_a_second_turn_sends_the_whole_conversation(page, server):
    open_chat(page, server, temperature=0, max_tokens=16)
    page.fill("#message", "Hello")
    page.press("#message", "Enter")  # Enter sends
    wait_until_answered(page)
    first = answer_text(page)
    page.fill("#message", QUESTION)
    page.press("#message", "Enter")
    page.wait_for_function("document.querySelectorAll('.turn.assistant').length === 2")
    wait_until_answered(page)

    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": QUESTION}]
    status, body = server.post("/v1/chat/completions", {
        "model": server.model_name(), "temperature": 0, "max_tokens": 16, "messages": conversation})
    assert status == 200, body
    assert answer_text(page) == body["choices"][0]["message"]["content"]


def test_stop_ends_the_answer_and_the_server_stops_computing_it(page, server, bard):
    passes_before = bard.passes.settled()
    full = greedy_answer(server, QUESTION, max_tokens=200)["choices"][0]["message"]["content"]
    passes_for_full_answer = bard.passes.settled() - passes_before
    assert passes_for_full_answer >= 8, f"the answer is too short to stop in the middle: {full!r}"

    open_chat(page, server, temperature=0, max_tokens=200)
    start = bard.passes.settled()
    page.fill("#message", QUESTION)
    page.press("#message", "Enter")
    page.wait_for_function("document.querySelector('.turn.assistant .text')?.textContent")  # a first piece
    page.click("#stop")
    page.wait_for_selector("body[data-state=idle]")

    shown = answer_text(page)
    assert full.startswith(shown) and len(shown) < len(full), (shown, full)
    assert page.locator(".turn.assistant.stopped .note").text_content() == "stopped"
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    assert page.locator("#error").is_hidden()
    # the closed connection aborted the request: the engine ran far fewer passes than the answer
    # takes, and the request's KV blocks went back to the pool
    passes_used = bard.passes.settled() - start
    assert passes_used < passes_for_full_answer - 3, (passes_used, passes_for_full_answer)
    assert metric(server, 'tinyinfer_request_success_total{finished_reason="abort"}') >= 1
    assert metric(server, "tinyinfer_kv_cache_blocks_in_use") == 0
    assert not page.errors


def test_a_bad_setting_shows_the_servers_error(page, server):
    open_chat(page, server, temperature=-1, max_tokens=16)
    page.fill("#message", QUESTION)
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert page.locator("#error").text_content().startswith("400: temperature must be >= 0")
    assert page.locator(".turn").count() == 0 and page.locator("#send").is_enabled()


def test_a_wrong_api_key_shows_the_servers_error_and_the_right_one_is_kept(page, keyed_server):
    def refusal(api_key: str | None) -> str:
        """The server's words when the key is missing (None) or wrong."""
        status, body = keyed_server.post("/v1/chat/completions", {
            "model": keyed_server.model_name(API_KEY), "messages": [{"role": "user", "content": QUESTION}]}, api_key)
        assert status == 401, body
        return f"401: {body['error']['message']}"

    page.goto(keyed_server.url + "/")
    page.wait_for_selector("#error:not([hidden])")  # no key: even the model list is refused
    assert refusal(None) in page.locator("#error").text_content()
    with page.expect_response("**/v1/models"):
        page.fill("#api-key", "wrong-key")
        page.press("#api-key", "Tab")  # a change event: the key is stored and tried on the model list
    page.fill("#message", QUESTION)
    page.click("#send")
    page.wait_for_function("text => document.getElementById('error').textContent.startsWith(text)",
                           arg=refusal("wrong-key"))
    assert page.locator("#error").is_visible()
    assert page.locator(".turn").count() == 0  # the refused turn is taken back...
    assert page.locator("#message").input_value() == QUESTION  # ...and its text returned to the box

    with page.expect_response("**/v1/models"):
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Tab")
    page.wait_for_selector("#error", state="hidden")
    page.click("#send")
    wait_until_answered(page)
    assert answer_text(page) and page.locator("#error").is_hidden()

    page.reload()  # the key is remembered in this browser (localStorage)
    assert page.locator("#api-key").input_value() == API_KEY
    assert not page.errors
