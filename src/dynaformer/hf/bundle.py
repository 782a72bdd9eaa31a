"""The model code an exported folder ships, generated from this package's own modules at export time.

`export-hf` writes `configuration_dynaformer.py` and `modeling_dynaformer.py` (hf/configuration.py and
hf/modeling.py) plus every dynaformer module they import, directly or inside functions, as flat sibling files
(`dynaformer_model_span.py` for dynaformer/model/span.py, ...). The only change to each module is its
imports: `from ..kernels import x` becomes `from .dynaformer_kernels import x`, the one form of import that
transformers' remote-code loader copies and resolves. So the shipped code is the code that trains and
evaluates, never a second copy kept by hand, and a machine with only transformers, torch and safetensors
loads the folder with `trust_remote_code=True` and computes exactly what dynaformer computes (tested in a
fresh virtual environment that cannot import dynaformer).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

PACKAGE = "dynaformer"
# Entry modules → the file names transformers' `auto_map` points at.
ENTRIES = {"dynaformer.hf.configuration": "configuration_dynaformer",
           "dynaformer.hf.modeling": "modeling_dynaformer"}
AUTO_MAP = {"AutoConfig": "configuration_dynaformer.DynaformerConfig",
            "AutoModelForCausalLM": "modeling_dynaformer.DynaformerForCausalLM"}
# Top-level packages the shipped code may import: the standard library and what the folder's users have.
ALLOWED = {"torch", "transformers", "safetensors"}


def _flat(module: str) -> str:
    return ENTRIES.get(module) or module.replace(".", "_")


def _source(module: str) -> tuple[str, bool]:
    """(source text, is a package) of one of our modules, read from the file Python would import."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"bundle: cannot find module {module}")
    return Path(spec.origin).read_text(encoding="utf-8"), spec.submodule_search_locations is not None


def _absolute(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    """The module `from ... import` names, made absolute."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a plain module
        return False


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> tuple[str, list[str]]:
    """What `node` (in `module`) imports from our package: ("names", [module]) for `from M import a, b`,
    ("modules", [M.a, M.b]) when every name is a submodule, ("", []) for any other import."""
    target = _absolute(node, module, is_pkg)
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return "", []
    subs = [f"{target}.{a.name}" for a in node.names]
    if all(_is_module(m) for m in subs):
        return "modules", subs
    return "names", [target]


def _check_import(node: ast.AST, module: str) -> None:
    """The shipped code may import only the standard library, torch, transformers and safetensors."""
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    for name in names:
        top = name.split(".")[0]
        if top and top != PACKAGE and top not in ALLOWED and top not in sys.stdlib_module_names:
            raise RuntimeError(f"bundle: {module} imports '{name}', which an exported folder cannot assume is "
                               f"installed; import it lazily (importlib) or keep it out of the model code")


def bundle_sources() -> dict[str, str]:
    """{file name: source} for every module the two entry modules need, imports rewritten to flat siblings."""
    out: dict[str, str] = {}
    todo = list(ENTRIES)
    seen = set(todo)
    while todo:
        module = todo.pop()
        text, is_pkg = _source(module)
        tree = ast.parse(text)
        lines = text.splitlines(keepends=True)
        edits = []  # (first line, last line, replacement), 1-based
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                _check_import(node, module)
            if not isinstance(node, ast.ImportFrom):
                continue
            kind, targets = _resolve(node, module, is_pkg)
            if not targets:
                _check_import(node, module)
                continue
            for t in targets:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
            indent = lines[node.lineno - 1][: node.col_offset]
            if kind == "modules":  # transformers copies only the files named in `from .module import name`
                raise RuntimeError(f"bundle: {module} imports the module(s) {', '.join(targets)} whole "
                                   f"(`from package import module`); an exported folder would lack them: "
                                   f"import names from them instead (`from .module import name`)")
            else:
                names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
                new = f"{indent}from .{_flat(targets[0])} import {names}\n"
            edits.append((node.lineno, node.end_lineno, new))
        for first, last, new in sorted(edits, reverse=True):
            lines[first - 1 : last] = [new]
        header = (f"# Generated by dynaformer export-hf from {module.replace('.', '/')}"
                  f"{'/__init__' if is_pkg else ''}.py (imports made flat); edit the package, not this file.\n")
        out[_flat(module) + ".py"] = header + "".join(lines)
    return out


def write_bundle(folder: Path) -> list[str]:
    """Write the model code into `folder`; returns the file names."""
    files = bundle_sources()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return sorted(files)
