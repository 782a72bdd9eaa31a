#!/usr/bin/env bash
# The main experiment: train the grid (variants, their controls × seeds) on the generated long-range tasks
# mixed with text (the packaged tiny-shakespeare), then write the report with the verdicts
# (report.md, report.html, report.json), timing every trained model at long lengths for the cost verdicts.
#   bash scripts/experiment.sh                      # configs/grid-cpu.yaml → runs/experiment (≤ 20 min, 2 cores)
#   bash scripts/experiment.sh --long               # configs/grid-cpu-long.yaml → runs/experiment-long: the
#                                                   #   questions at 1,024 tokens (≤ 2 h on 2 cores)
#   bash scripts/experiment.sh --relatives          # configs/grid-cpu-relatives.yaml → runs/experiment: the
#                                                   #   main grid plus 7 relatives of the two mechanisms (adds
#                                                   #   21 cells to the main job's folder)
#   bash scripts/experiment.sh --full               # configs/grid-cpu-full.yaml → runs/experiment-full (more
#                                                   #   seeds, longer runs, ablations, the encoder study)
#   bash scripts/experiment.sh configs/grid-gpu.yaml runs/experiment-gpu
# Rerun the same command to resume a killed grid.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DYNAFORMER_EXTRAS="${DYNAFORMER_EXTRAS:-plot}"  # no test or ecosystem extras needed
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
if [ "${1:-}" = "--full" ]; then
  GRID=configs/grid-cpu-full.yaml
  OUT="${2:-runs/experiment-full}"
elif [ "${1:-}" = "--relatives" ]; then
  GRID=configs/grid-cpu-relatives.yaml
  OUT="${2:-runs/experiment}"
elif [ "${1:-}" = "--long" ]; then
  GRID=configs/grid-cpu-long.yaml
  OUT="${2:-runs/experiment-long}"
else
  GRID="${1:-configs/grid-cpu.yaml}"
  OUT="${2:-runs/experiment}"
fi
WORKERS="${WORKERS:-2}"
export DYNAFORMER_STUDY_COMMAND="bash scripts/experiment.sh${*:+ $*}"  # recorded in report.json
start=$(date +%s)
dynaformer compare "$GRID" --out "$OUT" --workers "$WORKERS"
dynaformer report "$OUT" --out "$OUT/report"
echo "experiment: $(( $(date +%s) - start )) s; open $OUT/report/report.html (Markdown: $OUT/report/report.md, data: $OUT/report/report.json)"
