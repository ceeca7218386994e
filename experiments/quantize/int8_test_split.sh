#!/bin/bash
# int8 export with `skinfusion export --quantize int8`'s defaults (calibrated and guarded on the manifest's val rows),
# then the fp32 and the int8 file both scored on the manifest's test split:
#   experiments/quantize/int8_test_split.sh CKPT MANIFEST OUTDIR
# Measured (benchmarks/results/int8_accuracy.md) with the CPU recipe's seed-0 checkpoint of CV fold 0 (the CV trains on
# the train+val rows only, so the test split is unseen).
set -eu
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 WANDB_MODE=disabled
CK=${1:?usage: int8_test_split.sh CKPT MANIFEST OUTDIR}; M=${2:?}; OUT=${3:?}
mkdir -p "$OUT"; cd "$OUT"
[ -f fp32.onnx ] || skinfusion export --ckpt $CK --format onnx --out fp32.onnx
skinfusion export --ckpt fp32.onnx --format onnx --quantize int8 --calibration $M --out int8.onnx || echo "refused"
for v in fp32:fp32.onnx int8:int8.onnx; do
  [ -f ${v#*:} ] && skinfusion evaluate --truth $M --split test --ckpt ${v#*:} --out eval_${v%%:*} --no-progress
done
