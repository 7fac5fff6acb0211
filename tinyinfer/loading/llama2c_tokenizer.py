"""llama2.c's tokenizer.bin: a sentencepiece-style BPE with scores, encoded exactly as run.c does.

File layout: int32 max_token_length, then for each of vocab_size tokens: float32 score,
int32 length, that many bytes of UTF-8. Ids 0, 1, 2 are <unk>, <s> (BOS), </s> (EOS); ids
3..258 are the 256 byte-fallback tokens "<0x00>".."<0xFF>".

Encoding (run.c's `encode`): a leading space (sentencepiece's "dummy prefix"), then one token per
UTF-8 character (its byte tokens when the character is not in the vocabulary), then repeatedly
merge the adjacent pair whose merged string is in the vocabulary with the highest score.
"""

import re
import struct
from pathlib import Path

from tinyinfer.errors import CheckpointError

BOS_ID, EOS_ID = 1, 2
BYTE_TOKEN = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Llama2cTokenizer:
    chat_template = None  # llama2.c models are plain continuation models
    bos_token_id = BOS_ID
    eos_token_ids = [EOS_ID]

    def __init__(self, path: Path, vocab_size: int):
        path = Path(path)
        data = path.read_bytes()
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        offset = 4  # skip max_token_length
        try:
            for _ in range(vocab_size):
                score, length = struct.unpack_from("<fi", data, offset)
                offset += 8
                if length < 0 or offset + length > len(data):
                    raise struct.error("token length out of range")
                self.pieces.append(data[offset : offset + length])
                self.scores.append(score)
                offset += length
        except struct.error:
            raise CheckpointError(
                f"{path}: ends after {len(self.pieces)} of the model's {vocab_size} tokens; "
                "is it the tokenizer.bin made for this model?"
            ) from None
        self.ids = {piece: i for i, piece in reversed(list(enumerate(self.pieces)))}  # first id wins

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokens = []
        if text:
            tokens.append(self.ids[b" "])  # the dummy prefix
        for char in text:
            encoded = char.encode("utf-8")
            if encoded in self.ids:
                tokens.append(self.ids[encoded])
            else:  # byte fallback: <0xXX> tokens start at id 3
                tokens.extend(byte + 3 for byte in encoded)
        while True:  # merge the best-scoring adjacent pair until none is in the vocabulary
            best_score, best_index, best_id = float("-inf"), -1, -1
            for i in range(len(tokens) - 1):
                merged = self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best_score, best_index, best_id = self.scores[merged], i, merged
            if best_index < 0:
                break
            tokens[best_index : best_index + 2] = [best_id]
        return [BOS_ID] + tokens if add_special_tokens else tokens

    def decode(self, token_ids: list[int]) -> str:
        """Ids -> text as run.c prints it: byte tokens become their byte, BOS and EOS print
        nothing, and the space that starts the piece right after BOS is dropped."""
        out = bytearray()
        previous = None
        for token in token_ids:
            if token in (BOS_ID, EOS_ID):
                previous = token
                continue
            piece = self.pieces[token]
            if previous == BOS_ID and piece.startswith(b" "):
                piece = piece[1:]
            byte = BYTE_TOKEN.match(piece)
            out += bytes([int(byte.group(1), 16)]) if byte else piece
            previous = token
        return out.decode("utf-8", errors="replace")
