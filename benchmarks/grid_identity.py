"""Are two commits' grid results bit-identical? Runs the tiny fixture grid (tests/fixtures/grid-tiny.yaml)
and its report at each commit, from a `git worktree` of that commit, and compares every number of each cell's
result.json and of report.json, floats bit for bit, leaving out only what measures time or names the machine.

    python benchmarks/grid_identity.py 3c2609d HEAD [--work /tmp/grid-identity] [--reuse]

Exit 0 when identical, 1 with the differing paths listed. The report runs with --no_cost (the long-length cost
is a timing); a commit's outputs are kept under WORK/SHA and, with --reuse, not recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "tests" / "fixtures" / "grid-tiny.yaml"
# Timings, their derived means and the machine's name differ between any two runs, even of one commit.
VOLATILE = {"elapsed_s", "ms_step", "tok_s", "peak_memory", "peak_memory_kind", "host", "created", "ms_step_sd",
            "run_dir",  # run_dir: the output folder differs by construction
            # provenance names the commits and sums the cells' times; without the cost step (--no_cost) the
            # equal-time reading runs on the logs' clock, so its t* and the steps read at it are timings too
            "provenance", "wall_clock"}


def sha(rev: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True, capture_output=True,
                          text=True).stdout.strip()


def run_commit(rev: str, work: Path, reuse: bool) -> Path:
    """compare + report of the fixture grid at commit `rev`; returns the compare folder."""
    out = work / rev[:12]
    if reuse and (out / "report" / "report.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    tree = work / f"tree-{rev[:12]}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "dynaformer.cli"]
    # The commit's own copy of the grid, so each side runs the grid as it was then (the fixture is unchanged).
    grid = tree / GRID.relative_to(ROOT)
    for argv in (["compare", str(grid), "--out", str(out), "--workers", "1"],
                 ["report", str(out), "--out", str(out / "report"), "--no_cost"]):
        p = subprocess.run(cli + argv, env=env, cwd=work, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{rev[:12]}: {' '.join(argv[:1])} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return out


def diff(a, b, path: str = "") -> list[str]:
    """Paths where a and b differ; floats compare by their exact value (JSON keeps every bit of a double)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in VOLATILE:
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'second' if k not in a else 'first'}")
            else:
                out += diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if (a == b and type(a) is type(b)) else [f"{path}: {a!r} vs {b!r}"]


def compare_outputs(first: Path, second: Path) -> tuple[int, dict[str, list[str]]]:
    """Differences per compared file (each cell's result.json, then report.json)."""
    files = sorted(p.relative_to(first) for p in first.glob("cells/*/seed*/result.json"))
    files.append(Path("report") / "report.json")
    problems: dict[str, list[str]] = {}
    for rel in files:
        if not (second / rel).exists():
            problems[str(rel)] = ["missing in the second"]
            continue
        a, b = (json.loads((d / rel).read_text()) for d in (first, second))
        if found := diff(a, b):
            problems[str(rel)] = found
    return len(files), problems


def largest_relative(lines: list[str]) -> float:
    """The largest |a − b| / |a| among the differing numbers of `diff` lines."""
    worst = 0.0
    for ln in lines:
        try:
            a, b = (float(x) for x in ln.rsplit(": ", 1)[1].split(" vs "))
        except ValueError:
            continue
        worst = max(worst, abs(a - b) / abs(a) if a else abs(b))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--work", default="/tmp/grid-identity")
    ap.add_argument("--reuse", action="store_true", help="keep a commit's outputs from an earlier run")
    ap.add_argument("--all", action="store_true", help="print every difference, not the first three per file")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    revs = [sha(args.first), sha(args.second)]
    outs = [run_commit(r, work, args.reuse) for r in revs]
    n, problems = compare_outputs(*outs)
    n_values = 0
    for rel, lines in problems.items():
        # A key on one side only is a config field one commit has and the other lacks, not a changed number.
        keys = [ln.split(":")[0] for ln in lines if ": only in " in ln]
        values = [ln for ln in lines if ": only in " not in ln]
        n_values += len(values)
        print(f"{rel}: " + (f"{len(values)} values differ, largest relative {largest_relative(values):.2g}"
                            if values else "every value bit-identical")
              + (f"; keys on one side only: {', '.join(keys)}" if keys else ""))
        for ln in values if args.all else values[:3]:
            print(f"    {ln}")
    same = n - sum(1 for lines in problems.values() if any(": only in " not in ln for ln in lines))
    print(f"{revs[0][:12]} vs {revs[1][:12]}: {n} files, {same} with every value bit-identical"
          + (f", {n - same} with {n_values} values that differ" if n_values else "")
          + " (timings, host and paths left out)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
