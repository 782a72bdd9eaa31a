"""The compiled CPU band kernel (csrc/band_span.cpp), built on first use with torch's C++ extension loader.

It is optional: `available()` is False where no C++ compiler is found (or the build fails; the reason is
kept in `unavailable_reason()`), and callers fall back to the Python band kernel (kernels/band.py), which
computes the same function. The build is cached per source, CPU, torch installation and checkout under torch's
extension folder (TORCH_EXTENSIONS_DIR), so it runs once per machine, environment and checkout (≈ 15 s). Two
processes that build it at once wait on torch's lock file in the build folder (one builds, the other loads the
result). DYNAFORMER_NATIVE=0 disables it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "band_span.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None


def _build_name() -> str:
    """One build per source text, CPU kind, torch installation and checkout: -march=native code must not meet
    another CPU, and the build command names the torch headers' folder and the source file's path, so two
    environments or two checkouts sharing one build folder would rebuild it in turn (≈ 15 s each time, while
    the other may be loading it)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{platform.machine()} {_cpu_model()} {torch.__version__} {Path(torch.__file__).parent} "
             f"{SOURCE.resolve()}".encode())
    return f"dynaformer_band_{h.hexdigest()[:12]}"


def _cpu_model() -> str:
    """The CPU's model name and instruction-set flags (a model name like "AMD EPYC" spans several ISAs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return " ".join(next((x for x in lines if x.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        return torch.backends.cpu.get_cpu_capability()


def _put_ninja_on_path() -> None:
    """torch's extension builder runs `ninja`; the pip package's binary may sit outside PATH (an un-activated
    virtual environment)."""
    if shutil.which("ninja") is not None:
        return
    try:
        ninja = importlib.import_module("ninja")  # (imported by name: an exported folder does not have it)
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def build(source: Path, name: Callable[[], str], flags: list[str]) -> tuple[ModuleType | None, str | None]:
    """(the compiled module, None), or (None, why not): the checks and the build every native kernel shares.
    `name` is called only once the source is known to be there (it hashes the source)."""
    if os.environ.get("DYNAFORMER_NATIVE", "1") == "0":
        return None, "disabled by DYNAFORMER_NATIVE=0"
    if not source.exists():  # an exported model folder ships the Python kernels only
        return None, "its source is not shipped here"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None, "no C++ compiler on PATH"
    _put_ninja_on_path()
    try:
        from torch.utils.cpp_extension import load as load_extension

        return load_extension(name(), [str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                              verbose=False), None
    except Exception as e:  # noqa: BLE001 - any build failure means: run without this kernel
        return None, f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"


def load() -> ModuleType | None:
    """The compiled module, building it on first call; None (once warned) where it cannot be built."""
    global _module, _reason
    if _module is not None or _reason is not None:
        return _module
    with _lock:
        if _module is not None or _reason is not None:
            return _module
        _module, _reason = build(SOURCE, _build_name, ["-O3", "-march=native", "-ffast-math", "-fopenmp"])
        if _reason is not None and _reason.startswith("build failed"):
            warnings.warn(f"dynaformer: the compiled band kernel is unavailable ({_reason}); "
                          "using the Python band kernel", stacklevel=2)
        return _module


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _reason
