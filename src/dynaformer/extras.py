"""Optional extras: a missing optional package is a one-line user error that names the extra to install."""

from __future__ import annotations

import importlib.util

from .errors import DynaformerError

EXTRAS = {"transformers": "hf", "tokenizers": "hf", "lm_eval": "eval", "tensorboard": "tensorboard",
          "uvicorn": "serve", "starlette": "serve"}


def require(module: str, extra: str | None = None) -> None:
    if importlib.util.find_spec(module) is None:
        raise DynaformerError(f"this needs the optional package '{module}': "
                              f"pip install 'dynaformer[{extra or EXTRAS.get(module, module)}]'")
