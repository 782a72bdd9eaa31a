"""`DynaformerForCausalLM`: our `Transformer` inside a transformers `PreTrainedModel` + `GenerationMixin`.

The wrapper adds no model code: `self.model` is the very `Transformer` that `dynaformer train` builds,
so every mechanism and `ModelConfig` field behaves exactly as in dynaformer (tests compare logits and
greedy generations with our own sampler for every residual and span kind).

The KV cache is our own (`Transformer.new_cache`: a dense buffer, or whatever bounded cache a span kind
builds), wrapped in `DynaformerCache`, a thin `transformers.Cache`. It remembers the tokens it holds (and their
attention mask), so operations that our cache does not implement (growing past its capacity, beam reordering,
cropping for assisted decoding) are done by re-reading those tokens: always exact, never a silent mismatch.

Padded batches: `attention_mask` (left or right padding; the Transformer's `key_padding_mask`) gives each row its
own positions and masks padded keys inside the Transformer (model/context.py), so a padded row computes what it
computes alone.

This module is also shipped inside exported folders (hf/bundle.py rewrites its imports), so it may import only
the standard library, torch, transformers and the dynaformer modules the bundle carries.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import __version__ as _TRANSFORMERS_VERSION
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import Transformer
from .configuration import DynaformerConfig

_TRANSFORMERS_MAJOR = int(_TRANSFORMERS_VERSION.split(".")[0])
# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache` (the old
# name still works, with a deprecation warning on every call): use whichever this version's outputs have.
_CACHE_NAME = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class DynaformerCache(Cache):
    """Our KV cache object behind the transformers `Cache` interface that `generate()` talks to.

    Holds `inner` (the cache `Transformer.new_cache` returns), `tokens` (B, L), the ids whose keys and
    values `inner` stores, and `mask` (B, L), their attention mask (None while nothing is padded). `inner` is
    (re)built lazily: on the first call, when it would overflow (capacity doubles), and after
    `reorder_cache`/`crop`, by running the model over `tokens`.
    """

    is_compileable = False

    def __init__(self) -> None:
        try:  # transformers ≥ 4.54 wants a layer list; the wrapper has no HF layers of its own
            super().__init__(layers=[])
        except TypeError:
            super().__init__()
        self.inner: Any = None
        self.tokens: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.capacity = 0

    # --- the transformers Cache interface used by generate() ---------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0, *args: Any, **kwargs: Any) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[1])

    def get_max_length(self, *args: Any, **kwargs: Any) -> None:
        return None  # grows on demand

    def get_max_cache_shape(self, *args: Any, **kwargs: Any) -> int:
        return -1

    def __len__(self) -> int:
        return 0 if self.inner is None else len(self.inner.layers)

    def __repr__(self) -> str:
        return f"DynaformerCache(length={self.get_seq_length()}, capacity={self.capacity})"

    def _rows(self, fn) -> None:
        """Apply a row operation to the tokens and mask; the cache is rebuilt from them on the next call."""
        if self.tokens is not None:
            self.tokens = fn(self.tokens)
            self.mask = None if self.mask is None else fn(self.mask)
            self.inner = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows `beam_idx`."""
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens (negative: drop that many from the end)."""
        if self.tokens is None:
            return
        keep = max_length if max_length >= 0 else self.tokens.shape[1] + max_length
        if keep <= 0:
            self.tokens = self.mask = self.inner = None
        elif keep < self.tokens.shape[1]:
            self._rows(lambda t: t[:, :keep])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    # --- our side -----------------------------------------------------------------------------------
    def forward(self, model: Transformer, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Feed the new tokens `ids` (B, T); return their hidden states (B, T, C) and remember them.
        attention_mask: (B, L + T) over the cached and new tokens, transformers' convention (None: unpadded)."""
        B, T = ids.shape
        L = self.get_seq_length()
        if self.tokens is not None and self.tokens.shape[0] != B:
            raise ValueError(f"DynaformerCache holds a batch of {self.tokens.shape[0]}, got {B} rows")
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, L + T):
                raise ValueError(f"attention_mask must have shape (batch, cached + new tokens) = ({B}, {L + T}), "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=ids.device, dtype=torch.long)
            if self.mask is None and bool(mask.all()):
                mask = None  # still unpadded: keep the unmasked kernels
        elif self.mask is not None:  # no mask given: the new tokens are real
            mask = torch.cat([self.mask, self.mask.new_ones(B, T)], dim=1)
        else:
            mask = None
        history = ids if self.tokens is None else torch.cat([self.tokens.to(ids.device), ids], dim=1)
        if self.inner is None or L + T > self.capacity:
            # (Re)build from every token so far: first call, overflow, or after a reorder/crop.
            if L + T > self.capacity:
                self.capacity = max(2 * (L + T), model.cfg.context_len)
            self.inner = model.new_cache(B, self.capacity)
            h = model.hidden(history, cache=self.inner, key_padding_mask=mask, states=states)[:, -T:]
            if states is not None:
                states[:] = [s[:, -T:] for s in states]
        else:
            h = model.hidden(ids, cache=self.inner, key_padding_mask=mask, states=states)
        self.tokens, self.mask = history, mask
        return h


class DynaformerPreTrainedModel(PreTrainedModel):
    config_class = DynaformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.x: generate() may hand us a Cache
    _is_stateful = False

    def _init_weights(self, module: nn.Module) -> None:
        """transformers calls this for modules whose tensors did not come from a checkpoint (and, in 5.x, for
        every module with non-persistent buffers such as the rotary table, which it recreates empty).

        Our modules initialise themselves in their constructors (GPT-2 scaled normals, mechanism gates at
        identity; see model/transformer.py); HF's generic init (N(0, 0.02) everywhere, norms to 1) would
        break the mechanisms' identity-at-init. So the module's own tensors are copied from a freshly
        built `Transformer` with the same config — whatever parameters or buffers a kind adds."""
        if getattr(self, "_constructing", False):
            return  # direct construction: the Transformer has just initialised itself
        names = getattr(self, "_module_names", None)
        if names is None or id(module) not in names:
            names = self._module_names = {id(m): n for n, m in self.named_modules()}
        name = names.get(id(module))
        if name is None:  # not (yet) part of the model, e.g. a resized embedding: HF's generic init
            super()._init_weights(module)
            return
        if not (name == "model" or name.startswith("model.")):
            return
        ref = self._reference_model()
        ref_module = ref.get_submodule(name[len("model."):]) if name != "model" else ref
        with torch.no_grad():
            for key, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                src = getattr(ref_module, key)
                if t is not None and src is not None and not t.is_meta:
                    t.copy_(src.to(device=t.device, dtype=t.dtype))

    def _reference_model(self) -> Transformer:
        ref = getattr(self, "_reference", None)
        if ref is None:
            cfg = self.config.model_config()
            with torch.device("cpu"):  # never on the meta device HF may be building the model on
                ref = Transformer(cfg)
            object.__setattr__(self, "_reference", ref)  # not a submodule
        return ref

    def _drop_reference(self) -> None:
        for attr in ("_reference", "_module_names"):
            if attr in self.__dict__:
                object.__delattr__(self, attr)


class DynaformerForCausalLM(DynaformerPreTrainedModel, GenerationMixin):
    # Tied input/output embeddings (when tie_embeddings): transformers 5 wants {target: source}, 4.x a list.
    _tied_weights_keys = ({"model.head.weight": "model.embed.weight"} if _TRANSFORMERS_MAJOR >= 5
                          else ["model.head.weight"])

    def __init__(self, config: DynaformerConfig, model: Transformer | None = None) -> None:
        super().__init__(config)
        if not config.model_config().causal:
            raise ValueError("a bidirectional dynaformer encoder (causal=false) is not a causal LM")
        self._constructing = True
        self.model = model if model is not None else Transformer(config.model_config())
        self.post_init()
        self._constructing = False

    @classmethod
    def from_dynaformer(cls, model: Transformer, **config_kwargs: Any) -> DynaformerForCausalLM:
        """Wrap an existing (trained) Transformer; shares its parameters, copies nothing."""
        from ..configtools import to_dict

        return cls(DynaformerConfig(dynaformer=to_dict(model.cfg), **config_kwargs), model=model)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):  # type: ignore[override]
        model = super().from_pretrained(*args, **kwargs)
        for m in (model if isinstance(model, tuple) else (model,)):
            if isinstance(m, DynaformerPreTrainedModel):
                m._drop_reference()
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.head = value

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Module:
        """transformers resizes the embedding (and tied head) and sets config.vocab_size; the nested
        ModelConfig must follow, or save_pretrained writes a config that no longer matches the weights."""
        out = super().resize_token_embeddings(*args, **kwargs)
        n = self.model.embed.weight.shape[0]
        self.config.vocab_size = n
        self.config.dynaformer = {**self.config.dynaformer, "vocab_size": n}
        self.model.cfg.vocab_size = n
        return out

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                return_dict: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                cache: Cache | None = None, **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """input_ids: (B, T). With a cache, only the tokens it does not hold yet. attention_mask: (B, cached +
        T), 1 = real token, 0 = left or right padding: positions count from each row's first real token and
        padded keys are masked, so a padded row gives what it gives alone (`position_ids` are ignored: they
        follow from the mask). labels: (B, T), shifted inside (HF convention); padded positions are not
        scored; the loss is our Transformer's own. The cache argument is `cache` on transformers ≥ 5.24 and
        `past_key_values` before; both are accepted."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("dynaformer models take input_ids (inputs_embeds is not supported)")
        if output_attentions:
            raise ValueError("dynaformer models do not return attention weights (output_attentions=True): the span "
                             "kernels never form the full attention matrix")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        use_cache = use_cache and not self.training and labels is None
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        states: list[torch.Tensor] | None = [] if output_hidden_states else None
        loss = None
        if use_cache:
            if not isinstance(cache, DynaformerCache):
                if cache is not None and cache.get_seq_length() > 0:
                    raise ValueError("dynaformer models keep their own cache (DynaformerCache); got a filled "
                                     f"{type(cache).__name__}")
                cache = DynaformerCache()
            h = cache.forward(self.model, input_ids, attention_mask, states)
        else:
            h = self.model.hidden(input_ids, key_padding_mask=attention_mask, states=states)
            cache = None
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.model.head(h)  # (B, T, V)
        if labels is not None:
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
            if attention_mask is not None:  # a padded position is never a target
                targets = targets.masked_fill(attention_mask[:, -targets.shape[1]:] == 0, -100)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().to(logits.device),
                                   ignore_index=-100)
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=tuple(states) if states else None,
                                     **{_CACHE_NAME: cache})
        return out if return_dict else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Cache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      cache: Cache | None = None, **kwargs: Any) -> dict[str, Any]:
        """Feed only the tokens the cache does not hold, with the attention mask over all of them."""
        cache = cache if cache is not None else past_key_values
        cached = cache.get_seq_length() if isinstance(cache, DynaformerCache) else 0
        use_cache = self.config.use_cache if use_cache is None else use_cache
        inputs = {"input_ids": input_ids[:, cached:] if use_cache else input_ids,
                  _CACHE_NAME: cache if use_cache else None, "use_cache": use_cache,
                  "attention_mask": attention_mask}
        for key in ("logits_to_keep", "output_hidden_states"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _reorder_cache(self, past_key_values: Cache, beam_idx: torch.LongTensor) -> Cache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
