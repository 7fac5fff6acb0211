"""The op interface: the only thing the model calls.

A backend is an object with the ops of `NumpyBackend` (the reference, and the textbook) plus
`to_device` / `to_numpy`. Choosing one is a single argument: `get_backend("numpy")`.
"""

from tinyinfer.ops.numpy_backend import NumpyBackend

BACKENDS = {"numpy": NumpyBackend}


def get_backend(name: str):
    """Return a new backend object by name ("numpy"; "numba" and "cupy" come with the kernels)."""
    try:
        backend_class = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; available backends: {', '.join(sorted(BACKENDS))}"
        ) from None
    return backend_class()
