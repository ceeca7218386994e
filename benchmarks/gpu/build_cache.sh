#!/usr/bin/env bash
# Build the small real-data cache that travels to the GPU machine: `skinfusion prepare` of the ISIC 2018 pool at
# SIZE px (shorter side) into .gpu-prepared/ (kept for incremental re-runs, not carried), then a lesion-grouped
# subset within BUDGET_MIB into .gpu-cache/ (carried), then the carried total against the 64 MiB limit.
#   benchmarks/gpu/build_cache.sh [POOL]     # POOL: default $SKINFUSION_DATA/isic2018, else ../shared/data/isic2018
#   SIZE=128 BUDGET_MIB=30 benchmarks/gpu/build_cache.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
POOL=${1:-${SKINFUSION_DATA:-../shared/data}/isic2018}
SIZE=${SIZE:-128}
BUDGET_MIB=${BUDGET_MIB:-30}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m skinfusion prepare --source "isic_task1:$POOL" \
  --source "diagnosis_csv:$POOL/ISIC2018_Task1_Training_Diagnosis.csv" --source "isic_task3:$POOL" \
  --out ".gpu-prepared/isic2018-$SIZE" --size "$SIZE" --workers 2 --no-progress
"$PY" benchmarks/gpu/subset_cache.py ".gpu-prepared/isic2018-$SIZE" .gpu-cache --budget-mib "$BUDGET_MIB"
benchmarks/gpu/carried_size.sh
