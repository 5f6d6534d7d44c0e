#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA GPU and a CUDA build of torch:
# the gpu-marked tests, then bench/bench_gpu.py (rows as JSON in OUTDIR/bench_gpu.json).
#
#   bench/gpu_check.sh OUTDIR [bench_gpu.py arguments, e.g. --bundle demo-output/model --parts blocks,e2e --blocks 1,2]
#   GPU_TESTS=0 bench/gpu_check.sh OUTDIR ...   # the benchmark only (e.g. when the tests ran in an earlier call)
#
# When ./.whl/ holds wheels (catalogpred and its dependencies for that machine's Python; no index
# needed), they are installed first into /tmp/site, for a machine whose Python has torch but not the rest.
# bench/gpu_wheels.sh makes them (on a machine with a package index) for the device machines' image.
set -euo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR [bench_gpu.py arguments]}
shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
if [ "${GPU_TESTS:-1}" != 0 ]; then
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_compile.py 2>&1 | tail -25 \
        || status=1
fi
python3 bench/bench_gpu.py --json "$out/bench_gpu.json" "$@" || status=1
exit $status
