"""Every section reference in the code and the documents names a heading that exists.

- `benchmarks/RESULTS.md` (and `RESULTS-history.md`) is cited by section name: `RESULTS.md, "Name"`,
  `RESULTS.md "Name"`, `RESULTS.md ("Name")`, `"Name" in RESULTS.md`, several names joined by "and", or
  `RESULTS.md → Name`. "A → B" is heading B inside heading A. A name is a heading's whole text or its text up to
  ": ", " — " or " (" (headings carry a verdict or the command after the name); case and backticks do not count.
- docs/design.md is cited by number: `docs/design.md §3`, `design.md` §4, and inside design.md a bare `§8`.
- README's layout table names paths that exist, and every package and top-level module of src/dynaformer, and
  every top-level folder of the repository, is in it; the "section" column of RESULTS.md's current-results table
  names a section of that file; relative Markdown links in the documents point at files that exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HISTORY = ROOT / "benchmarks" / "RESULTS-history.md"
DESIGN = ROOT / "docs" / "design.md"
SCANNED = ("README.md", "docs", "benchmarks", "scripts", "src", "tests", ".ci")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".cpp", ".toml", ""}

_Q = r'"[^"\n]{1,200}"'
_QS = rf'{_Q}(?:\s*(?:,|and|or)\s*{_Q})*'
_FILE = r'(?P<file>RESULTS(?:-history)?)(?:\.md)?`?'
_AFTER = re.compile(rf'{_FILE},?\s*\(?\s*(?P<qs>{_QS})')
_BEFORE = re.compile(rf'(?P<qs>{_QS})\s*\)?\s*in\s+`?(?:benchmarks/)?{_FILE}')
_ARROW = re.compile(rf'{_FILE}\s*→\s*(?P<rest>[^"\n]{{1,200}})')
_DESIGN = re.compile(r'design(?:\.md)?`?\s*(?P<refs>§\s*\d+(?:\s*(?:,|and|or|–|-|to)\s*§\s*\d+)*)')


def _norm(s: str) -> str:
    return " ".join(s.replace("`", "").split()).casefold()


def _names(heading: str) -> set[str]:
    """The whole heading and each leading part that ends before ': ', ' — ' or ' ('."""
    text = " ".join(heading.replace("`", "").split())
    names = {text}
    for sep in (": ", " — ", " ("):
        i = text.find(sep)
        while i > 0:
            names.add(text[:i])
            i = text.find(sep, i + 1)
    return {_norm(n) for n in names}


def headings(path: Path) -> list[tuple[int, set[str]]]:
    """(level, names) of each Markdown heading, fenced code left out."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.+)", line)):
            out.append((len(m.group(1)), _names(m.group(2))))
    return out


def resolves(path: str, heads: list[tuple[int, set[str]]]) -> bool:
    """'A → B → C': a heading named A, a heading named B inside it, and so on."""
    parts = [_norm(p) for p in path.split("→")]
    spans = [(0, len(heads))]
    for part in parts:
        found = []
        for lo, hi in spans:
            for i in range(lo, hi):
                if part in heads[i][1]:
                    end = next((j for j in range(i + 1, hi) if heads[j][0] <= heads[i][0]), hi)
                    found.append((i + 1, end))
        if not found:
            return False
        spans = found
    return True


def _prefix_resolves(text: str, heads: list[tuple[int, set[str]]]) -> bool:
    """`RESULTS.md → Name, and the sentence goes on`: some heading's name starts the text."""
    t = _norm(text)
    return any(t.startswith(n) and (len(t) == len(n) or not t[len(n)].isalnum())
               for _, names in heads for n in names)


def _joined(text: str) -> str:
    """Lines joined into one, comment leaders dropped, so a reference wrapped over two lines is one string."""
    return re.sub(r"[ \t]*\n[ \t]*(?:#+|//|\*)?[ \t]*", " ", text)


def dangling(text: str, heads: dict[str, list], design_sections: set[int], *, in_design: bool = False) -> list[str]:
    """The references in `text` that name no heading."""
    text = _joined(text)
    bad = []
    for rx in (_AFTER, _BEFORE):
        for m in rx.finditer(text):
            for q in re.findall(_Q, m.group("qs")):
                if not resolves(q[1:-1], heads[m.group("file")]):
                    bad.append(f"{m.group('file')}.md, {q}")
    for m in _ARROW.finditer(text):
        if not _prefix_resolves(m.group("rest"), heads[m.group("file")]):
            bad.append(f"{m.group('file')}.md → {re.split(r'[;,.)]', m.group('rest'))[0]}")
    cited = [int(n) for m in _DESIGN.finditer(text) for n in re.findall(r"§\s*(\d+)", m.group("refs"))]
    if in_design:
        cited += [int(n) for n in re.findall(r"§\s*(\d+)", text)]
    bad += [f"design.md §{n}" for n in cited if n not in design_sections]
    return bad


def _design_sections() -> set[int]:
    return {int(n) for n in re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.M)}


def _scanned_files() -> list[Path]:
    files = []
    for top in SCANNED:
        p = ROOT / top
        cands = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        files += [q for q in cands if q.suffix in SUFFIXES and "__pycache__" not in q.parts
                  and not any(part.endswith(".egg-info") for part in q.parts)  # a build's copy of the README
                  and q.resolve() != Path(__file__).resolve()]
    return files


def test_every_section_reference_resolves():
    heads = {"RESULTS": headings(RESULTS), "RESULTS-history": headings(HISTORY)}
    sections = _design_sections()
    found = {}
    for f in _scanned_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        bad = dangling(text, heads, sections, in_design=f == DESIGN)
        if bad:
            found[str(f.relative_to(ROOT))] = bad
    assert not found, f"references to sections that do not exist: {found}"


def test_references_are_found_and_checked():
    """The checker sees each style in use, and a name that is no heading is reported."""
    heads = {"RESULTS": [(2, _names("Span attention")), (3, _names("Attention forward and backward")),
                         (2, _names("The main study at 128 tokens")), (3, _names("Cost at long lengths"))],
             "RESULTS-history": [(2, _names("Training speed"))]}
    ok = ('(benchmarks/RESULTS.md, "Span attention") "Cost at long lengths" in RESULTS.md\n'
          '# (RESULTS.md, "The main study at 128 tokens →\n# Cost at long lengths") RESULTS-history.md "training'
          ' speed" RESULTS.md → Span attention, below. docs/design.md §2 and §3')
    assert dangling(ok, heads, {2, 3}) == []
    bad = ('RESULTS.md, "Span attention" and "Main experiment → Cost"; "Span attention → Cost at long lengths" in'
           ' RESULTS.md; RESULTS.md → Speed of spans; `docs/design.md` §4')
    assert dangling(bad, heads, {2, 3}) == ['RESULTS.md, "Main experiment → Cost"',
                                            'RESULTS.md, "Span attention → Cost at long lengths"',
                                            "RESULTS.md → Speed of spans", "design.md §4"]
    assert dangling("see §7 and §2", heads, {2, 3}, in_design=True) == ["design.md §7"]


def test_the_long_context_study_has_its_section():
    assert any(level == 2 and "the long-context study" in names for level, names in headings(RESULTS))


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split(" | ")] for r in rows[2:]]


def test_the_current_results_name_their_sections():
    text = RESULTS.read_text()
    heads = headings(RESULTS)
    rows = _table(text, "## Current results")
    assert len(rows) >= 10
    assert [r[-1] for r in rows if not resolves(r[-1], heads)] == []


def test_readme_layout_matches_the_tree():
    rows = _table((ROOT / "README.md").read_text(), "## Layout")
    named = set()
    for row in rows:
        paths = re.findall(r"`([^`]+)`", row[0])
        base = Path(paths[0]).parent
        for p in paths:
            full = Path(p.rstrip("/")) if "/" in p.rstrip("/") or p == paths[0] else base / p
            assert (ROOT / full).exists(), f"README's layout names {full}, which does not exist"
            named.add(full.as_posix())
    pkg = ROOT / "src" / "dynaformer"
    wanted = {f"src/dynaformer/{p.name}" for p in pkg.iterdir()
              if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    wanted.add("src/dynaformer/configs")
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the top-level folders cannot be listed")
    wanted |= {p.split("/")[0] for p in tracked.splitlines() if "/" in p and not p.startswith("src/")}
    named |= {n.split("/")[0] for n in named}  # a folder is in the table when it or a path inside it is
    missing = sorted(w for w in wanted if w not in named)
    assert not missing, f"README's layout table leaves out {missing}"


def test_markdown_links_point_at_files():
    docs = [ROOT / "README.md", RESULTS, HISTORY, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for d in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", d.read_text()):
            if "://" not in target and not (d.parent / target).exists():
                broken.append(f"{d.relative_to(ROOT)}: {target}")
    assert not broken
