"""The compiled decoding step (csrc/decode.cpp): rotary, KV-cache write and (span) attention of one new token per
row in one call, built on first use like the band kernel (band_native.py: same compiler checks, same cache folder,
DYNAFORMER_NATIVE=0 disables both).

Unlike the band kernel it is built for the vector width ATen itself runs with (`torch.backends.cpu.
get_cpu_capability()`): under `ATEN_CPU_CAPABILITY=avx2` on an AVX-512 machine it is compiled without AVX-512,
so an emulated AVX2 measurement times AVX2 code throughout.
"""

from __future__ import annotations

import hashlib
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .band_native import _cpu_model, build

SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None


def _isa_flags() -> list[str]:
    """-march=native, less the vector extensions ATen was told not to use (x86 only)."""
    flags = ["-march=native"]
    if platform.machine() in ("x86_64", "AMD64"):
        cap = torch.backends.cpu.get_cpu_capability()
        if cap == "AVX2":
            flags.append("-mno-avx512f")
        elif cap == "DEFAULT":
            flags += ["-mno-avx512f", "-mno-avx2"]
    return flags


def _build_name(flags: list[str]) -> str:
    """One build per source text, CPU, torch installation, checkout and flags (see band_native._build_name)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{platform.machine()} {_cpu_model()} {torch.__version__} {Path(torch.__file__).parent} "
             f"{SOURCE.resolve()} {' '.join(flags)}".encode())
    return f"dynaformer_decode_{h.hexdigest()[:12]}"


def load() -> ModuleType | None:
    """The compiled module, building it on first call; None (once warned) where it cannot be built."""
    global _module, _reason
    if _module is not None or _reason is not None:
        return _module
    with _lock:
        if _module is not None or _reason is not None:
            return _module
        flags = ["-O3", *_isa_flags(), "-ffast-math", "-fopenmp"]
        _module, _reason = build(SOURCE, lambda: _build_name(flags), flags)
        if _reason is not None and _reason.startswith("build failed"):
            warnings.warn(f"dynaformer: the compiled decoding step is unavailable ({_reason}); "
                          "decoding with tensor ops", stacklevel=2)
        return _module


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _reason
