"""What a finished request returns."""

from dataclasses import dataclass, field

from tinyinfer.errors import TokenizerMissingError


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # the generated ids (an EOS or stop token that ended it included)
    finish_reason: str  # "stop": EOS, a stop token or a stop string; "length": max_tokens or the context
    time_to_first_token: float | None  # seconds from the request to its first token (prefill)
    time_per_output_token: float | None  # mean seconds between later tokens (decode)
    total_time: float
    cut_by_context: bool = False  # finish_reason "length" because the context window filled up, not max_tokens
    _text: str | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The generated text (without the stop string or EOS that ended it)."""
        if self._text is None:
            raise TokenizerMissingError("Reading .text")
        return self._text

    @property
    def decode_tokens_per_second(self) -> float | None:
        return 1.0 / self.time_per_output_token if self.time_per_output_token else None
