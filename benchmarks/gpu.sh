#!/usr/bin/env bash
# The device run of issue 10, one prepared command (about 6 minutes on an H100/H200):
#   1. installs bitsandbytes (and platformdirs, absent from the GPU image) from wheels carried with
#      the tree in benchmarks/wheels/ (the GPU machine reaches no package index; fetch them here
#      with benchmarks/fetch_wheels.sh);
#   2. runs the CUDA test subset (tests/test_cuda.py: engine on CUDA against CPU fp32 on the
#      conformance fixtures, NF4 and int8, M+ with its long-term memory, pinned host pools,
#      the compiled decode step);
#   3. runs benchmarks/bench_gpu.py: random weights with the published 8B shapes made on the GPU,
#      8b-chat NF4, 8b-chat bf16, mplus-8b NF4; prints JSON and writes it to --out.
#
#   benchmarks/gpu.sh                      # CUDA
#   benchmarks/gpu.sh --device cpu         # dry run (2 layers, width 1024), what the test runs
#
# The fixtures are read from $MEMCLI_CONFORMANCE_DIR, else ./shared/conformance, else
# ../shared/conformance. With the device tool, carry benchmarks/wheels and shared (a copy of the
# fixtures inside the checkout): a folder beside the checkout does not travel.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
RESULT=""  # not OUT: the device tool sets $OUT to the folder whose files come back
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) RESULT="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${MEMCLI_CONFORMANCE_DIR:-}" ]; then
  for d in shared/conformance ../shared/conformance; do
    if [ -d "$d" ]; then export MEMCLI_CONFORMANCE_DIR="$PWD/$d"; break; fi
  done
fi
export MEMCLI_HOME="${MEMCLI_HOME:-$(mktemp -d)}"
if [ "$DEVICE" = cuda ]; then
  if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" benchmarks/wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
  fi
  "$PY" -c "import bitsandbytes, torch; assert torch.cuda.is_available(); print('bitsandbytes', bitsandbytes.__version__, 'on', torch.cuda.get_device_name(0))"
  NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
  RESULT=${RESULT:-benchmarks/results/gpu-$NAME.json}
  TESTS_RC=0  # a failing test does not cost the run its numbers; the script still fails at the end
  timeout 170 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py > /tmp/memcli-cuda-tests.log 2>&1 || TESTS_RC=$?
  tail -25 /tmp/memcli-cuda-tests.log
  BENCH_RC=0
  timeout 330 "$PY" benchmarks/bench_gpu.py --device cuda --compile \
    --variants 8b-chat-nf4,8b-chat-bf16,mplus-8b-nf4,8b-chat-int8 --out "$RESULT" || BENCH_RC=$?
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    cp /tmp/memcli-cuda-tests.log "$OUT/" || true
    cp "$RESULT" "$OUT/" 2>/dev/null || true
  fi
  echo "gpu.sh: tests exit $TESTS_RC, benchmark exit $BENCH_RC"
  [ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
else
  RESULT=${RESULT:-$(mktemp -d)/gpu-dry-run.json}
  "$PY" benchmarks/bench_gpu.py --device cpu --out "$RESULT"
fi
