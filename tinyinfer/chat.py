"""A multi-turn conversation, with the history's KV computed once, kept inside the context window.

Each turn the whole conversation is rendered again (with the model's chat template, or as
plain running text when it has none), tokenized and sent to the engine as a new request. The
engine's prefix cache finds the blocks of the history it computed last turn (keyed by their
tokens and everything before them), so only the new part is prefilled: turn n costs the
tokens of turn n, not the whole history.

When the conversation and room for the answer no longer fit the context window, the oldest
turns are dropped (never the system prompt), as llama.cpp's context shift and ollama do. Like
llama.cpp, a shift drops more than the minimum: down to half the window, so that the next turns
grow the kept part, found in the prefix cache, instead of shifting (and prefilling everything
after the system prompt again) on every turn.
"""

from collections.abc import Iterator

from tinyinfer.errors import ContextLengthError, TokenizerMissingError
from tinyinfer.sampling import SamplingParams, as_sampling_params


class ChatSession:
    def __init__(self, llm, system_prompt: str | None = None):
        if llm.tokenizer is None:
            raise TokenizerMissingError("Chat")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be text (a str) or None, got {type(system_prompt).__name__}")
        self.llm = llm
        self.system_prompt = system_prompt
        self.reset()

    def reset(self):
        """Forget the conversation."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.transcript_ids: list[int] = []  # plain-text mode: every token so far
        self.turn_ends: list[int] = []  # plain-text mode: where each turn ends in transcript_ids
        self.last_sequence = None
        self.dropped_turns = 0  # the oldest turns the last send dropped to fit the context window

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens of the last turn whose KV came from the prefix cache."""
        return self.last_sequence.num_cached_tokens if self.last_sequence else 0

    @property
    def uses_template(self) -> bool:
        return self.llm.tokenizer.chat_template is not None

    def answer_room(self, params: SamplingParams) -> int:
        """Tokens kept free for the answer: max_tokens, but at most a quarter of the window (a
        long max_tokens must not push the whole history out)."""
        return min(params.max_tokens, self.llm.config.max_context // 4)

    # ---- the conversation as a prompt ----------------------------------------------------
    def _num_kept_messages(self) -> int:
        """Messages never dropped: the system prompt."""
        return 1 if self.messages and self.messages[0]["role"] == "system" else 0

    def _num_turns(self) -> int:
        """Earlier turns (a user message and its answer) that could be dropped."""
        if self.uses_template:
            return (len(self.messages) - self._num_kept_messages()) // 2
        return len(self.turn_ends)

    def _drop_oldest_turn(self):
        if self.uses_template:
            kept = self._num_kept_messages()
            del self.messages[kept : kept + 2]
            return
        # no template: cut the running text at the end of its first turn, keeping a leading BOS
        bos = self.llm.tokenizer.bos_token_id
        kept = 1 if bos is not None and self.transcript_ids[:1] == [bos] else 0
        end = self.turn_ends.pop(0)
        self.transcript_ids = self.transcript_ids[:kept] + self.transcript_ids[end:]
        self.turn_ends = [e - end + kept for e in self.turn_ends]

    def _prompt_ids(self, user_text: str) -> list[int]:
        if self.uses_template:
            messages = self.messages + [{"role": "user", "content": user_text}]
            text = self.llm.tokenizer.chat_template.render(messages, add_generation_prompt=True)
            return self.llm.encode(text, add_special_tokens=False)
        # no template: the conversation is one running text that the model continues
        return self.transcript_ids + self.llm.encode(user_text, add_special_tokens=not self.transcript_ids)

    def _fit_context(self, user_text: str, params: SamplingParams) -> list[int]:
        """This turn's prompt, the oldest turns dropped while it leaves no room for the answer
        (then on to half the window). Sets dropped_turns; the history is changed only if the
        new message fits."""
        window, room = self.llm.config.max_context, self.answer_room(params)
        saved = (list(self.messages), list(self.transcript_ids), list(self.turn_ends))
        try:
            prompt_ids, dropped = self._prompt_ids(user_text), 0
            if len(prompt_ids) + room > window:
                while self._num_turns() and (len(prompt_ids) + room > window or len(prompt_ids) > window // 2):
                    self._drop_oldest_turn()
                    dropped += 1
                    prompt_ids = self._prompt_ids(user_text)
            if len(prompt_ids) >= window:
                with_system = " with the system prompt" if self._num_kept_messages() else ""
                raise ContextLengthError(
                    f"this message takes {len(prompt_ids)} tokens{with_system}, but the model's context window is "
                    f"{window} tokens (the message and its answer together); shorten it"
                )
        except BaseException:  # the conversation stays as it was
            self.messages, self.transcript_ids, self.turn_ends = saved
            raise
        self.dropped_turns = dropped
        return prompt_ids

    # ---- a turn --------------------------------------------------------------------------
    def send(self, user_text: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Stream the answer to one user turn; the turn joins the history once it is done.

        The prompt is made at once, before the first piece is asked for: a message too long for
        the window raises ContextLengthError here, and dropped_turns says how many of the oldest
        turns were dropped to make room (0 mostly), so a notice can come before the answer."""
        if not isinstance(user_text, str):
            raise TypeError(f"send takes the user's message as text (a str), got {type(user_text).__name__}")
        params = as_sampling_params(params)
        prompt_ids = self._fit_context(user_text, params)
        return self._answer(user_text, prompt_ids, params)

    def _answer(self, user_text: str, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        engine = self.llm.engine
        request_id = engine.add_request(prompt_ids, params)
        sequence = self.last_sequence = engine.sequences[request_id]
        try:
            yield from self.llm.stream_request(request_id)
        finally:  # also when interrupted: what was generated stays part of the conversation
            self.transcript_ids = sequence.token_ids
            self.turn_ends.append(len(self.transcript_ids))
            self.messages += [
                {"role": "user", "content": user_text},
                {"role": "assistant", "content": sequence.text},
            ]
