"""Where the bundled default model, bard, lies on disk.

weights/train.py writes it to weights/bard/ in the source tree. A wheel carries those files
as the data-only package `tinyinfer.bundled_model` (see pyproject.toml), so after a normal
`pip install .` they sit inside the installed package; after an editable install
(`pip install -e .`) the package is the source tree itself, and they are found in weights/.
"""

from pathlib import Path

DEFAULT_MODEL_NAME = "bard"

_PACKAGE = Path(__file__).resolve().parent
CANDIDATES = (
    _PACKAGE / "bundled_model",  # installed from a wheel
    _PACKAGE.parent / "weights" / DEFAULT_MODEL_NAME,  # a source checkout (editable install)
)


def default_model_path() -> Path:
    for path in CANDIDATES:
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"the bundled model {DEFAULT_MODEL_NAME!r} is not installed (looked in "
        f"{', '.join(str(p) for p in CANDIDATES)}); reinstall tinyinfer with `pip install .` "
        "from a full checkout, or pass --model PATH"
    )
