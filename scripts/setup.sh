#!/usr/bin/env bash
# Create (or reuse) .venv with torch (CPU wheel) and dynaformer installed in editable mode.
# Sourced by the other scripts; safe to run any number of times.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DYNAFORMER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
# The optional integrations (transformers, lm-eval, TensorBoard) are installed by default so their tests run;
# DYNAFORMER_EXTRAS=test gives a lean environment in which those tests are skipped with the reason.
EXTRAS="${DYNAFORMER_EXTRAS:-test,hf,eval,tensorboard,data,onnx,serve}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.dynaformer-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$EXTRAS"
# DYNAFORMER_NO_INSTALL=1 uses the environment as it is (tests that run the scripts from a temporary clone must
# never repoint the shared environment's editable install at that clone).
if [ "${DYNAFORMER_NO_INSTALL:-0}" = 1 ]; then
  "$VENV/bin/python" -c "import dynaformer" || { echo "setup: DYNAFORMER_NO_INSTALL=1 but $VENV has no dynaformer" >&2; exit 1; }
elif [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first: the pinned CPU wheel satisfies `torch>=2.5`, so no multi-GB CUDA build is pulled in.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch (CPU)" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  fi
  echo "setup: installing dynaformer[$EXTRAS]" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import dynaformer, torch" || { echo "setup: installation failed" >&2; exit 1; }
  for pair in hf:transformers hf:tokenizers eval:lm_eval tensorboard:tensorboard data:pyarrow data:datasets onnx:onnxscript onnx:onnxruntime serve:uvicorn serve:starlette; do
    case ",$EXTRAS," in *",${pair%%:*},"*)
      "$VENV/bin/python" -c "import ${pair#*:}" 2>/dev/null \
        || { echo "setup: extra [${pair%%:*}] did not install (${pair#*:} missing)" >&2; exit 1; } ;;
    esac
  done
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# The compiled band kernel builds once per machine (≈ 1 min); without a compiler the Python kernel runs.
"$VENV/bin/python" -c "
from dynaformer.kernels import band_native
if not band_native.available():
    print(f'setup: compiled band kernel unavailable ({band_native.unavailable_reason()}); using the Python one')
" >&2
