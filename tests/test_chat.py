"""Multi-turn chat: the chat template, and the history's KV reused across turns (the engine's
prefix cache)."""

import pytest

import tinyinfer
from tinyinfer.chat import ChatSession
from tinyinfer.engine import LLMEngine
from tiny_models import FIXTURES

GREEDY = tinyinfer.SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llm(request):
    return tinyinfer.load(FIXTURES / "models" / request.param)


def test_first_turn_prompt_is_the_rendered_template(llm):
    session = ChatSession(llm)
    "".join(session.send("Hello there", GREEDY))
    rendered = llm.tokenizer.chat_template.render([{"role": "user", "content": "Hello there"}])
    assert session.last_sequence.prompt_ids == llm.encode(rendered, add_special_tokens=False)


def test_second_turn_reuses_the_cached_prefix_and_answers_as_a_fresh_session_would(llm):
    session = ChatSession(llm)
    "".join(session.send("Hello there", GREEDY))
    second = "".join(session.send("And then?", GREEDY))
    sequence = session.last_sequence
    assert session.reused_tokens > 0
    prefilled = len(sequence.prompt_ids) - session.reused_tokens
    assert prefilled < len(sequence.prompt_ids)

    llm.engine = LLMEngine(llm)  # a new engine: an empty prefix cache
    fresh = ChatSession(llm)
    fresh.messages = session.messages[:2]  # the same history, but nothing cached
    assert "".join(fresh.send("And then?", GREEDY)) == second
    assert fresh.reused_tokens == 0
    assert fresh.last_sequence.output_ids == sequence.output_ids


def test_reset_forgets_the_conversation(llm):
    session = ChatSession(llm)
    "".join(session.send("Hello there", GREEDY))
    first_prompt = session.last_sequence.prompt_ids
    "".join(session.send("And then?", GREEDY))
    session.reset()
    assert session.messages == []
    "".join(session.send("Hello there", GREEDY))
    assert session.last_sequence.prompt_ids == first_prompt  # no history in the prompt


def test_plain_continuation_without_a_template_keeps_the_running_text(tmp_path):
    llm = tinyinfer.load(FIXTURES / "models" / "llama")
    llm.tokenizer.chat_template = None
    session = ChatSession(llm)
    "".join(session.send("Once upon a time there was a little", GREEDY))
    first = session.last_sequence
    "".join(session.send(" more", GREEDY))
    second = session.last_sequence
    assert second.prompt_ids[: first.num_tokens] == first.token_ids
    block_size = llm.engine.config.block_size
    assert first.num_tokens >= block_size  # so that a full block of the first turn can be reused
    assert session.reused_tokens == block_size * (first.num_tokens // block_size)


def test_a_message_too_long_for_the_context_alone_says_to_shorten_it(llm):
    session = ChatSession(llm)
    with pytest.raises(tinyinfer.ContextLengthError, match="context window is 128 tokens .*; shorten it"):
        "".join(session.send("word " * 200, GREEDY))


def test_chat_needs_a_tokenizer(tiny_llm):
    with pytest.raises(tinyinfer.TokenizerMissingError):
        ChatSession(tiny_llm)
