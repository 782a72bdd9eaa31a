"""Where and in which dtype a run trains: `resolve_device` for `train.device`, and `resolve_precision` for
`train.dtype` — `auto` (the default), `fp32` or `bf16` autocast.

`auto` takes bf16 autocast only where it pays (docs/design.md §10): a CUDA device with bf16 support, or a CPU with
native bf16 matmul — detected by capability (not an AVX2-only x86 CPU, and oneDNN reports bf16 support) and then
confirmed once by a micro-probe that times a bf16 against an fp32 matmul of a representative size. The probe's
result is cached per machine (CPU model + torch version) in `$XDG_CACHE_HOME/dynaformer/dtype-probe.json`
(`~/.cache` when unset). fp32 otherwise. `DYNAFORMER_DTYPE_PROBE=bf16|fp32` stands in for the probe (tests).

`bf16` where bf16 autocast cannot run is an error naming what `auto` would pick; where it runs emulated (an
AVX2 CPU: ≈ 20× slower, benchmarks/RESULTS.md "bf16 autocast does not pay") it is a warning.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import DynaformerError
from ..files import write_json_atomic

PROBE_ENV = "DYNAFORMER_DTYPE_PROBE"
PROBE_SHAPE = (1024, 384, 1152)  # (M, K, N): the small preset's QKV projection over 4 × 256 tokens
PAYS = 0.8  # bf16 must take at most this fraction of fp32's time


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DynaformerError(f"{field}: unknown device '{name}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DynaformerError(f"{field}: '{name}' was requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class Precision:
    dtype: str  # "fp32" or "bf16": what the run trains in
    reason: str  # one phrase: why

    @property
    def autocast(self) -> torch.dtype | None:
        return torch.bfloat16 if self.dtype == "bf16" else None

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynaformer" / "dtype-probe.json"


def _time(fn, repeats: int = 5) -> float:
    fn()  # warm-up: oneDNN picks its kernel on the first call
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def probe_bf16_matmul() -> dict:
    """Best-of-5 times of one (M×K)·(K×N) matmul in fp32 and in bf16, interleaved; does bf16 pay?"""
    M, K, N = PROBE_SHAPE
    a, b = torch.randn(M, K), torch.randn(K, N)
    a16, b16 = a.bfloat16(), b.bfloat16()
    fp32 = bf16 = float("inf")
    for _ in range(2):  # interleaved, so a burst of load on the machine hits both
        fp32 = min(fp32, _time(lambda: a @ b))
        bf16 = min(bf16, _time(lambda: a16 @ b16))
    return {"fp32_ms": round(1000 * fp32, 3), "bf16_ms": round(1000 * bf16, 3), "bf16_pays": bf16 <= PAYS * fp32}


def cached_probe() -> dict:
    """The probe's result for this machine, measured once and then read from the cache."""
    key = f"{cpu_model()} | torch {torch.__version__}"
    path = cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(cache.get(key), dict) and "bf16_pays" in cache[key]:
        return cache[key]
    result = {**probe_bf16_matmul(), "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**cache, key: result})
    except OSError:  # a read-only home: probe again next time rather than fail
        pass
    return result


def _cpu_auto() -> Precision:
    forced = os.environ.get(PROBE_ENV)
    if forced:
        if forced not in ("bf16", "fp32"):
            raise DynaformerError(f"{PROBE_ENV}: bf16 or fp32, got {forced!r}")
        return Precision(forced, f"auto: {PROBE_ENV}={forced}")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "NO AVX", "DEFAULT") and platform.machine().lower() in ("x86_64", "amd64", "i686"):
        return Precision("fp32", f"auto: {capability} CPU, no native bf16 matmul")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return Precision("fp32", f"auto: {capability} CPU, oneDNN reports no bf16 support")
    probe = cached_probe()
    verdict = "bf16" if probe["bf16_pays"] else "fp32"
    return Precision(verdict, f"auto: {capability} CPU, probe bf16 matmul {probe['bf16_ms']} ms vs fp32 "
                              f"{probe['fp32_ms']} ms")


def auto_precision(device: torch.device) -> Precision:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16 support")
    if device.type == "cpu":
        return _cpu_auto()
    return Precision("fp32", f"auto: bf16 autocast is not measured on {device.type}")


def bf16_runs(device: torch.device) -> bool:
    """Can bf16 autocast run here at all (however slowly)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        return True
    except (RuntimeError, AssertionError):
        return False


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """`train.dtype` → the dtype this run trains in and why; an error or a warning for `bf16` as above."""
    if requested == "fp32":
        return Precision("fp32", "asked for fp32")
    if requested == "auto":
        return auto_precision(device)
    if not bf16_runs(device):
        auto = auto_precision(device)
        raise DynaformerError(f"train.dtype: bf16 autocast is not supported on {device}; --dtype auto would pick "
                              f"{auto.dtype} ({auto.reason})")
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else ""
    if capability == "AVX2":
        print("warning: train.dtype bf16 on an AVX2 CPU: bf16 matmul is emulated there, about 20× slower than "
              "fp32 (--dtype auto picks fp32)", file=sys.stderr)
        return Precision("bf16", "asked for bf16 (emulated on this AVX2 CPU)")
    return Precision("bf16", "asked for bf16")
