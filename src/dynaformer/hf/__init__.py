"""Hugging Face transformers integration (optional extra: `pip install 'dynaformer[hf]'`).

Importing this package registers `DynaformerConfig` with `AutoConfig` and `DynaformerForCausalLM` with
`AutoModelForCausalLM`, so a folder written by `dynaformer export-hf` loads with the Auto classes:

    import dynaformer.hf  # registers model_type "dynaformer"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported/")
    tok = AutoTokenizer.from_pretrained("exported/")
"""

from __future__ import annotations

from ..extras import require

require("transformers", "hf")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .configuration import DynaformerConfig  # noqa: E402
from .modeling import DynaformerCache, DynaformerForCausalLM  # noqa: E402
from .tokenization import to_hf_tokenizer  # noqa: E402

AutoConfig.register(DynaformerConfig.model_type, DynaformerConfig, exist_ok=True)
AutoModelForCausalLM.register(DynaformerConfig, DynaformerForCausalLM, exist_ok=True)

__all__ = ["DynaformerCache", "DynaformerConfig", "DynaformerForCausalLM", "to_hf_tokenizer"]
