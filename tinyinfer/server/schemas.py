"""The request bodies of the OpenAI API, and what they mean for tinyinfer.

Each endpoint's body is a pydantic model: FastAPI parses the JSON into it and checks the types
(strictly: "0.5" is not a number, 1.5 is not an integer), and `sampling_params` turns it into
a SamplingParams, checking the ranges with the library's own rules
(tinyinfer.sampling.setting_problem), so a bad value gets the same words here as in Python.

What is accepted:
- OpenAI's sampling parameters: temperature, top_p, max_tokens (chat also
  max_completion_tokens), stop (a string or a list), seed, n (1 only), stream and
  stream_options.include_usage.
- vLLM's extensions, under vLLM's names: top_k (-1 or 0 disables it), min_p,
  repetition_penalty, ignore_eos, stop_token_ids.
- Unknown fields are ignored, as vLLM does, so that clients sending newer OpenAI fields (user,
  metadata, store, ...) keep working. But a field that OpenAI defines and that would change the
  output in a way tinyinfer cannot honour (n > 1, logprobs, presence_penalty, tools, ...) is
  refused with a 400 that names it: ignoring it would return something the client did not ask
  for, without saying so.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from tinyinfer.sampling import SamplingParams, setting_problem
from tinyinfer.server.errors import bad_request

# the SamplingParams settings a request may set, under the same names
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop", "stop_token_ids",
                   "ignore_eos")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False  # a last chunk with the token counts, before [DONE]


class GenerationRequest(BaseModel):
    """What both endpoints take besides the prompt."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's sampling parameters
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # OpenAI parameters tinyinfer cannot honour: refused unless left at their neutral values
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self):
        """A 400 for the first parameter that asks for something tinyinfer does not do."""
        for param, value, neutral, instead in self.unsupported():
            if value not in neutral:
                raise bad_request(f"{param}={value!r} is not supported by tinyinfer{instead}", param)

    def unsupported(self) -> list[tuple[str, Any, tuple, str]]:
        """(parameter, its value, the values that mean "off", what to do instead)."""
        return [
            ("n", self.n, (1,), "; only one choice per request: send the request n times (with different seeds)"),
            ("presence_penalty", self.presence_penalty, (None, 0, 0.0), "; use repetition_penalty (an extension)"),
            ("frequency_penalty", self.frequency_penalty, (None, 0, 0.0), "; use repetition_penalty (an extension)"),
            ("logit_bias", self.logit_bias, (None, {}), ""),
        ]

    def requested_max_tokens(self) -> tuple[str, int | None]:
        """(the parameter that set max_tokens, its value or None)."""
        return "max_tokens", self.max_tokens

    def default_max_tokens(self, prompt_tokens: int, max_context: int) -> int:
        """max_tokens when the request does not say: the rest of the context window (vLLM's
        default; the completions endpoint overrides it with OpenAI's 16)."""
        return max(1, max_context - prompt_tokens)

    def sampling_params(self, prompt_tokens: int, max_context: int) -> SamplingParams:
        """The request's settings as SamplingParams; a 400 naming the first bad one."""
        settings = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        if settings.get("top_k") == -1:
            settings["top_k"] = 0  # vLLM's (and older clients') way of saying "no top-k"
        max_tokens_param, max_tokens = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = self.default_max_tokens(prompt_tokens, max_context)
        settings["max_tokens"] = max_tokens
        for name, value in settings.items():
            problem = setting_problem(name, value)
            if problem:
                param = max_tokens_param if name == "max_tokens" else name
                raise bad_request(f"{param} {problem}, got {value!r}", param)
        return SamplingParams(**settings)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: continue a prompt."""

    prompt: Any  # one prompt: text, or a list of token ids (checked by prompt_problem)
    # OpenAI parameters tinyinfer cannot honour
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self):
        return super().unsupported() + [
            ("best_of", self.best_of, (None, 1), ""),
            ("echo", self.echo, (False,), "; the prompt is in your request already"),
            ("logprobs", self.logprobs, (None,), ""),
            ("suffix", self.suffix, (None, ""), ""),
        ]

    def default_max_tokens(self, prompt_tokens: int, max_context: int) -> int:
        return 16  # OpenAI's (and vLLM's) default for completions

    def single_prompt(self) -> str | list[int]:
        """The prompt as text or token ids. OpenAI also takes a list of prompts, one choice
        each; tinyinfer answers one prompt per request (a list of one is accepted)."""
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise bad_request(f"prompt: one prompt per request, got a list of {len(prompt)}; send them as separate "
                              "requests (they are batched together on the server all the same)", "prompt")
        if prompt in ("", []):
            raise bad_request("prompt: must not be empty", "prompt")
        raise bad_request("prompt: must be text (a string) or a list of token ids (integers)", "prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: Any = None  # text, or a list of {"type": "text", "text": ...} parts
    name: str | None = None

    @field_validator("role")
    @classmethod
    def known_role(cls, role: str) -> str:
        if role not in CHAT_ROLES:
            raise ValueError(f"role must be one of {', '.join(CHAT_ROLES)} (tools are not supported), got {role!r}")
        return role

    def text(self, index: int) -> str:
        """The message's content as one text: a list of text parts is joined (images and audio
        are refused: the models tinyinfer runs read text only)."""
        content = self.content
        if isinstance(content, str):
            return content
        if content is None and self.role == "assistant":
            return ""
        if isinstance(content, list) and all(isinstance(part, dict) for part in content):
            kinds = {part.get("type") for part in content}
            if kinds <= {"text"} and all(isinstance(part.get("text"), str) for part in content):
                return "".join(part["text"] for part in content)
            raise bad_request(f"messages[{index}].content: only text parts are supported "
                              f"(got {', '.join(sorted(map(str, kinds - {'text'})))})", "messages")
        raise bad_request(f"messages[{index}].content: must be a string or a list of text parts", "messages")


CHAT_ROLES = ("system", "developer", "user", "assistant")


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions: answer a conversation, laid out by the model's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    # OpenAI parameters tinyinfer cannot honour
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    response_format: dict | None = None

    def unsupported(self):
        response_format = (self.response_format or {}).get("type", "text")
        return super().unsupported() + [
            ("logprobs", self.logprobs, (False,), ""),
            ("top_logprobs", self.top_logprobs, (None, 0), ""),
            ("tools", self.tools, (None, []), ""),
            ("tool_choice", self.tool_choice, (None, "none"), ""),
            ("functions", self.functions, (None, []), ""),
            ("response_format", response_format, ("text",), "; only plain text"),
        ]

    def requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them: [{"role", "content"}, ...], with
        OpenAI's "developer" role as "system" (what it replaced)."""
        if not self.messages:
            raise bad_request("messages: must hold at least one message", "messages")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]

