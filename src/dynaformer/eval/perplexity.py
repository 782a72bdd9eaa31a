"""Loss, perplexity and bits per byte on a fixed set of windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate_windows(model: nn.Module, windows: torch.Tensor, batch_size: int,
                     token_bytes: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None) -> dict:
    """windows: (N, T+1) token ids. Returns mean loss (nats/token), perplexity and bits per byte
    (total nats / ln 2 / total UTF-8 bytes of the predicted tokens; token_bytes[v] = bytes of token v)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for i in range(0, len(windows), batch_size):
        block = windows[i : i + batch_size].to(device)
        x, y = block[:, :-1], block[:, 1:]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits, _ = model(x)
        nats = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        total_nats += nats.sum().item()
        total_tokens += y.numel()
        total_bytes += int(token_bytes[y.cpu()].sum()) if token_bytes is not None else y.numel()
    model.train(was_training)
    loss = total_nats / total_tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": total_nats / math.log(2) / total_bytes,
            "tokens": total_tokens}


@torch.no_grad()
def evaluate_mlm(model: nn.Module, windows: torch.Tensor, batch_size: int, mask_id: int, vocab_size: int,
                 token_bytes: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Masked-LM loss over fixed windows with a fixed masking (same every call): mean nats per masked
    token, accuracy at masked positions, and bits per byte of the masked tokens."""
    from ..data.masking import mask_tokens

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    total_nats, total_tokens, total_bytes, correct = 0.0, 0, 0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size, :-1]
        inputs, targets = mask_tokens(x, mask_id, vocab_size, gen)
        logits, _ = model(inputs.to(device))
        sel = targets != -100
        t = targets[sel].to(device)
        nats = F.cross_entropy(logits[sel.to(device)].float(), t, reduction="sum")
        total_nats += nats.item()
        total_tokens += int(sel.sum())
        correct += int((logits[sel.to(device)].argmax(-1) == t).sum())
        total_bytes += int(token_bytes[targets[sel]].sum()) if token_bytes is not None else int(sel.sum())
    model.train(was_training)
    loss = total_nats / max(1, total_tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": total_nats / math.log(2) / max(1, total_bytes),
            "accuracy": correct / max(1, total_tokens), "tokens": total_tokens}
