#!/usr/bin/env bash
# CAMELYON-17 end to end: extract -> pack -> train (seeds; NCMI and baselines) -> evaluate -> report.
#
# What you run on the real data (the 500 labelled training slides and the challenge's label file):
#   pipelines/camelyon17.sh /data/CAMELYON17/training /data/CAMELYON17/stage_labels.csv runs/c17 uni
#
#   wsi-ncmi extract SLIDES --out OUT/features --encoder ENCODER --mpp 0.5 --patch-size 256
#   wsi-ncmi pack OUT/features
#   wsi-ncmi train --config configs/train/camelyon17.yaml --labels LABELS --features OUT/features \
#                  --loss LOSS --seeds 5 --out OUT/runs/LOSS --resume           # for each LOSS
#   wsi-ncmi evaluate OUT/runs/LOSS
#   wsi-ncmi report OUT/runs/* --out OUT/report.md
#
# Every step resumes: rerun the script after a crash or a preempted job. Extraction exits non-zero
# when some slides failed (listed with reasons in OUT/features/logs); fix or drop them, then rerun.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SLIDES=${1:?slides folder}; LABELS=${2:?stage_labels.csv}; OUT=${3:-runs/camelyon17}; ENCODER=${4:-resnet50_trunc}
SEEDS=${SEEDS:-5}; LOSSES=${LOSSES:-"ncmi ce weighted_ce focal"}
wsi-ncmi extract "$SLIDES" --out "$OUT/features" --encoder "$ENCODER" --mpp 0.5 --patch-size 256
wsi-ncmi pack "$OUT/features"
for loss in $LOSSES; do
  wsi-ncmi train --config "$ROOT/configs/train/camelyon17.yaml" --labels "$LABELS" --features "$OUT/features" \
    --loss "$loss" --seeds "$SEEDS" --out "$OUT/runs/$loss" --resume
  wsi-ncmi evaluate "$OUT/runs/$loss"
done
wsi-ncmi report "$OUT"/runs/* --out "$OUT/report.md"
