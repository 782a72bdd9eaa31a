#!/usr/bin/env bash
# The test command: sets up .venv if needed, lints, runs the test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
ruff check src tests benchmarks
python -m pytest "$@"
