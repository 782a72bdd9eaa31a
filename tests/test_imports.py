"""Imports run one way (docs/design.md §1): no dynaformer module imports, at module level, a module that imports
it back, and the packages and top-level modules form no cycle either. Between packages, function-local imports
count too: a lazy import (the command line importing a verb's modules when it runs) only ever reaches down, and
every import follows the layers of the design's table. ruff has no rule for import cycles, so this walks the
source with `ast`.

Also: the presets ship inside the package, so a non-editable install finds them."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "dynaformer"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, modules: set[str], src: Path = SRC, lazy: bool = False) -> set[str]:
    """The dynaformer modules `path` imports when it is imported: statements outside functions and classes'
    methods, and outside `if TYPE_CHECKING:`. `from X import a` names X.a where that is a module (X's __init__
    need not have finished: `from . import sub` inside a package is no cycle), and X itself for anything else.
    lazy=True: also the imports inside functions and methods (those that run when they are called)."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = {f"{target}.{a.name}" for a in node.names} & modules
                out.update(subs)
                if len(subs) < len(node.names):  # an attribute of X: X's __init__ must have run
                    out.add(target)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
            elif isinstance(node, ast.With):
                visit(node.body)
            elif isinstance(node, ast.ClassDef):  # a class body runs at import; its methods do not
                visit([s for s in node.body if lazy or not isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef)])
            elif lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(node.body)
            elif isinstance(node, ast.For | ast.AsyncFor | ast.While | ast.AsyncWith):
                visit(node.body + getattr(node, "orelse", []))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in out if m in modules and m != name}


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: module_level_imports(p, set(files), lazy=lazy) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node, or with a self-loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def unit(module: str) -> str:
    """The package or top-level module a module belongs to: dynaformer.eval.text → eval, dynaformer.cli → cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dynaformer"


def test_walker_sees_cycles_and_ignores_function_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    src = tmp_path / "dynaformer" / "x.py"
    src.parent.mkdir()
    src.write_text("from .y import f\nimport dynaformer.z\nfrom . import s\nfrom typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from . import w\n"
                   "def g():\n    from . import v\n"
                   "class C:\n    from .u import k\n    def m(self):\n        from . import t\n")
    mods = {"dynaformer", "dynaformer.y", "dynaformer.z", "dynaformer.w", "dynaformer.v", "dynaformer.u",
            "dynaformer.t", "dynaformer.s"}
    assert module_level_imports(src, mods, tmp_path) == {"dynaformer.y", "dynaformer.z", "dynaformer.s",
                                                         "dynaformer.u"}
    assert module_level_imports(src, mods, tmp_path, lazy=True) == {"dynaformer.y", "dynaformer.z", "dynaformer.s",
                                                                    "dynaformer.u", "dynaformer.v", "dynaformer.t"}


def test_no_module_is_in_an_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "dynaformer.cli" in graph
    assert cycles(graph) == []


def unit_graph(lazy: bool) -> dict[str, set[str]]:
    graph = import_graph(lazy)
    units: dict[str, set[str]] = {}
    for m, deps in graph.items():
        units.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    return units


def test_packages_import_one_way():
    """Package level: eval/ measures models and is used by train/ (evaluation while training); runs.py,
    above both, loads checkpoints for eval, generate, diagnostics and fine-tuning's backbone; the study uses
    timing.py, not bench/."""
    units = unit_graph(lazy=False)
    units.pop("dynaformer", None)  # the package's own __init__ re-exports the model
    assert cycles(units) == []
    assert "train" not in units["eval"] and "eval" in units["train"]
    assert "bench" not in units["study"] and "cli" not in units["bench"]


# The layers of docs/design.md §1, lowest first: a package or top-level module imports (at module level or
# inside a function) only from layers below its own.
LAYERS = [{"errors"}, {"extras", "timing", "plotting", "configtools", "resources", "locks"}, {"files"},
          {"kernels", "data"}, {"model"}, {"eval"}, {"train"}, {"runs", "presets", "nn"},
          {"hf", "lmeval", "deploy"}, {"serve"}, {"study", "bench"}, {"cli"}, {"entry"}]


def test_no_import_runs_upward_function_local_included():
    units = unit_graph(lazy=True)
    # the package's __init__ re-exports the model (and `__version__`, which train/ and cli.py read)
    assert units.pop("dynaformer") == {"model"}
    assert cycles({u: deps - {"dynaformer"} for u, deps in units.items()}) == []
    rank = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    assert set(rank) == set(units), "a new package or top-level module: give it its layer here and in design §1"
    upward = sorted(f"{u} → {d}" for u, deps in units.items() for d in deps - {"dynaformer"} if rank[d] >= rank[u])
    assert upward == []


def test_importing_the_cli_loads_no_cycle():
    """What `python -c "import dynaformer.cli"` loads is acyclic, and it loads no torch-free part of the
    study, the benchmarks or the run loader (the verbs import those when they run)."""
    code = "import sys, dynaformer.cli; print('\\n'.join(m for m in sys.modules if m.startswith('dynaformer')))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                env={"PYTHONPATH": str(SRC), "PATH": ""}).stdout.split())
    graph = import_graph()
    sub = {m: graph[m] & loaded for m in loaded if m in graph}
    assert cycles(sub) == []
    assert not any(m.startswith(("dynaformer.study", "dynaformer.bench")) or m == "dynaformer.runs" for m in loaded)


def test_presets_ship_in_a_wheel(tmp_path):
    """A wheel built from the source holds every preset, and `preset()` finds them from the installed copy."""
    import shutil

    root = SRC.parent
    build = tmp_path / "src-copy"
    shutil.copytree(SRC / "dynaformer", build / "src" / "dynaformer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(root / f, build / f)
    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(wheels), str(build)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {res.stderr.strip().splitlines()[-1:]}")
    (wheel,) = wheels.glob("dynaformer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (PKG / "configs").glob("*.yaml")}
    assert shipped >= {"tiny-cpu.yaml", "small.yaml", "grid-cpu.yaml"}
    assert {f"dynaformer/configs/{n}" for n in shipped} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from dynaformer.presets import PRESET_DIR, preset; c = preset('tiny-cpu'); "
            "print(PRESET_DIR, c.n_layer, c.d_model)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": ""}).stdout.split()
    assert Path(out[0]).is_relative_to(site) and out[1:] == ["4", "128"]
