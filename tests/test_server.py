"""The OpenAI-compatible server (tinyinfer/server/), live on 127.0.0.1, through the official
`openai` client (and httpx where a test needs the raw HTTP).

bard on the NumPy backend answers in milliseconds. What a request gets back is compared with
what the library gives for the same prompt and settings (a second LLM, outside the server), so
these tests say that the server adds nothing and loses nothing on the way. The tests that
need a request to stay in the engine for a while (a client leaving mid-answer, a full queue)
use a second server whose forward passes are slowed down and which runs one sequence at a time.
"""

import asyncio
import re
import socket
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import tinyinfer
from tinyinfer.cli import main
from tinyinfer.engine import EngineConfig
from tinyinfer.server import create_app
from tinyinfer.threads import available_cores

API_KEY = "test-key"
CHAT = [{"role": "system", "content": "A room in the castle."}, {"role": "user", "content": "Who goes there?"}]
GREEDY = tinyinfer.SamplingParams(temperature=0, max_tokens=24)


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app, llm, **options):
        self.app, self.llm = app, llm
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))  # the port is ours from here on: no race for it
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def post(self, path: str, body, timeout: float = 30) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout)

    def metric(self, name: str) -> float:
        """One sample of GET /metrics, by its name with labels: 'tinyinfer_batch_size_count'."""
        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def wait_until_idle(self, timeout: float = 10.0):
        """Until the engine holds no request and every KV block is free again."""
        engine = self.llm.engine
        deadline = time.monotonic() + timeout
        while engine.has_unfinished() or engine.block_manager.num_free != engine.pool.num_blocks:
            assert time.monotonic() < deadline, (f"the engine still holds requests: {engine.block_manager.num_free} of "
                                                 f"{engine.pool.num_blocks} KV blocks free")
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def reference():
    """The library's own answers: an LLM the server does not touch."""
    return tinyinfer.load()


@pytest.fixture(scope="module")
def server():
    llm = tinyinfer.load()
    live = LiveServer(create_app(llm, api_key=API_KEY), llm)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def slow_server():
    """One sequence at a time, 10 ms more per forward pass, at most one request waiting."""
    llm = tinyinfer.load()
    llm.engine = llm.new_engine(EngineConfig(max_num_seqs=1))
    submit = llm.model.submit

    def slow_submit(batch):
        time.sleep(0.01)
        return submit(batch)

    llm.model.submit = slow_submit
    live = LiveServer(create_app(llm, api_key=API_KEY, max_waiting=1), llm)
    yield live
    live.stop()


def chat_prompt_ids(llm, messages) -> list[int]:
    text = llm.tokenizer.chat_template.render(messages, add_generation_prompt=True)
    return llm.encode(text, add_special_tokens=False)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---- answers -------------------------------------------------------------------------------

def test_completion_is_the_librarys_greedy_continuation(server, reference):
    expected = reference.generate("ROMEO.", GREEDY)
    completion = server.client().completions.create(model="bard", prompt="ROMEO.", max_tokens=24, temperature=0)
    choice = completion.choices[0]
    assert (choice.text, choice.finish_reason) == (expected.text, expected.finish_reason)
    assert completion.object == "text_completion" and completion.model == "bard"


def test_usage_counts_prompt_and_completion_tokens(server, reference):
    expected = reference.generate("JULIET.", GREEDY)
    usage = server.client().completions.create(model="bard", prompt="JULIET.", max_tokens=24, temperature=0).usage
    assert usage.prompt_tokens == len(expected.prompt_token_ids)
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_takes_token_ids_as_the_prompt(server, reference):
    ids = reference.encode("HAMLET.")
    expected = reference.generate(ids, GREEDY)
    completion = server.client().completions.create(model="bard", prompt=ids, max_tokens=24, temperature=0)
    assert completion.choices[0].text == expected.text


def test_chat_answers_through_the_models_chat_template(server, reference):
    expected = reference.generate(chat_prompt_ids(reference, CHAT), GREEDY)
    chat = server.client().chat.completions.create(model="bard", messages=CHAT, max_tokens=24, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected.text
    assert chat.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_max_completion_tokens_is_max_tokens(server):
    chat = server.client().chat.completions.create(model="bard", messages=CHAT, max_completion_tokens=3,
                                                   temperature=0, extra_body={"ignore_eos": True})
    assert (chat.usage.completion_tokens, chat.choices[0].finish_reason) == (3, "length")


def test_streamed_completion_joins_to_the_whole_text(server):
    client = server.client()
    whole = client.completions.create(model="bard", prompt="KING.", max_tokens=24, temperature=0).choices[0]
    chunks = list(client.completions.create(model="bard", prompt="KING.", max_tokens=24, temperature=0, stream=True))
    assert len(chunks) >= 2  # in pieces: the first token goes at once
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.text
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == whole.finish_reason


def test_streamed_chat_joins_to_the_whole_answer_with_usage_last(server):
    client = server.client()
    whole = client.chat.completions.create(model="bard", messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="bard", messages=CHAT, max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def stream_of_24_tokens(live: LiveServer) -> tuple[list[str], int]:
    chunks = list(live.client().completions.create(model="bard", prompt="KING.", max_tokens=24, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    return [chunk.choices[0].text for chunk in chunks if chunk.choices], chunks[-1].usage.completion_tokens


def test_without_a_chunk_interval_every_token_is_a_chunk(reference):
    llm = tinyinfer.load()
    live = LiveServer(create_app(llm, chunk_interval=0), llm)
    try:
        pieces, tokens = stream_of_24_tokens(live)
    finally:
        live.stop()
    assert len(pieces) == tokens == 24
    assert "".join(pieces) == reference.generate("KING.", tinyinfer.SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True)).text


def test_tokens_sooner_than_the_chunk_interval_go_together_the_first_at_once():
    llm = tinyinfer.load()
    live = LiveServer(create_app(llm, chunk_interval=5), llm)  # longer than the whole answer takes
    try:
        pieces, tokens = stream_of_24_tokens(live)
    finally:
        live.stop()
    assert tokens == 24 and len(pieces) == 2  # the first text (two tokens: bard's first shows none), then the rest


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "bard", "prompt": "ROMEO.", "max_tokens": 4, "temperature": 0, "stream": True}
    response = server.post("/v1/completions", body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


def test_stop_string_ends_the_text_before_it(server, reference):
    full = reference.generate("ROMEO.", GREEDY).text
    stop = full.split()[2]  # a word from the middle of the greedy answer
    completion = server.client().completions.create(model="bard", prompt="ROMEO.", max_tokens=24, temperature=0,
                                                    stop=[stop])
    assert completion.choices[0].text == full[: full.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_max_tokens_ends_with_length(server):
    completion = server.client().completions.create(model="bard", prompt="ROMEO.", max_tokens=2, temperature=0,
                                                    extra_body={"ignore_eos": True})
    assert (completion.usage.completion_tokens, completion.choices[0].finish_reason) == (2, "length")


def test_sampling_settings_and_extensions_reach_the_sampler(server, reference):
    settings = dict(temperature=0.9, top_p=0.95, seed=7, top_k=40, min_p=0.02, repetition_penalty=1.1, max_tokens=24)
    expected = reference.generate("ROMEO.", tinyinfer.SamplingParams(**settings))
    extensions = {name: settings.pop(name) for name in ("top_k", "min_p", "repetition_penalty")}
    completion = server.client().completions.create(model="bard", prompt="ROMEO.", extra_body=extensions, **settings)
    assert completion.choices[0].text == expected.text


def test_unknown_fields_are_ignored(server):
    response = server.post("/v1/completions", {"model": "bard", "prompt": "ROMEO.", "max_tokens": 2,
                                               "user": "someone", "metadata": {"a": "b"}, "no_such_field": 1})
    assert response.status_code == 200, response.text


def test_models_lists_the_served_name_and_context(server):
    models = server.client().models.list().data
    assert [model.id for model in models] == ["bard"]
    assert server.client().models.retrieve("bard").max_model_len == server.llm.config.max_context


def test_served_name_can_be_chosen():
    llm = tinyinfer.load()
    live = LiveServer(create_app(llm, model_name="ariel"), llm)
    try:
        assert [model.id for model in live.client().models.list().data] == ["ariel"]
        assert live.client().completions.create(model="ariel", prompt="ROMEO.", max_tokens=2).model == "ariel"
    finally:
        live.stop()


def test_health_answers_without_a_key(server):
    response = httpx.get(server.url + "/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_metrics_are_prometheus_text_with_latencies_tokens_and_blocks(server):
    server.client().completions.create(model="bard", prompt="ROMEO.", max_tokens=4, temperature=0)
    response = httpx.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    for name in ("tinyinfer_time_to_first_token_seconds_count", "tinyinfer_time_per_output_token_seconds_count",
                 "tinyinfer_e2e_request_latency_seconds_count", "tinyinfer_prompt_tokens_total",
                 "tinyinfer_generation_tokens_total", "tinyinfer_batch_size_count"):
        assert server.metric(name) > 0, name
    for name in ("tinyinfer_num_requests_waiting", "tinyinfer_num_requests_running", "tinyinfer_kv_cache_blocks_in_use",
                 "tinyinfer_prefix_cache_hit_rate"):
        assert re.search(rf"^{name} ", response.text, re.MULTILINE), name
    assert server.metric("tinyinfer_kv_cache_blocks_total") == server.llm.engine.pool.num_blocks


def test_the_chat_page_is_served_at_the_root_with_what_it_loads(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    for path in re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text):
        assert httpx.get(server.url + path).status_code == 200, path
    assert re.search(r'src="/static/chat.js"', page.text)


# ---- errors, in OpenAI's shape -------------------------------------------------------------

@pytest.mark.parametrize("setting, value, words", [
    ("temperature", -1, "temperature must be >= 0"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("max_tokens", 0, "max_tokens must be >= 1"),
    ("seed", -3, "seed must be >= 0"),
    ("top_k", -2, "top_k must be >= 0"),
    ("stop", [""], "stop strings must not be empty"),
])
def test_bad_setting_is_a_400_in_the_librarys_words(server, setting, value, words):
    response = server.post("/v1/completions", {"model": "bard", "prompt": "ROMEO.", setting: value})
    assert response.status_code == 400
    error = error_of(response)
    assert words in error["message"] and error["param"] == setting and error["type"] == "invalid_request_error"


def test_openai_client_raises_bad_request_for_a_bad_setting(server):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().completions.create(model="bard", prompt="ROMEO.", temperature=-1)
    assert raised.value.body["param"] == "temperature"


def test_wrong_type_is_a_400_not_fastapis_422(server):
    response = server.post("/v1/chat/completions", {"model": "bard", "messages": CHAT, "temperature": "hot"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "temperature"


def test_missing_field_and_invalid_json_are_400s(server):
    assert error_of(server.post("/v1/chat/completions", {"model": "bard"}))["param"] == "messages"
    response = httpx.post(server.url + "/v1/completions", content=b'{"model": "bard", ',
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in error_of(response)["message"]


@pytest.mark.parametrize("setting, value", [("n", 2), ("logprobs", 1), ("echo", True), ("presence_penalty", 0.5),
                                            ("best_of", 3)])
def test_what_tinyinfer_cannot_do_is_refused_by_name(server, setting, value):
    response = server.post("/v1/completions", {"model": "bard", "prompt": "ROMEO.", setting: value})
    assert response.status_code == 400 and error_of(response)["param"] == setting


def test_a_list_of_prompts_is_refused_one_prompt_per_request(server):
    response = server.post("/v1/completions", {"model": "bard", "prompt": ["ROMEO.", "JULIET."]})
    assert response.status_code == 400 and "one prompt per request" in error_of(response)["message"]


def test_prompt_past_the_context_window_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().completions.create(model="bard", prompt="ROMEO. " * 400)
    error = raised.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "context window is 256 tokens" in error["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().chat.completions.create(model="bard", messages=[{"role": "user", "content": "Ho! " * 400}])
    assert raised.value.body["param"] == "messages"


def test_a_request_the_kv_cache_could_never_hold_is_a_400():
    llm = tinyinfer.load()
    llm.engine = llm.new_engine(EngineConfig(num_blocks=2))  # 32 tokens
    live = LiveServer(create_app(llm), llm)
    try:
        response = live.post("/v1/completions", {"model": "bard", "prompt": "ROMEO.", "max_tokens": 100})
        assert response.status_code == 400 and error_of(response)["code"] == "kv_cache_too_small"
        assert "KV blocks" in error_of(response)["message"]
    finally:
        live.stop()


def test_missing_key_is_a_401(server):
    response = httpx.post(server.url + "/v1/completions", json={"model": "bard", "prompt": "ROMEO."})
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_a_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="not-the-key").completions.create(model="bard", prompt="ROMEO.")
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="not-the-key").models.list()


def test_without_a_key_configured_no_key_is_needed():
    llm = tinyinfer.load()
    live = LiveServer(create_app(llm), llm)
    try:
        response = httpx.post(live.url + "/v1/completions", json={"model": "bard", "prompt": "ROMEO.", "max_tokens": 2})
        assert response.status_code == 200
    finally:
        live.stop()


def test_unknown_model_is_a_404(server):
    with pytest.raises(openai.NotFoundError) as raised:
        server.client().completions.create(model="gpt-4", prompt="ROMEO.")
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"


def test_unknown_path_is_an_openai_shaped_404(server):
    response = httpx.get(server.url + "/v1/engines", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


@pytest.mark.parametrize("method, path", [("GET", "/v1/completions"), ("GET", "/v1/chat/completions"),
                                          ("POST", "/v1/models"), ("DELETE", "/health")])
def test_wrong_method_is_an_openai_shaped_405(server, method, path):
    response = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"


def test_oversized_body_is_a_413_before_it_is_read(server):
    response = server.post("/v1/completions", {"model": "bard", "prompt": "x" * 1_100_000})
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


def test_oversized_body_without_a_length_is_a_413_once_past_the_limit(server):
    def chunks():  # no Content-Length: chunked transfer encoding
        yield b'{"model": "bard", "prompt": "'
        for _ in range(12):
            yield b"x" * 100_000
        yield b'"}'

    response = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413


def test_full_queue_is_a_503_with_retry_after(slow_server):
    body = {"model": "bard", "prompt": "ROMEO.", "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=slow_server.url, headers=headers, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            tokens = running.iter_lines()  # kept: an iterator dropped half-read would close the connection
            next(tokens)  # its first token: it runs (the engine takes one sequence at a time)
            with http.stream("POST", "/v1/completions", json=body) as waiting:  # accepted, waits for a place
                assert waiting.status_code == 200
                refused = http.post("/v1/completions", json=body | {"stream": False})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1" and error_of(refused)["code"] == "queue_full"
    slow_server.wait_until_idle()


# ---- clients that leave --------------------------------------------------------------------

def test_streaming_client_that_disconnects_frees_its_blocks(slow_server):
    aborted = slow_server.metric('tinyinfer_request_success_total{finished_reason="abort"}')
    body = {"model": "bard", "prompt": "ROMEO.", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        with http.stream("POST", slow_server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines), next(lines)  # a token or two, then the client hangs up
            engine = slow_server.llm.engine
            assert engine.block_manager.num_free < engine.pool.num_blocks  # its KV is in the cache
    slow_server.wait_until_idle()
    assert slow_server.metric('tinyinfer_request_success_total{finished_reason="abort"}') == aborted + 1


def test_client_that_disconnects_before_a_whole_answer_frees_its_blocks(slow_server):
    aborted = slow_server.metric('tinyinfer_request_success_total{finished_reason="abort"}')
    body = {"model": "bard", "prompt": "ROMEO.", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # it gives up after 0.3 s of the ~2 s answer
        slow_server.post("/v1/completions", body, timeout=0.3)
    slow_server.wait_until_idle()
    assert slow_server.metric('tinyinfer_request_success_total{finished_reason="abort"}') == aborted + 1


# ---- the engine thread ---------------------------------------------------------------------

def test_stopping_the_server_aborts_what_runs_and_ends_the_engine_thread():
    llm = tinyinfer.load()
    submit = llm.model.submit
    llm.model.submit = lambda batch: (time.sleep(0.01), submit(batch))[1]
    live = LiveServer(create_app(llm), llm, timeout_graceful_shutdown=0.2)
    engine_loop = live.app.state.served.engine_loop
    body = {"model": "bard", "prompt": "ROMEO.", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", live.url + "/v1/completions", json=body) as response:
        tokens = response.iter_lines()
        next(tokens)  # it runs
        live.stop()  # as Ctrl-C does: the open stream is cut after the grace period
    assert not engine_loop.running
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_free == llm.engine.pool.num_blocks


def test_a_failed_engine_step_is_a_503_and_health_says_so():
    llm = tinyinfer.load()

    def broken(batch):
        raise RuntimeError("the device fell over")

    live = LiveServer(create_app(llm), llm)
    try:
        llm.model.submit = broken
        response = live.post("/v1/completions", {"model": "bard", "prompt": "ROMEO."})
        assert response.status_code == 503 and "the device fell over" in error_of(response)["message"]
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and "the device fell over" in health.json()["error"]
        assert live.post("/v1/completions", {"model": "bard", "prompt": "ROMEO."}).status_code == 503
    finally:
        live.stop()


# ---- many clients at once ------------------------------------------------------------------

def test_32_streaming_clients_each_get_their_own_greedy_answer_in_shared_steps(server, reference):
    prompts = [f"{name}.\n{line}" for name in ("ROMEO", "JULIET", "HAMLET", "OTHELLO")
               for line in ("Speak.", "Who is there?", "Good morrow.", "Alas!", "Come hither.", "What news?",
                            "Peace, I say.", "Farewell.")]
    settings = tinyinfer.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [reference.generate(prompt, settings) for prompt in prompts]  # one at a time
    steps = server.metric("tinyinfer_batch_size_count")
    steps_of_one = server.metric('tinyinfer_batch_size_bucket{le="1.0"}')

    async def one_client(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, int]:
        stream = await client.completions.create(model="bard", prompt=prompt, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        pieces, usage = [], None
        async for chunk in stream:
            pieces += [choice.text for choice in chunk.choices]
            usage = chunk.usage or usage
        return "".join(pieces), usage.completion_tokens

    async def all_clients():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as client:
            return await asyncio.gather(*(one_client(client, prompt) for prompt in prompts))

    together = asyncio.run(all_clients())
    assert together == [(output.text, len(output.token_ids)) for output in alone]
    batched_steps = (server.metric("tinyinfer_batch_size_count") - steps) - (
        server.metric('tinyinfer_batch_size_bucket{le="1.0"}') - steps_of_one)
    assert batched_steps > 0  # forward passes that served more than one sequence
    # 32 requests of 24 tokens in far fewer steps than 32 x 24 one-sequence decodes
    assert server.metric("tinyinfer_batch_size_count") - steps < 32 * 24 / 4
    server.wait_until_idle()


# ---- the command line ----------------------------------------------------------------------

def test_serve_refuses_a_public_address_without_a_key(monkeypatch, capsys):
    monkeypatch.delenv("TINYINFER_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--api-key" in error and "--insecure" in error


def test_serve_takes_the_key_from_the_environment_and_binds_where_asked(monkeypatch, capsys):
    started = {}
    monkeypatch.setenv("TINYINFER_API_KEY", "from-env")
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    assert main(["serve", "--host", "0.0.0.0", "--port", "9001", "--max-num-seqs", "4"]) == 0
    assert (started["host"], started["port"]) == ("0.0.0.0", 9001)
    served = started["app"].state.served
    assert served.name == "bard" and served.llm.engine.config.max_num_seqs == 4
    assert served.llm.ops.threads.setting == max(1, available_cores() - 1)  # a core left to the HTTP side
    assert "an API key" in capsys.readouterr().out


def test_serve_without_the_serve_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve"]) == 2
    assert 'pip install "tinyinfer[serve]"' in capsys.readouterr().err
