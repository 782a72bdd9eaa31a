#!/usr/bin/env bash
# The main experiment: train the grid (variants × seeds) on the generated long-range suite mixed with
# text (tiny-shakespeare when ../shared/data has it) and write the report with the verdict table.
#   bash scripts/experiment.sh                      # configs/grid-cpu.yaml → runs/experiment (≤ 15 min, 2 cores)
#   bash scripts/experiment.sh configs/grid-gpu.yaml runs/experiment-gpu
# Rerun the same command to resume a killed grid. Variants whose mechanism this build lacks are skipped
# and listed in the report.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DYNAFORMER_EXTRAS="${DYNAFORMER_EXTRAS:-plot}"  # no test or ecosystem extras needed
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
GRID="${1:-configs/grid-cpu.yaml}"
OUT="${2:-runs/experiment}"
WORKERS="${WORKERS:-2}"
dynaformer compare "$GRID" --out "$OUT" --workers "$WORKERS" --skip_invalid
dynaformer report "$OUT" --out "$OUT/report"
echo "open $OUT/report/report.html (Markdown: $OUT/report/report.md)"
