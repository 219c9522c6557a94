#!/usr/bin/env bash
# The built-in demo: a CAMELYON-17-like cohort of real-H&E pyramidal TIFFs with implanted lesions,
# extracted with the bundled offline encoder and trained with NCMI and CE; CPU, a few minutes.
#   pipelines/demo.sh [OUT]
# It is the same as:
#   wsi-ncmi demo --out OUT
# which chains: build slides -> wsi-ncmi extract -> wsi-ncmi train (ncmi, ce; 3 seeds) ->
# wsi-ncmi heatmap -> OUT/report.md. Rerunning reuses everything already done.
set -euo pipefail
wsi-ncmi demo --out "${1:-wsi-ncmi-demo}"
