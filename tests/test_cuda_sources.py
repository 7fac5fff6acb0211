"""The CUDA kernel sources, checked without a GPU: each kernels/cuda/*.cu compiles with nvcc, and
defines, unmangled, every kernel the CuPy backend launches from it.

CuPy compiles the kernels only at run time, on a GPU; here nvcc compiles them (through ptxas,
to machine code) so that a syntax or type error, or a renamed kernel, cannot land. The nvcc
tests skip where nvcc is not installed; the name checks need only the text.
"""

import re
import shutil
import subprocess

import pytest

from tinyinfer.kernels import cupy_backend
from tinyinfer.kernels.cupy_backend import CUDA_DIR, KERNELS, SUFFIXES, read_source

NVCC = shutil.which("nvcc")
ARCH = "sm_80"  # Ampere: a target that CUDA 12 and CUDA 13 both accept
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed, so the CUDA sources are not compiled")


def launched(file: str) -> list[str]:
    """The kernels the backend asks for from `file`: each name for float32 and float16."""
    return sorted(f"{name}_{suffix}" for name in KERNELS[file] for suffix in SUFFIXES.values())


def test_the_backend_loads_every_source_file():
    assert sorted(KERNELS) == sorted(path.name for path in CUDA_DIR.glob("*.cu"))


@pytest.mark.parametrize("file", sorted(KERNELS))
def test_every_kernel_the_backend_launches_is_declared_extern_c(file):
    declared = re.findall(r'extern "C" __global__ void (\w+)\(', (CUDA_DIR / file).read_text())
    assert sorted(declared) == launched(file)


@pytest.mark.parametrize("file, define, value", [
    ("attention.cu", "MAX_HEAD_DIM", cupy_backend.MAX_HEAD_DIM),
    ("quantized.cu", "Q8_TILE", cupy_backend.Q8_TILE),
    ("matvec.cu", "DECODE_MAX_ROWS", cupy_backend.DECODE_MAX_ROWS),
    ("common.cuh", "MATVEC_ROWS", cupy_backend.MATVEC_ROWS),
])
def test_the_backend_sizes_launches_for_the_constants_of_the_kernels(file, define, value):
    assert re.search(rf"#define {define} (\d+)", (CUDA_DIR / file).read_text()).group(1) == str(value)


@needs_nvcc
@pytest.mark.parametrize("file", sorted(KERNELS))
def test_each_source_compiles_with_nvcc_as_cupy_is_given_it(file, tmp_path):
    """The text NVRTC gets (common.cuh inlined, so nothing is left to include), compiled to a
    cubin; the PTX that nvcc keeps on the way names the kernels it exports. ptxas reports each
    kernel's use of local memory (per-thread memory as slow as the weights' HBM): none may use
    any, for an accumulator spilled there would be re-read on every step of a decode loop. And
    the decode matrix products read with 128-bit loads, what lets them stream at HBM bandwidth."""
    source = tmp_path / file
    source.write_text(read_source(file))
    result = subprocess.run([NVCC, "-cubin", f"-arch={ARCH}", "-Xptxas", "-v", "--keep", "--keep-dir", str(tmp_path),
                             "-o", str(tmp_path / "out.cubin"), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / source.with_suffix(".ptx").name).read_text()
    assert sorted(re.findall(r"\.entry (\w+)\(", ptx)) == launched(file)
    local = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert len(local) == len(launched(file)) and all(n == "0" for kernel in local for n in kernel), result.stderr
    if file in ("matvec.cu", "quantized.cu"):
        assert re.search(r"ld\.global(\.nc)?\.v4\.", ptx)
