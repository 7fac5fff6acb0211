"""tinyinfer: a teaching inference engine for transformer language models.

    import tinyinfer
    llm = tinyinfer.load("path/to/model")               # a Hugging Face directory or a llama2.c .bin
    out = llm.generate("Once upon a time", tinyinfer.SamplingParams(temperature=0.0, max_tokens=64))
    print(out.text)
"""

import re
from importlib import metadata
from pathlib import Path

from tinyinfer.errors import CheckpointError, ContextLengthError, TokenizerMissingError
from tinyinfer.llm import LLM, load
from tinyinfer.outputs import GenerationOutput
from tinyinfer.sampling import SamplingParams


def _version() -> str:
    """The installed distribution's version; in a checkout that is not installed, pyproject.toml's."""
    try:
        return metadata.version("tinyinfer")
    except metadata.PackageNotFoundError:
        return _version_in_pyproject(Path(__file__).resolve().parent.parent / "pyproject.toml")


def _version_in_pyproject(pyproject: Path) -> str:
    """[project] version = "..." of a pyproject.toml (a regex: tomllib is Python 3.11+)."""
    text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else "unknown"


__version__ = _version()

__all__ = [
    "__version__",
    "load",
    "LLM",
    "SamplingParams",
    "GenerationOutput",
    "CheckpointError",
    "ContextLengthError",
    "TokenizerMissingError",
]
