"""Which backends the tests run on: every one, except CuPy where there is no CuPy or no GPU
(it is skipped, with the reason). NumPy and Numba never skip: they are required."""

import pytest

from tinyinfer.ops import BACKENDS, get_backend


def cupy_unavailable_reason() -> str | None:
    try:
        get_backend("cupy")
    except (ImportError, RuntimeError) as e:  # the backend's own message: what is missing
        return str(e)
    return None


def backend_params(names=tuple(BACKENDS)):
    """pytest parameters for the named backends, CuPy marked to skip when it cannot run."""
    params = []
    for name in names:
        reason = cupy_unavailable_reason() if name == "cupy" else None
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params
