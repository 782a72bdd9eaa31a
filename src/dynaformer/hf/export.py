"""`dynaformer export-hf RUN OUT`: a run's newest checkpoint as a self-contained transformers model folder
(config.json with `auto_map`, model.safetensors, generation_config.json, tokenizer files, README.md, and the
model code: configuration_dynaformer.py, modeling_dynaformer.py and the dynaformer modules they use, generated
from this package at export time by hf/bundle.py). Anyone with transformers, torch and safetensors loads it
with `trust_remote_code=True`; where dynaformer is installed, `import dynaformer.hf` loads it without.

An export never deletes what it did not write: OUT may not be, contain or lie inside the run folder, and
`--force` replaces OUT only when it is empty or a previous export (it holds the EXPORT_MARKER file every
export writes)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..data.tokenizers import load_tokenizer
from ..errors import DynaformerError
from ..runs import load_model
from .bundle import AUTO_MAP, write_bundle
from .modeling import DynaformerForCausalLM
from .tokenization import from_hf_spec, to_hf_tokenizer

_CARD = """---
library_name: transformers
pipeline_tag: text-generation
tags: [dynaformer, custom_code, residual-{residual}, span-{span}]
# license: not set by the export. Fill it in with the licence of these weights and of their training data.
---
# {name}

A dynaformer language model exported from `{ckpt}` (step {step}).

With only `transformers`, `torch` and `safetensors` installed (the model code ships in this folder, hence
`trust_remote_code=True` on both calls; without it on the tokenizer too, transformers stops to ask):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
ids = tok("Once upon a time", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=50, do_sample=False)[0]))
```

With `dynaformer` installed (its own classes, no remote code):

```python
import dynaformer.hf  # registers model_type "dynaformer" with the transformers Auto classes
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{name}")
```

Batches may be padded on either side (`tok.padding_side = "left"` for generation): positions count from each
row's first real token and padded keys are masked, so a padded row gives the tokens it gives alone. The pad
token is `{pad}`.

## Model

{summary}. Tokenizer: {tokenizer} ({vocab} tokens). Every setting is in `config.json` → `dynaformer`.

- Residual connections: {residual_text}
- Attention span: {span_text}

## Training

- Data: {data}
- Steps: {step}; {tokens}
- Held-out evaluation at the last checkpoint: {val}

## Licence

Not set by the export: add a `license:` line to the front matter above with the licence of these weights and
of the data they were trained on.
"""


def load_tokenizer_file(path: str | Path):
    """A tokenizer from FILE: a run folder's tokenizer.json (any kind) or a `tokenizers` BPE JSON."""
    from ..data.bpe import load_bpe_file

    p = Path(path)
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        spec = None
    if isinstance(spec, dict) and spec.get("kind") in ("byte", "char"):
        return load_tokenizer(p)
    return load_bpe_file(p)


EXPORT_MARKER = ".dynaformer-export"


def load_export(folder: str | Path):
    """(Transformer in eval mode, our tokenizer) of an exported folder: the model through this package's own
    `DynaformerForCausalLM.from_pretrained` (no remote code), the tokenizer read back from tokenizer.json
    (`from_hf_spec`), so it encodes and decodes exactly as the run's did."""
    folder = Path(folder)
    try:
        model = DynaformerForCausalLM.from_pretrained(folder).model
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DynaformerError(f"exported model '{folder}': cannot load it ({str(e).splitlines()[0]})") from None
    return model.eval(), from_hf_spec(spec, model.cfg.vocab_size)


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside it (resolved paths)."""
    return a == b or b in a.parents


def check_out(run_dir: Path, out: Path, force: bool) -> None:
    """Refuse an OUT that would overwrite the run or anything that is not a previous export."""
    r, o = run_dir.resolve(), out.resolve()
    if _inside(o, r) or _inside(r, o):
        where = "is" if o == r else "lies inside" if _inside(o, r) else "contains"
        raise DynaformerError(f"export-hf: '{out}' {where} the run folder '{run_dir}'; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise DynaformerError(f"export-hf: '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DynaformerError(f"export-hf: '{out}' is not empty; choose another folder or pass --force")
        if not (out / EXPORT_MARKER).is_file():
            raise DynaformerError(f"export-hf: '{out}' is not a previous dynaformer export (no {EXPORT_MARKER}); "
                                  f"--force replaces only those, so choose another folder")


def check_vocab(tokenizer, vocab_size: int, what: str) -> None:
    if tokenizer.vocab_size != vocab_size:
        raise DynaformerError(f"{what} has {tokenizer.vocab_size} tokens but the checkpoint's vocabulary has "
                              f"{vocab_size}: it is not the tokenizer this model was trained with")


def save_self_contained(hf_model: DynaformerForCausalLM, folder: Path) -> None:
    """save_pretrained, plus the model code (hf/bundle.py) and the `auto_map` that points transformers at it."""
    hf_model.save_pretrained(folder)
    write_bundle(folder)
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text())
    config["auto_map"] = AUTO_MAP
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _mechanism_texts(cfg) -> tuple[str, str]:
    if cfg.residual == "dynamic":
        terms = [t for t, on in (("training progress", cfg.dyn_step), ("position", cfg.dyn_position),
                                 ("content", cfg.dyn_content)) if on]
        residual = f"dynamic: each block's update weighted by {', '.join(terms) or 'a learned gain alone'}"
    else:
        residual = cfg.residual
    span = {"none": "dense causal attention over the whole context",
            "fixed": f"a fixed window of {cfg.span_window} keys",
            "per_head": f"one learned span per head, up to {cfg.span_max} tokens (ramp {cfg.span_ramp})",
            "dynamic": f"a learned span per head and token, from its content, up to {cfg.span_max} tokens "
                       f"(ramp {cfg.span_ramp})"}.get(cfg.span, cfg.span)
    return residual, span


def model_card(model, ckpt: Path, name: str, step, tokenizer, pad: str) -> str:
    """README.md of an export: a snippet that runs on a transformers-only machine, and front matter and sections
    with what the run recorded (mechanisms, data, tokens, held-out loss); the licence is left to the user."""
    from ..train.checkpoint import load_trainer_state

    cfg = model.cfg
    try:
        run = json.loads((ckpt.parent / "run.json").read_text())
    except (OSError, ValueError):
        run = {}
    data = run.get("data") or {}
    source = data.get("source") or (run.get("train") or {}).get("data") or "not recorded"
    size = (f" ({data['n_train']:,} training and {data.get('n_val', 0):,} validation tokens)"
            if data.get("n_train") else "")
    train = run.get("train") or {}
    tokens = (f"{int(step) * int(train['batch_size']) * int(train.get('grad_accum') or 1) * cfg.context_len:,} "
              f"tokens seen" if step and train.get("batch_size") else "tokens seen not recorded")
    try:
        last = load_trainer_state(ckpt).get("last_val") or {}
    except DynaformerError:
        last = {}
    val = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k in ("val_loss", "val_bpb", "val_ppl")
                    and isinstance(v, float)) or "not recorded"
    residual_text, span_text = _mechanism_texts(cfg)
    summary = f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context {cfg.context_len}"
    return _CARD.format(name=name, ckpt=ckpt, step=step, summary=summary, tokenizer=tokenizer.kind,
                        vocab=tokenizer.vocab_size, pad=pad, residual=cfg.residual, span=cfg.span,
                        residual_text=residual_text, span_text=span_text, data=f"{source}{size}", tokens=tokens,
                        val=val)


def export_hf(run: str | Path, out: str | Path, tokenizer_file: str | None = None, force: bool = False) -> dict:
    model, tokenizer, ckpt = load_model(run)
    if not model.cfg.causal:
        raise DynaformerError(f"export-hf: '{ckpt}' holds a bidirectional encoder (model.causal=false); "
                              f"export-hf writes causal language models only")
    if tokenizer_file:
        tokenizer = load_tokenizer_file(tokenizer_file)
        check_vocab(tokenizer, model.cfg.vocab_size, f"tokenizer file '{tokenizer_file}'")
    check_vocab(tokenizer, model.cfg.vocab_size, f"the tokenizer of '{ckpt}'")
    out = Path(out)
    check_out(ckpt.parent, out, force)
    hf_tok = to_hf_tokenizer(tokenizer, model_max_length=model.cfg.context_len)
    # A byte/char model's pad id lies one past its vocabulary (tokenization.py): transformers warns about such a
    # config.pad_token_id, and the model never needs it (padding comes with an attention_mask).
    special = {"pad_token_id": hf_tok.pad_token_id if hf_tok.pad_token_id < model.cfg.vocab_size else None}
    if hf_tok.eos_token_id is not None:
        special.update(eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.bos_token_id)
    hf_model = DynaformerForCausalLM.from_dynaformer(model, **special)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_self_contained(hf_model, tmp)
        hf_tok.save_pretrained(tmp)
        # transformers 5 writes its new class name (TokenizersBackend), which 4.x cannot resolve; the old
        # name is an alias in 5.x, so this folder loads with AutoTokenizer on both.
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False))
        step = json.loads((ckpt / "config.json").read_text()).get("step")
        (tmp / "README.md").write_text(model_card(model, ckpt, out.name, step, tokenizer, hf_tok.pad_token))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(ckpt.resolve()), "step": step}) + "\n")
        if out.exists():  # empty, or a previous export (check_out): move it aside, publish, then delete it
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"checkpoint": str(ckpt), "out": str(out), "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "params": model.num_params(), "files": sorted(p.name for p in out.iterdir())}
