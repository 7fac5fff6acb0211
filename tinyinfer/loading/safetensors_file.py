"""Reading `.safetensors` files as memory-mapped NumPy arrays, bfloat16 included.

The format is simple: 8 bytes of little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes. We read the header with the
`safetensors` format in mind but map the data ourselves, for two reasons the `safetensors`
package's NumPy API does not cover: it copies each tensor into RAM (we want views of the
mapped file, so a float32 checkpoint costs no second copy), and NumPy has no bfloat16 type
(`safe_open(..., framework="numpy")` raises on it), while most real checkpoints are bf16.
"""

import json
import struct
from pathlib import Path

import numpy as np

from tinyinfer.errors import CheckpointError

NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # read as raw 16-bit words, widened by bfloat16_to_float32
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def bfloat16_to_float32(words: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32 (same sign and exponent, 7 mantissa bits), so
    widening is exact: shift each 16-bit word into the high half of a 32-bit word."""
    return (words.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One .safetensors file: tensor names, shapes, and zero-copy reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: too short to be a safetensors file")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > size - 8:
                raise CheckpointError(f"{self.path}: header length {header_length} exceeds the file; is it truncated?")
            try:
                header = json.loads(f.read(header_length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON") from None
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + header_length
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self.data_start else None
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            if entry["dtype"] not in NUMPY_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, which tinyinfer cannot read")
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} lies past the end of the file; is it truncated?")

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def stored_dtype(self, name: str) -> str:
        """The dtype as the file names it: "F32", "BF16", ..."""
        return self.header[name]["dtype"]

    def read(self, name: str, dtype, pick=None) -> np.ndarray:
        """The tensor converted to `dtype`. When it is stored in that dtype already, the result
        is a read-only view of the mapped file: nothing is copied into RAM until it is used.
        pick: a function that takes the stored array and returns the part of it to keep (one
        device's slice), applied before the conversion so only that part is ever read."""
        entry = self.header[name]
        start, end = entry["data_offsets"]
        raw = self.data[self.data_start + start : self.data_start + end] if end > start else np.zeros(0, np.uint8)
        array = raw.view(NUMPY_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if pick is not None:
            array = pick(array)
        if entry["dtype"] == "BF16":
            array = bfloat16_to_float32(array)
        return array.astype(dtype, copy=False)
