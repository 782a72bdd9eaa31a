"""`dynaformer.nn`: the README's example model, built from the drop-in modules, gives `Transformer`'s logits and
span penalty for the same weights (dynamic residual × dynamic span), and the modules stand alone."""

from __future__ import annotations

import re

import torch

from dynaformer.model import ModelConfig, Transformer

from .conftest import ROOT


def _readme_example() -> dict:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The mechanisms in your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def _weights_into(theirs: torch.nn.Module, ours: Transformer) -> None:
    """Our Transformer's tensors under the example's names."""
    rename = [(r"^blocks\.(\d+)\.attn\.", r"blocks.\1.attn.attn."),
              (r"^blocks\.(\d+)\.mlp\.up\.", r"blocks.\1.mlp.0."),
              (r"^blocks\.(\d+)\.mlp\.down\.", r"blocks.\1.mlp.2."),
              (r"^blocks\.(\d+)\.attn_res\.", r"blocks.\1.res_attn.res."),
              (r"^blocks\.(\d+)\.mlp_res\.", r"blocks.\1.res_mlp.res.")]
    state = {}
    for name, t in ours.state_dict().items():
        if name in ("head.weight", "progress"):
            continue
        for pat, rep in rename:
            name = re.sub(pat, rep, name)
        state[name] = t
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("inv_freq", "progress.value")) for k in missing), (missing, unexpected)


def test_the_readme_example_equals_transformer():
    scope = _readme_example()
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(vocab_size=64, context_len=256, n_layer=2, n_head=4, d_model=32,
                                   residual="dynamic", span="dynamic", span_max=96, span_init=24.0))
    with torch.no_grad():  # every gate and span term active
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ours.progress.fill_(0.3)
    theirs = scope["TinyGPT"]()
    _weights_into(theirs, ours)
    theirs.progress.set(3, 10)
    for T in (20, 150):  # 150: past a band chunk, where the planner takes the band / split kernels
        x = torch.randint(0, 64, (2, T))
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours(x)[0], rtol=1e-5, atol=1e-5)
    # Training: the same loss, the same span penalty, gradients reach the span and residual gates.
    x = torch.randint(0, 64, (2, 150))
    ours.train()
    theirs.train()
    logits, _ = ours(x)
    torch.testing.assert_close(theirs(x), logits, rtol=1e-5, atol=1e-5)
    penalty = sum(b.attn.aux_loss() for b in theirs.blocks)
    torch.testing.assert_close(penalty, ours.aux_loss(), rtol=1e-6, atol=1e-9)
    (theirs(x).square().mean() + penalty).backward()
    assert theirs.blocks[0].attn.attn.span.v.grad is not None
    assert theirs.blocks[1].res_mlp.res.content_proj.grad is not None


def test_the_modules_alone():
    from dynaformer.nn import DynamicResidual, Progress, SpanAttention

    torch.manual_seed(1)
    progress = Progress()
    attn = SpanAttention(48, 4, span="per_head", span_max=64, span_init=8.0, progress=progress)
    res = DynamicResidual(48, progress=progress)
    x = torch.randn(3, 70, 48)
    y = res(x, attn)
    assert y.shape == x.shape and attn.last_spans.shape[1] == 4 and attn.aux_loss().dim() == 0
    # Identity at init: exactly pre-norm.
    norm = torch.nn.functional.rms_norm
    torch.testing.assert_close(y, x + attn(norm(x, (48,), res.res.norm.weight, 1e-6)))
    # Causal: the first tokens do not see later ones.
    x2 = x.clone()
    x2[:, 40:] = torch.randn_like(x2[:, 40:])
    torch.testing.assert_close(res(x2, attn)[:, :40], y[:, :40])
    progress.set(5, 10)
    assert float(progress.value) == 0.5
