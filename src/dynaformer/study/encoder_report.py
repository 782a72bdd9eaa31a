"""The report's encoder section: bidirectional classifiers fine-tuned on generated understanding tasks
(keyword spotting, entailment with the supporting fact at a chosen distance, ListOps), one table row per
(task, variant) and a verdict per variant against the reference: does it raise accuracy by ≥ D_ACC?"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .figures import png
from .render import Block, Heading, Image, Paragraph, Table
from .stats import mean_sd
from .verdicts import D_ACC, Test, judge_test

ENCODER_CLAIM = Test("enc_accuracy", +1, D_ACC)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _ms(vals: list[float]) -> str:
    if not vals:
        return "—"
    m, s = mean_sd(vals)
    return f"{m:.3f} ± {s:.3f}"


def _by_distance(rs: list[dict]) -> dict[str, float]:
    """Mean accuracy per distance bucket over seeds (buckets every seed has)."""
    buckets: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        for k, v in (r.get("accuracy_by_distance") or {}).items():
            buckets[k].append(v)
    return {k: float(np.mean(v)) for k, v in buckets.items() if len(v) == len(rs)}


def _bucket_key(k: str) -> int:
    return int(k.split("-")[0])


def encoder_rows(encoder: dict[str, dict[str, list[dict]]], reference: str) -> list[list[str]]:
    rows = []
    for task, by_variant in sorted(encoder.items()):
        ref = by_variant.get(reference)
        for v, rs in by_variant.items():
            acc = [r["accuracy"] for r in rs]
            f1 = [r["macro_f1"] for r in rs]
            dist = _by_distance(rs)
            dist_s = ", ".join(f"{k}: {dist[k]:.2f}" for k in sorted(dist, key=_bucket_key)) or "—"
            if v == reference:
                vs, verdict = "(reference)", "—"
            elif not ref:
                vs, verdict = f"no finished runs of '{reference}'", "not tested"
            else:
                e = judge_test(ENCODER_CLAIM, rs, ref, v, reference)
                p = "—" if e.p is None else f"{e.p:.2g}"
                vs = f"Δ={_fmt(e.diff)}, p={p}" + (f" ({e.note})" if e.note else "")
                verdict = f"**{e.verdict}**"
            params = rs[0].get("params")
            rows.append([task, v, str(len(rs)), "—" if params is None else f"{params:,}", _ms(acc), _ms(f1),
                         _fmt(rs[0].get("chance")), dist_s, vs, verdict])
    return rows


def plot_encoder(encoder: dict[str, dict[str, list[dict]]], colors: dict[str, str], plt) -> bytes | None:
    tasks = [t for t in sorted(encoder) if any(_by_distance(rs) for rs in encoder[t].values())]
    if not tasks or plt is None:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        chance = None
        for v, rs in encoder[t].items():
            dist = _by_distance(rs)
            if not dist:
                continue
            keys = sorted(dist, key=_bucket_key)
            ax.plot(range(len(keys)), [dist[k] for k in keys], "o-", ms=3, label=v, color=colors.get(v))
            ax.set_xticks(range(len(keys)), keys, fontsize=7)
            chance = rs[0].get("chance")
        if chance is not None:
            ax.axhline(chance, ls=":", color="grey", lw=1)
        ax.set(title=f"{t}: accuracy by distance", xlabel="distance bucket", ylim=(-0.03, 1.03))
    axes[0][0].legend(fontsize=7)
    return png(fig)


def encoder_blocks(encoder: dict[str, dict[str, list[dict]]], reference: str, colors: dict[str, str], plt,
                   plots: bool = True, pretrain: dict[str, list[dict]] | None = None) -> list[Block]:
    if not encoder and not pretrain:
        return []
    pretrained = any(r.get("pretrained") for by in encoder.values() for rs in by.values() for r in rs)
    start = ("from its masked-LM pretrained encoder (same variant and seed; table below)" if pretrained
             else "from scratch")
    blocks: list[Block] = [Heading(2, "Understanding tasks: encoders fine-tuned on classification")]
    blocks.append(Paragraph("The residual question asks about a model for natural language understanding. Each "
                        "variant's model overrides are applied to a bidirectional encoder (causal = false: symmetric "
                        f"spans, the dynamic residual's position signal is the sequence length), fine-tuned {start} "
                        "with a classification head on generated tasks. Accuracy and macro-F1 on the held-out split, "
                        f"mean ± sd over seeds; accuracy by distance bucket (the supporting token or fact that many "
                        f"units before the end). Verdict: supported when the variant's accuracy exceeds the "
                        f"reference's by ≥ {D_ACC:.0%} with p < 0.05 (Welch), contradicted when the 95% interval rules "
                        f"out a gain of that size, else inconclusive."))
    blocks.append(Table(["task", "variant", "seeds", "params", "accuracy", "macro-F1", "chance",
                         "accuracy by distance", "vs reference", "verdict"], encoder_rows(encoder, reference)))
    if pretrain:
        blocks.append(Paragraph("Masked-LM pretraining of the encoders (15% of positions; validation loss on the "
                            "masked positions, nats):"))
        blocks.append(Table(["variant", "seeds", "steps", "masked-LM val loss"],
                            [[v, str(len(rs)), str(rs[0].get("steps")),
                              _ms([r["val_loss"] for r in rs if r.get("val_loss") is not None])]
                             for v, rs in sorted(pretrain.items())]))
    title = "Encoder accuracy by distance (dotted: chance)"
    caption = "Fine-tuned classifiers, mean over seeds: accuracy against the distance bucket of the evidence."
    if not plots:
        has = any(_by_distance(rs) for by in encoder.values() for rs in by.values())
        blocks.append(Image(title, b"" if has else None, "not recorded by any run", caption))
    else:
        blocks.append(Image(title, plot_encoder(encoder, colors, plt),
                            "matplotlib is not installed (pip install dynaformer[plot])" if plt is None else
                            "not recorded by any run", caption))
    return blocks
