"""The op interface: the only thing the model calls.

A backend is an object with the ops of `NumpyBackend` (the reference, and the textbook):
embedding, matmul (float, float16-stored or int8 `Q8Weight` weights), rms_norm, rotary,
attention, silu_mul, softmax, plus `to_device` / `to_numpy` / `zeros`, `load_weights`
(the whole model's weights onto the device; the Numba backend copies them into huge pages)
`compile_model` (the backend's way of running the whole model; the Numba backend runs each
layer as compiled calls, the others run it op by op as written), and `set_threads` /
`begin_pass` (how many CPU threads the kernels use, sized before each forward pass:
tinyinfer/threads.py).
Choosing one is a single argument: `get_backend("numba")`. The fast backends live in
`kernels/` (installed as `tinyinfer.kernels`) and are imported only when chosen, so CuPy is
needed only for "cupy".
"""

import importlib

# name -> "module:class", imported on first use
BACKENDS = {
    "numpy": "tinyinfer.ops.numpy_backend:NumpyBackend",
    "numba": "tinyinfer.kernels.numba_backend:NumbaBackend",
    "cupy": "tinyinfer.kernels.cupy_backend:CupyBackend",
}


def get_backend(name: str):
    """Return a new backend object by name: "numpy", "numba" or "cupy"."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
