#!/usr/bin/env bash
# The CuPy backend on a machine with an NVIDIA GPU, in one go (about 5 minutes): install, show
# the GPU, run the CUDA tests, benchmark NumPy against CuPy in float32. Every output is also
# written to $OUT/ (or /tmp/gpu_check/ when OUT is unset).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

# The gpu extra is CuPy for CUDA 12. A Python that already has a CuPy (say cupy-cuda13x) keeps
# it: two CuPy wheels would overwrite each other's files. A machine that reaches no package index
# installs tinyinfer alone, on the packages it has.
extras="dev,gpu"
python3 -c "import cupy" 2>/dev/null && extras="dev"
python3 -m pip install -q --retries 0 --timeout 10 -e ".[$extras]" \
    || python3 -m pip install -q --no-deps --no-build-isolation -e . || status=1

nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt"
timeout 300 python3 -m pytest -q -rs tests/test_cupy_backend.py tests/test_cuda_sources.py 2>&1 \
    | tee "$out/pytest.txt" || status=1
for shape in stories15M stories110M; do
    timeout 150 python3 -m tinyinfer.cli bench --random "$shape" --backend numpy,cupy --dtype float32 2>&1 \
        | tee -a "$out/bench.txt" || status=1
done
exit $status
