"""lm-evaluation-harness integration (optional extra: `pip install 'dynaformer[eval]'`), beside `hf/`: a native
lm-eval model over a run folder (`adapter.py`, registered as `dynaformer`), and offline tasks (`tasks/`).

Importing this package needs nothing extra; `adapter` needs lm-eval. It sits above `runs.py`, which loads the run
it evaluates (docs/design.md §1)."""
