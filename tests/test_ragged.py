"""RaggedCache (model/ragged.py): independent sequences decoded in one forward, each against its own cache and at
its own position, give what each gives decoded alone — for every residual × span kind, with rows of different
lengths joining and leaving between steps, and span-bounded caches that compact."""

from __future__ import annotations

import pytest
import torch

from dynaformer.model import Transformer
from dynaformer.model.ragged import RaggedCache, clone_cache, reserved_bytes

from .conftest import MATRIX, SPANS, tiny_config, trained_like

SPAN_ARGS = dict(span_window=6, span_max=16, span_init=4.0, span_ramp=4)  # short: bounded caches compact


def _model(residual: str, span: str) -> Transformer:
    return trained_like(residual, span, **SPAN_ARGS)


@pytest.mark.parametrize("residual,span", MATRIX)
@torch.no_grad()
def test_ragged_decode_equals_each_row_alone(residual, span):
    model = _model(residual, span)
    prompts = [torch.randint(0, 64, (n,)) for n in (9, 3, 14, 1)]
    steps = 8
    tokens = torch.randint(0, 64, (len(prompts), steps))

    # Alone: each row prefilled and decoded on its own cache, one token per call.
    alone = []
    for b, p in enumerate(prompts):
        cache = model.new_cache(1, len(p) + steps)
        model(p[None], cache=cache)
        alone.append(torch.cat([model(tokens[b, t].view(1, 1), cache=cache)[0][0] for t in range(steps)]))

    # Together: rows 0-2 from the start, row 3 joins at step 3, row 1 leaves after step 5.
    caches = {}
    out = {b: [] for b in range(len(prompts))}
    for t in range(steps):
        for b in range(len(prompts)):
            if b not in caches and not out[b] and (b < 3 or t >= 3):
                caches[b] = model.new_cache(1, len(prompts[b]) + steps)
                model(prompts[b][None], cache=caches[b])
        if t == 6:
            del caches[1]
        rows = sorted(caches)
        idx = torch.stack([tokens[b, len(out[b])] for b in rows]).view(-1, 1)
        logits, _ = model(idx, cache=RaggedCache([caches[b] for b in rows]))
        for i, b in enumerate(rows):
            out[b].append(logits[i])
    for b, got in out.items():
        got = torch.cat(got)
        torch.testing.assert_close(got, alone[b][: len(got)], rtol=0, atol=1e-5, msg=lambda m, b=b: f"row {b}: {m}")
    assert [len(v) for v in out.values()] == [8, 6, 8, 5]


def test_reserved_bytes_dense_and_bounded():
    dense = Transformer(tiny_config())
    cache = dense.new_cache(1, 20)
    per_pos = 2 * dense.cfg.n_layer * dense.cfg.d_model * 4  # keys and values, fp32
    assert reserved_bytes(cache) == 20 * per_pos  # the whole buffer, before anything is stored
    bounded = Transformer(tiny_config(span="fixed", span_window=6, context_len=256))
    small, long = bounded.new_cache(1, 20), bounded.new_cache(1, 256)
    assert reserved_bytes(small) == reserved_bytes(long) < 20 * per_pos  # bounded by the window, not the length
    model = Transformer(tiny_config())
    with pytest.raises(ValueError, match="unpadded"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=RaggedCache([model.new_cache(1, 4)]),
              key_padding_mask=torch.ones(1, 1))


@pytest.mark.parametrize("span", SPANS)
@torch.no_grad()
def test_a_cloned_cache_continues_the_sequence_on_its_own(span):
    """clone_cache (a server's n choices of one prompt): the copy decodes what a fresh prefill would, past the
    point where a bounded buffer compacts, and decoding it leaves the original untouched."""
    model = _model("dynamic", span)
    prompt, steps = torch.randint(0, 64, (1, 9)), 14
    tokens = torch.randint(0, 64, (steps, 1, 1))

    def decode(cache) -> torch.Tensor:
        return torch.cat([model(t, cache=RaggedCache([cache]))[0][:, -1] for t in tokens])

    fresh = model.new_cache(1, 9 + steps)
    model(prompt, cache=fresh)
    original = model.new_cache(1, 9 + steps)
    model(prompt, cache=original)
    copy = clone_cache(original)
    expected = decode(fresh)
    torch.testing.assert_close(decode(copy), expected, rtol=0, atol=0)
    assert copy.length == 9 + steps and original.length == 9
    torch.testing.assert_close(decode(original), expected, rtol=0, atol=0)
    assert reserved_bytes(copy) == reserved_bytes(original)
