"""A Hugging Face tokenizer (tokenizer.json) with its special tokens and chat template.

The `tokenizers` library does the encoding and decoding; this file gathers what lies around
it in a model directory: BOS/EOS from tokenizer_config.json and the chat template, which lives
in tokenizer_config.json or, in newer checkpoints, in chat_template.jinja.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer

from tinyinfer.errors import CheckpointError
from tinyinfer.loading.chat_template import ChatTemplate


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    def __init__(self, tokenizer_json: Path):
        tokenizer_json = Path(tokenizer_json)
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise CheckpointError(f"{tokenizer_json}: not a valid tokenizer.json ({e})") from None
        directory = tokenizer_json.parent
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}

        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(config.get(name))
            if text is not None:
                special[name] = text
        self.bos_token_id = self._id_of(special.get("bos_token"))
        eos = self._id_of(special.get("eos_token"))
        self.eos_token_ids = [eos] if eos is not None else []
        self.chat_template = self._find_chat_template(config, directory, special)

    def _id_of(self, text):
        return None if text is None else self.tokenizer.token_to_id(text)

    @staticmethod
    def _find_chat_template(config: dict, directory: Path, special: dict) -> ChatTemplate | None:
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: use the default one
            named = {entry["name"]: entry["template"] for entry in source}
            source = named.get("default", next(iter(named.values()), None))
        jinja_file = directory / "chat_template.jinja"
        if source is None and jinja_file.exists():
            source = jinja_file.read_text()
        return ChatTemplate(source, special) if source else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids; add_special_tokens adds what the tokenizer's post-processor adds
        (Llama's BOS, for example). A rendered chat template already holds its special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
