"""Streaming text: incremental detokenization and stop strings."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyinfer
from tinyinfer.detokenizer import IncrementalDetokenizer
from tiny_models import FIXTURES

MODEL = FIXTURES / "models" / "qwen2"  # byte-level BPE: one character can span several tokens


@pytest.fixture(scope="module")
def llm():
    return tinyinfer.load(MODEL)


def stream_ids(tokenizer, prompt_ids, ids):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.add(t) for t in ids]
    return pieces + [detokenizer.flush()]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab é✓日本🙂\n.")), min_size=1, max_size=30))
def test_streamed_pieces_join_to_the_full_decode_and_never_split_a_character(llm, text):
    ids = llm.encode(text, add_special_tokens=False)
    pieces = stream_ids(llm.tokenizer, llm.encode("Hello"), ids)
    assert "".join(pieces) == llm.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_multibyte_character_split_across_tokens_waits_until_complete(llm):
    ids = llm.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # the byte-level tokenizer has no token for it
    pieces = stream_ids(llm.tokenizer, [], ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "🙂"


def test_stream_yields_the_same_text_as_generate(llm):
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert "".join(llm.stream("To be", params)) == llm.generate("To be", params).text


def test_stop_string_ends_the_text_before_it_and_is_never_streamed(llm):
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate("To be", params).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    stopped_params = tinyinfer.SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    out = llm.generate("To be", stopped_params)
    assert out.text == full[: full.index(stop)] and out.finish_reason == "stop"
    pieces = list(llm.stream("To be", stopped_params))
    assert "".join(pieces) == out.text
