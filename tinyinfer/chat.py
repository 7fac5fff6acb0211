"""A multi-turn conversation, with the history's KV computed once.

Each turn the whole conversation is rendered again (with the model's chat template, or as
plain running text when it has none), tokenized and sent to the engine as a new request. The
engine's prefix cache finds the blocks of the history it computed last turn (keyed by their
tokens and everything before them), so only the new part is prefilled: turn n costs the
tokens of turn n, not the whole history.
"""

from collections.abc import Iterator

from tinyinfer.errors import ContextLengthError, TokenizerMissingError
from tinyinfer.sampling import SamplingParams


class ChatSession:
    def __init__(self, llm, system_prompt: str | None = None):
        if llm.tokenizer is None:
            raise TokenizerMissingError("Chat")
        self.llm = llm
        self.system_prompt = system_prompt
        self.reset()

    def reset(self):
        """Forget the conversation."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.transcript_ids: list[int] = []  # plain-text mode: every token so far
        self.last_sequence = None

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens of the last turn whose KV came from the prefix cache."""
        return self.last_sequence.num_cached_tokens if self.last_sequence else 0

    @property
    def uses_template(self) -> bool:
        return self.llm.tokenizer.chat_template is not None

    def _prompt_ids(self, user_text: str) -> list[int]:
        if self.uses_template:
            messages = self.messages + [{"role": "user", "content": user_text}]
            text = self.llm.tokenizer.chat_template.render(messages, add_generation_prompt=True)
            return self.llm.encode(text, add_special_tokens=False)
        # no template: the conversation is one running text that the model continues
        return self.transcript_ids + self.llm.encode(user_text, add_special_tokens=not self.transcript_ids)

    def send(self, user_text: str, params: SamplingParams) -> Iterator[str]:
        """Stream the answer to one user turn; the turn joins the history once it is done."""
        prompt_ids = self._prompt_ids(user_text)
        if len(prompt_ids) >= self.llm.config.max_context:
            raise ContextLengthError(
                f"the conversation has grown to {len(prompt_ids)} tokens, past the model's context window "
                f"of {self.llm.config.max_context}; start a new one with /reset"
            )
        engine = self.llm.engine
        request_id = engine.add_request(prompt_ids, params)
        sequence = self.last_sequence = engine.sequences[request_id]
        try:
            yield from self.llm.stream_request(request_id)
        finally:  # also when interrupted: what was generated stays part of the conversation
            self.transcript_ids = sequence.token_ids
            self.messages += [
                {"role": "user", "content": user_text},
                {"role": "assistant", "content": sequence.text},
            ]
