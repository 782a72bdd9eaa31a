"""The server's options, one typed dataclass: `dynaformer serve --help` is generated from it, and a bad value is
one error naming the field (`serve.kv_budget_mb: ...`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

CACHE_DTYPES = ("auto", "fp32", "bf16", "fp16")  # torch dtypes by name in server.py (this module imports no torch)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the server is a choice
    port: int = 8000  # 0: any free port (printed when listening)
    api_key: str | None = None  # require `Authorization: Bearer KEY` (default: $DYNAFORMER_API_KEY, else none)
    kv_budget_mb: float = 1024.0  # KV-cache memory for all active sequences; admission waits for room
    max_batch: int = 64  # most sequences decoded together
    max_queue: int = 256  # most sequences waiting for admission; past it requests get 429
    max_tokens_default: int = 16  # max_tokens when a request gives none (OpenAI's default)
    drain_s: float = 30.0  # on SIGTERM: finish in-flight requests for this long, then cancel the rest
    model_name: str | None = None  # the id in /v1/models (default: the run folder's name)
    cache_dtype: str = "auto"  # the KV cache's dtype: fp32, bf16, fp16 or auto (the model's); bf16 halves fp32's bytes
    threads: int = 0  # torch CPU threads (0: torch's default)
    log_level: str = "warning"  # uvicorn's: critical, error, warning, info, debug, trace

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port: must be in 0..65535, got {self.port}")
        if not (math.isfinite(self.kv_budget_mb) and 0 < self.kv_budget_mb <= 2**30):
            raise ConfigError(f"serve.kv_budget_mb: must be a positive number of MiB, got {self.kv_budget_mb}")
        for name in ("max_batch", "max_queue", "max_tokens_default"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}: must be ≥ 1, got {getattr(self, name)}")
        if not 0 <= self.drain_s <= 86_400:
            raise ConfigError(f"serve.drain_s: must be in 0..86400 seconds, got {self.drain_s}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"serve.cache_dtype: expected one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.threads < 0:
            raise ConfigError(f"serve.threads: must be ≥ 0, got {self.threads}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("serve.api_key: must not be empty")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"serve.log_level: expected critical, error, warning, info, debug or trace, "
                              f"got {self.log_level!r}")
