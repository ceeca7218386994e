#!/usr/bin/env bash
# Runs every README command, as written (keep it in step with README.md), on a small copy of the real data (a few images), with only
# size/length overrides appended (--trainer.max_steps, --data.image_size, test_resnet where ImageNet weights
# would be downloaded). Usage: docs/check_readme_commands.sh REPO DATA  (DATA holds isic2018/; about 3 min)
set -euo pipefail
REPO=$(cd "$1" && pwd); DATA=$(cd "$2" && pwd); W=$(mktemp -d /tmp/readme.XXXX); cd "$W"; echo "workdir $W"
ok() { echo "OK  $*"; }
# A small DATA/isic2018 in the official layout: 24 Task 1 pairs, 40 Task 3 images (CSV rows filtered).
S=DATA/isic2018; mkdir -p $S/ISIC2018_Task1-2_Training_Input $S/ISIC2018_Task1_Training_GroundTruth $S/ISIC2018_Task3_Training_Input
for f in $(ls $DATA/isic2018/ISIC2018_Task1-2_Training_Input | grep jpg | head -24); do id=${f%.jpg}
  ln -s $DATA/isic2018/ISIC2018_Task1-2_Training_Input/$f $S/ISIC2018_Task1-2_Training_Input/
  ln -s $DATA/isic2018/ISIC2018_Task1_Training_GroundTruth/${id}_segmentation.png $S/ISIC2018_Task1_Training_GroundTruth/; done
ids=$(python - "$DATA" <<'PY'
import csv,sys,collections
rows=list(csv.DictReader(open(sys.argv[1]+'/isic2018/ISIC2018_Task3_Training_GroundTruth.csv')))
cls=[k for k in rows[0] if k!='image']; picked=collections.defaultdict(list)
for r in rows:
    c=max(cls,key=lambda k: float(r[k]))
    if len(picked[c])<6: picked[c].append(r['image'])
print(' '.join(i for v in picked.values() for i in v))
PY
)
head -1 $DATA/isic2018/ISIC2018_Task3_Training_GroundTruth.csv > $S/ISIC2018_Task3_Training_GroundTruth.csv
head -1 $DATA/isic2018/HAM10000_metadata.csv > $S/HAM10000_metadata.csv
for id in $ids; do ln -s $DATA/isic2018/ISIC2018_Task3_Training_Input/$id.jpg $S/ISIC2018_Task3_Training_Input/
  grep "^$id," $DATA/isic2018/ISIC2018_Task3_Training_GroundTruth.csv >> $S/ISIC2018_Task3_Training_GroundTruth.csv
  grep ",$id," $DATA/isic2018/HAM10000_metadata.csv >> $S/HAM10000_metadata.csv || true; done
head -1 $DATA/isic2018/ISIC2018_Task1_Training_Diagnosis.csv > $S/ISIC2018_Task1_Training_Diagnosis.csv
for f in $S/ISIC2018_Task1-2_Training_Input/*.jpg; do id=$(basename ${f%.jpg}); grep "^$id," $DATA/isic2018/ISIC2018_Task1_Training_Diagnosis.csv >> $S/ISIC2018_Task1_Training_Diagnosis.csv || true; done
ln -s $REPO/experiments experiments
SMALL=(--trainer.max_steps 3 --trainer.max_epochs 1 --data.image_size 64 --data.batch_size 4 --data.num_workers 0)
SCRATCH=(--model.net.init_args.encoder test_resnet --model.net.init_args.pretrained false --model.net.init_args.decoder_channels "[16,16,8,8,8]")

skinfusion prepare \
  --source isic_task1:DATA/isic2018 \
  --source diagnosis_csv:DATA/isic2018/ISIC2018_Task1_Training_Diagnosis.csv \
  --source isic_task3:DATA/isic2018 \
  --out isic2018-cache --size 256 --workers 2 && ok prepare
skinfusion fit --config experiments/base.yaml --print_config > /dev/null && ok print_config
skinfusion fit --config experiments/base.yaml --config experiments/paper/paper.yaml --config experiments/paper/full.yaml \
  --data.manifest isic2018-cache/manifest.csv "${SMALL[@]}" "${SCRATCH[@]}" && ok fit paper full
rm -rf runs
skinfusion fit --config experiments/base.yaml --config experiments/paper/paper.yaml --config experiments/paper/full.yaml \
  --config experiments/paper/cpu.yaml --data.manifest isic2018-cache/manifest.csv "${SMALL[@]}" && ok fit recipe
CKPT=runs/skinfusion/version_0/checkpoints/last.ckpt
skinfusion validate --config experiments/base.yaml --config experiments/paper/paper.yaml --config experiments/paper/full.yaml \
  --config experiments/paper/cpu.yaml --data.manifest isic2018-cache/manifest.csv --data.image_size 64 --data.num_workers 0 --ckpt_path $CKPT && ok validate
skinfusion evaluate --truth isic2018-cache/manifest.csv --split test --ckpt $CKPT --out report && ok evaluate test
skinfusion evaluate --ckpt $CKPT --truth isic2018-cache/manifest.csv --split val --explain --out report-explain && test -f report-explain/explain.md && ok evaluate explain
IMG=$(ls DATA/isic2018/ISIC2018_Task1-2_Training_Input/*.jpg | head -1)
skinfusion predict $IMG --ckpt $CKPT --out pred --overlays && ok predict
skinfusion predict DATA/isic2018/ISIC2018_Task1-2_Training_Input --ckpt $CKPT --out pred2 --json --explain gradcam --tta && ok predict explain tta
for fmt in onnx torchscript safetensors; do skinfusion export --ckpt $CKPT --format $fmt --out model.$fmt && ok export $fmt; done
skinfusion export --ckpt $CKPT --format hf --out hf --metrics report/metrics.json && skinfusion predict $IMG --ckpt hf --out pred-hf && ok export hf + predict
python $REPO/benchmarks/study_real_data.py --ckpt $CKPT --manifest isic2018-cache/manifest.csv --split val > /dev/null && ok study_real_data
skinfusion study --config experiments/base.yaml --config experiments/paper/paper.yaml --config experiments/paper/cpu.yaml \
  --variant experiments/paper/baseline.yaml --variant experiments/paper/full.yaml \
  --seeds 0 --max-steps 2 --cv-folds 2 --jobs 2 --out study --work study-work -- \
  --data.manifest=isic2018-cache/manifest.csv --data.image_size 64 --trainer.max_time=null && ok study
skinfusion --help > /dev/null && skinfusion demo --help > /dev/null && ok help
echo ALL-OK
