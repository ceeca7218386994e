#!/usr/bin/env bash
# The GPU kit, one call: benchmarks/gpu/run.sh OUTDIR [--smoke]          (benchmarks/gpu/README.md)
#
# On the H100 / H200 machine: installs the carried wheels (.whl/) into $KIT_SITE, then runs kit.py's steps within 8
# minutes, each writing into OUTDIR as soon as it has a result: log.txt (this log), env.txt, tests.txt, results.md,
# results.jsonl, realdata.txt (6 files; the device returns at most 8). --smoke: the same steps on the CPU with a
# tiny network at 32 px, no wheels (CI: tests/test_gpu_kit.py). Exit status 0 when every step finished.
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUTDIR [--smoke]" >&2
  exit 2
fi
OUT=$1
shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
SITE=${KIT_SITE:-/tmp/skinfusion-gpu-site}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
export KIT_START=${KIT_START:-$(date +%s)}
export PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 MPLBACKEND=Agg
PYTHONPATH="$REPO"
smoke=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done
if [ "$smoke" = 0 ] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  # The device documentation's install line; --no-deps: fetch_wheels.sh checked the requirements here.
  echo "[kit] installing $(ls "$REPO"/.whl/*.whl | wc -l) wheels into $SITE" | tee -a "$OUT/log.txt"
  started=$(date +%s)
  timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$REPO"/.whl/*.whl >>"$OUT/log.txt" 2>&1
  status=$?
  echo "[kit] wheels: exit status $status in $(($(date +%s) - started)) s" | tee -a "$OUT/log.txt"
  [ "$status" = 0 ] && PYTHONPATH="$REPO:$SITE"
elif [ "$smoke" = 0 ]; then
  echo "[kit] no wheels in $REPO/.whl (benchmarks/gpu/fetch_wheels.sh): using what is installed" | tee -a "$OUT/log.txt"
fi
export PYTHONPATH
cd "$REPO" || exit 2
"$PY" -u benchmarks/gpu/kit.py "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
