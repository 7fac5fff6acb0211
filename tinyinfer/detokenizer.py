"""Incremental detokenization: turning a growing list of token ids into streamed text.

Decoding token by token goes wrong in two ways: one character may span several tokens (a
byte-level BPE splits "é" or an emoji across tokens, so a lone token decodes to "\ufffd"),
and some tokenizers drop a token's leading space when it is decoded alone. So we decode a
small window of recent tokens twice, with and without the new ones, and emit the difference;
while the text ends in an incomplete character we emit nothing and wait (as vLLM and TGI do).
"""

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens kept as context, so the first output token gets its space


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the window we decode
        self.read_offset = len(self.ids)  # tokens before this have been emitted as text

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes ("" while a character is partial)."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is left, even a partial character."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        emitted = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(window) <= len(emitted) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(emitted) :]
