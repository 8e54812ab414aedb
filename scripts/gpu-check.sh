#!/usr/bin/env bash
# The CUDA path on a machine with an NVIDIA GPU: install the gpu extra's requirements the way the
# runtime-cuda image does (onnxruntime swapped for onnxruntime-gpu), run the cuda-marked tests, then
# `uembed bench --phases gpu`. Run from the repository root; OUT (default ./gpu-results) receives the logs
# and the benchmark's JSON. WHEELS names a folder of wheels for a machine with no package index (optional).
#
#   scripts/gpu-check.sh                       # with a package index
#   WHEELS=/tmp/wheels scripts/gpu-check.sh    # offline, as on the lent GPU machine (docs/BENCHMARKS.md)
#   BENCH=0 scripts/gpu-check.sh               # the cuda tests only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PYTHON -V | tee -a "$OUT/device.txt"

# The gpu extra and the service's web, Redis, JSON and gRPC pins (what `import uembed.serving.app` needs), read from pyproject.toml so this script cannot drift
# from the image. The other base pins (numpy, onnxruntime, ...) are the GPU machine's own or replaced.
mapfile -t GPU_REQUIREMENTS < <($PYTHON -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))')
mapfile -t SERVICE_REQUIREMENTS < <($PYTHON -c 'import re, tomllib; print("\n".join(r if r.startswith("tritonclient") else re.sub(r"\[.*\]", "", r) for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if r.startswith(("fastapi", "pydantic-settings", "uvicorn", "redis", "msgspec", "orjson", "grpcio", "tritonclient", "protobuf"))))')
INDEX=()
[ -n "${WHEELS:-}" ] && INDEX=(--no-index --find-links "$WHEELS")
$PYTHON -m pip uninstall -y -q onnxruntime 2>/dev/null
if ! $PYTHON -m pip install "${INDEX[@]}" "${GPU_REQUIREMENTS[@]}" "${SERVICE_REQUIREMENTS[@]}" 2>&1 | tee "$OUT/pip.log"; then
  echo "pip could not resolve every requirement (see pip.log); installing the wheels at hand without their dependencies" | tee -a "$OUT/pip.log"
  $PYTHON -m pip install --no-deps "${INDEX[@]}" "${GPU_REQUIREMENTS[@]}" ${WHEELS:+"$WHEELS"/*.whl} 2>&1 | tee -a "$OUT/pip.log"
fi
$PYTHON -m pip list 2>/dev/null | grep -i -E "^(onnxruntime|cupy|nvidia-cu|cuda-|numpy |fastapi)" | tee "$OUT/packages.txt"
$PYTHON -c 'import onnxruntime as o, cupy; print("onnxruntime", o.__version__, o.get_available_providers(), "cupy", cupy.__version__)' | tee -a "$OUT/packages.txt"

$PYTHON -m pytest -p no:cacheprovider -q -m cuda tests/serving/pipeline/test_cuda.py 2>&1 | tee "$OUT/pytest-cuda.log"
tests=${PIPESTATUS[0]}
if [ "$tests" != 0 ]; then  # tell a failure from a warning (the suite turns warnings into errors) of this machine's libraries
  $PYTHON -m pytest -p no:cacheprovider -q -m cuda -W ignore tests/serving/pipeline/test_cuda.py 2>&1 | tail -15 | tee "$OUT/pytest-cuda-warnings-ignored.log"
fi
bench=0
if [ "${BENCH:-1}" != 0 ]; then
  $PYTHON -m uembed bench --phases gpu --out "$OUT/gpu-bench.json" "$@" 2>&1 | grep -v "it/s\]$" | tee "$OUT/bench.log"
  bench=${PIPESTATUS[0]}
fi
echo "cuda tests exit $tests, bench exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
