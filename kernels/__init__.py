"""JIT kernels behind the op interface: Numba CPU kernels and CUDA kernels loaded through CuPy.

Installed as the package `tinyinfer.kernels` (see pyproject.toml). Each backend here must give
the numbers of the NumPy reference, `tinyinfer/ops/numpy_backend.py`; the tests check it.
"""
