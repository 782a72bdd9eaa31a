"""dynaformer: transformer language models with dynamic residual weighting and dynamic attention spans."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import ModelConfig, Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import dynaformer` stays cheap, so the command line can set up its signal handling
    # (entry.py) before torch loads.
    if name in ("ModelConfig", "Transformer"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'dynaformer' has no attribute '{name}'")
