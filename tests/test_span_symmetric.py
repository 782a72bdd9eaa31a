"""Encoder (symmetric) span attention: the band kernel matches the dense reference — outputs and gradients,
span gradients included — for every span kind, with and without key padding, at lengths that are not
multiples of the chunk, and it only touches the band."""

from __future__ import annotations

import pytest
import torch

from dynaformer.kernels.span_symmetric import (
    band_symmetric_span_attention,
    reference_symmetric_span_attention,
    symmetric_span_attention,
)

from .conftest import output_and_grads

CASES = [  # kind, B, H, T, span range, ramp
    ("dynamic", 2, 3, 100, (0.0, 30.0), 8.0),
    ("dynamic", 1, 2, 97, (40.0, 120.0), 16.0),  # reaches past both ends of the sequence
    ("per_head", 2, 3, 130, (5.0, 40.0), 8.0),
    ("per_head", 2, 4, 75, (10.0, 20.0), 4.5),
    ("fixed", 2, 3, 90, (3.0, 30.0), 1.0),
]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind,B,H,T,zr,ramp", CASES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep", [True, False])  # False: the backward recomputes P from the log-sum-exp
def test_band_matches_reference(kind, B, H, T, zr, ramp, padded, dtype, keep):
    torch.manual_seed(0)
    hard = kind == "fixed"
    q, k, v = (torch.randn(B, H, T, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    shape = (B, H, T) if kind == "dynamic" else (1, H, 1)
    z = (zr[0] + (zr[1] - zr[0]) * torch.rand(shape, dtype=dtype)).requires_grad_(not hard)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, T - 23:] = False  # right padding
        mask[-1, 5:9] = False  # and a hole
    go = torch.randn(B, H, T, 16, dtype=dtype)

    def run(fn):
        return output_and_grads(fn, [q, k, v, z], go)

    ref = run(lambda: reference_symmetric_span_attention(q, k, v, z, ramp, hard, mask))
    got = run(lambda: band_symmetric_span_attention(q, k, v, z, ramp, hard, mask, chunk=16, keep_scores=keep))
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    for name, a, b in zip(["out", "dq", "dk", "dv", "dz"], got, ref, strict=False):
        assert _rel(a, b) <= tol, (name, _rel(a, b))
    if not hard:
        assert ref[-1].abs().sum() > 0


def test_band_is_symmetric_and_local():
    # A key's value reaches exactly the queries within its span on either side, nothing further.
    T, z, R = 200, 20.0, 4.0
    q, k = torch.zeros(1, 1, T, 8), torch.zeros(1, 1, T, 8)
    v = torch.zeros(1, 1, T, 8)
    v[0, 0, 100, 0] = 1.0
    out = band_symmetric_span_attention(q, k, v, torch.full((1, 1, 1), z), R, chunk=32)[0, 0, :, 0]
    seen = (out > 0).nonzero().flatten()
    assert seen.min() == 100 - 23 and seen.max() == 100 + 23  # m > 0 for |d| < z + R
    assert torch.allclose(out[100 - 10], out[100 + 10])


def test_auto_dispatch_takes_the_band_only_when_it_pays():
    q = k = v = torch.randn(1, 2, 512, 8)
    short, long_ = torch.full((1, 2, 1), 30.0), torch.full((1, 2, 1), 400.0)
    for z in (short, long_):  # both dispatch choices agree with the reference
        ref = reference_symmetric_span_attention(q, k, v, z, 8.0)
        assert _rel(symmetric_span_attention(q, k, v, z, 8.0), ref) <= 1e-5


def test_far_reaching_tokens_widen_only_their_own_chunks():
    # Content spans: short everywhere but for three tokens. Their chunks are gathered at a long reach; the
    # rest of the row keeps a short window. Parity with the reference still holds, gradients included.
    from dynaformer.kernels import span_symmetric as S

    torch.manual_seed(0)
    B, H, T = 2, 2, 200
    q, k, v = (torch.randn(B, H, T, 16, requires_grad=True) for _ in range(3))
    z = torch.full((B, H, T), 4.0)
    z[0, 1, 150] = z[1, 0, 20] = z[1, 0, 21] = 90.0
    z.requires_grad_(True)
    pieces = []
    plan = S._encoder_pieces
    S._encoder_pieces = lambda *a, **kw: pieces.extend(plan(*a, **kw)) or pieces
    try:
        go = torch.randn(B, H, T, 16)
        pad = torch.ones(B, T, dtype=torch.bool)
        pad[1, 170:] = False  # with key padding too
        ref = output_and_grads(lambda: reference_symmetric_span_attention(q, k, v, z, 4.0, key_padding_mask=pad),
                               [q, k, v, z], go)
        got = output_and_grads(lambda: band_symmetric_span_attention(q, k, v, z, 4.0, key_padding_mask=pad,
                                                                     chunk=16), [q, k, v, z], go)
    finally:
        S._encoder_pieces = plan
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) <= 1e-5
    long_e = [p.E for p in pieces if p.kind == "gather" and p.E >= 90]
    assert long_e and not [p for p in pieces if p.kind == "box" and p.E >= 90]
    assert sum(len(p.where[0]) for p in pieces if p.kind == "gather" and p.E >= 90) <= 3  # only their chunks pay
