"""The response bodies, in OpenAI's shapes: whole responses, and the chunks of a stream.

A stream is server-sent events: each chunk is one line `data: {json}` and a blank line, and the
stream ends with `data: [DONE]`. Chunks are built as plain dicts and dumped with `json.dumps`;
the one sent per token, which differs from the last only in its text, is rendered once per
request and filled in (TextChunks).

    completion           {"object": "text_completion", "choices": [{"text", "finish_reason"}], "usage"}
    completion chunk     the same object, each choice's "text" a new piece
    chat completion      {"object": "chat.completion", "choices": [{"message": {"role", "content"}}], "usage"}
    chat chunk           {"object": "chat.completion.chunk", "choices": [{"delta": {"content": piece}}]}

`finish_reason` is tinyinfer's: "stop" (EOS, a stop string or stop token), "length" (max_tokens,
or the context window), or "abort" (only seen when the server shuts down mid-request).
"""

import json
import time
import uuid

DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(body: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class TextChunks:
    """The events of one stream that carry a new piece of text, rendered once: `chunk` is
    built with a placeholder for the text, and each piece is put in its place. A stream sends
    one per token, and dumping the whole dict each time was a tenth of the server's time per
    token. chunk: a function of the text that returns the event's dict (completion_chunk, ...)."""

    PLACEHOLDER = "\x00text\x00"

    def __init__(self, chunk):
        event = sse(chunk(self.PLACEHOLDER))
        self.before, self.after = event.split(json.dumps(self.PLACEHOLDER).encode())

    def __call__(self, text: str) -> bytes:
        return self.before + json.dumps(text).encode() + self.after


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- /v1/completions ---------------------------------------------------------------------
def completion(request_id: str, created: int, model: str, text: str, finish_reason: str, counts: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": counts}


def completion_chunk(request_id: str, created: int, model: str, text: str, finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


# ---- /v1/chat/completions ----------------------------------------------------------------
def chat_completion(request_id: str, created: int, model: str, text: str, finish_reason: str, counts: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": counts}


def chat_chunk(request_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, created: int, model: str, object_name: str, counts: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the token counts."""
    return {"id": request_id, "object": object_name, "created": created, "model": model, "choices": [],
            "usage": counts}


# ---- /v1/models ----------------------------------------------------------------------------
def model_card(name: str, created: int, max_context: int) -> dict:
    """One served model. max_model_len (vLLM's field) tells a client the context window."""
    return {"id": name, "object": "model", "created": created, "owned_by": "tinyinfer", "max_model_len": max_context}
