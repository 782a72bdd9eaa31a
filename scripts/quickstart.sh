#!/usr/bin/env bash
# The main job on the embedded default: train the tiny-cpu baseline on the packaged tiny-shakespeare,
# evaluate it and sample from it.
# Re-running resumes or reuses the finished run in runs/quickstart.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DYNAFORMER_EXTRAS="${DYNAFORMER_EXTRAS:-plot}"  # the main job needs no test or ecosystem extras
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
RUN="${1:-runs/quickstart}"
# QUICKSTART_STEPS=N trains N steps instead of the preset's (the test suite runs this script end to end in seconds).
dynaformer train --config configs/tiny-cpu.yaml --out "$RUN" --resume auto ${QUICKSTART_STEPS:+--max_steps "$QUICKSTART_STEPS"}
dynaformer eval "$RUN" --json > "$RUN/eval.json"
echo "evaluation: $(cat "$RUN/eval.json")"
# A char tokenizer knows only the characters of its training text: "The " is in it.
dynaformer generate "$RUN" --prompt "The " --max_new_tokens 300 --seed 0 > "$RUN/sample.txt"
echo "--- sample ($RUN/sample.txt) ---"; cat "$RUN/sample.txt"; echo "---"
echo "outputs: $RUN (run.json, metrics.jsonl, step-*/ checkpoints, eval.json, sample.txt)"
