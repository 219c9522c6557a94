#!/usr/bin/env bash
# BRACS end to end (7 classes; TASK=bracs3 for benign/atypical/malignant):
#   pipelines/bracs.sh /data/BRACS/BRACS_WSI runs/bracs uni
#
#   wsi-ncmi extract BRACS_WSI --out OUT/features --encoder ENCODER --mpp 0.5 --patch-size 256
#   wsi-ncmi pack OUT/features
#   wsi-ncmi train --config configs/train/bracs.yaml --task bracs --slides BRACS_WSI --features OUT/features \
#                  --loss LOSS --seeds 5 --out OUT/runs/LOSS --resume           # for each LOSS
#   wsi-ncmi evaluate OUT/runs/LOSS
#   wsi-ncmi report OUT/runs/* --out OUT/report.md
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SLIDES=${1:?BRACS_WSI folder}; OUT=${2:-runs/bracs}; ENCODER=${3:-resnet50_trunc}
SEEDS=${SEEDS:-5}; LOSSES=${LOSSES:-"ncmi ce weighted_ce focal"}; TASK=${TASK:-bracs}
wsi-ncmi extract "$SLIDES" --out "$OUT/features" --encoder "$ENCODER" --mpp 0.5 --patch-size 256
wsi-ncmi pack "$OUT/features"
for loss in $LOSSES; do
  wsi-ncmi train --config "$ROOT/configs/train/bracs.yaml" --task "$TASK" --slides "$SLIDES" \
    --features "$OUT/features" --loss "$loss" --seeds "$SEEDS" --out "$OUT/runs/$loss" --resume
  wsi-ncmi evaluate "$OUT/runs/$loss"
done
wsi-ncmi report "$OUT"/runs/* --out "$OUT/report.md"
