"""Chat templates: how a model wants a conversation laid out as text.

A chat model was trained on conversations in one exact format (Llama 2's `[INST]`, ChatML's
`<|im_start|>user`, ...). The checkpoint ships that format as a Jinja template; we render it the
way Hugging Face's `apply_chat_template` does (same Jinja settings, same helpers), so the
prompt the model sees is the one it was trained on.
"""

import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """A sandbox (templates come with downloaded checkpoints) configured as transformers does."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        """source: the Jinja text; special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...},
        which templates refer to by those names."""
        self.source = source
        self.special_tokens = special_tokens
        self.template = _environment().from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages: [{"role": "user" | "assistant" | "system", "content": str}, ...].
        add_generation_prompt appends the opening of the assistant's turn, so the model answers."""
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the model's chat template rejected the conversation: {e}") from None
