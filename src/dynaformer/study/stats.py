"""Welch's t-test and its confidence interval, self-contained (no scipy): the Student t CDF through
the regularised incomplete beta function (continued fraction, Numerical Recipes §6.4)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + aa / c if abs(c) > 1e-300 else 1e300
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + aa / c if abs(c) > 1e-300 else 1e300
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided p-value P(|T| ≥ |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """q with P(T ≤ q) = p (p > 0.5), by bisection on the two-sided tail."""
    lo, hi = 0.0, 1e3
    target = 2 * (1 - p)
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


@dataclass
class Welch:
    diff: float  # mean(a) − mean(b)
    p: float
    lo: float  # (1 − alpha) confidence interval of diff
    hi: float
    df: float


def welch(a: list[float], b: list[float], alpha: float = 0.05) -> Welch:
    """Welch's unequal-variance t-test of mean(a) − mean(b). With one sample per arm, or zero variance
    in both arms, there is no estimate of noise: p = 0 and a point interval if the means differ (the
    metric is deterministic, e.g. analytic FLOPs), p = 1 if they are equal; with a single seed and
    nonzero noise elsewhere the interval is infinite."""
    ma, sa = mean_sd(a)
    mb, sb = mean_sd(b)
    diff = ma - mb
    va = sa * sa / len(a) if len(a) > 1 else math.nan
    vb = sb * sb / len(b) if len(b) > 1 else math.nan
    if math.isnan(va) or math.isnan(vb):
        if (len(a) > 1 and sa > 0) or (len(b) > 1 and sb > 0):
            return Welch(diff, math.nan, -math.inf, math.inf, math.nan)
        va, vb = 0.0, 0.0
    se2 = va + vb
    if se2 == 0:
        return Welch(diff, 0.0 if diff != 0 else 1.0, diff, diff, math.inf)
    se = math.sqrt(se2)
    df = se2**2 / ((va**2 / (len(a) - 1) if va else 0.0) + (vb**2 / (len(b) - 1) if vb else 0.0))
    t = diff / se
    q = t_quantile(1 - alpha / 2, df)
    return Welch(diff, t_sf2(t, df), diff - q * se, diff + q * se, df)


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given. The i-th smallest of m p-values (i from 1) is
    multiplied by m − i + 1, the products are made non-decreasing along that order and capped at 1; a test is
    rejected at familywise level α exactly when its adjusted p is < α (Holm's step-down procedure)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def mde(sd_a: float, n_a: int, sd_b: float, n_b: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Minimum detectable effect: the true difference of means that a two-sided Welch test at level `alpha`
    detects with probability `power`, at these spreads and numbers of seeds,

        MDE = (t(1 − α/2, ν) + t(power, ν)) · √(sd_a²/n_a + sd_b²/n_b),

    with ν the Welch–Satterthwaite degrees of freedom (the normal-approximation formula with t quantiles).
    None with fewer than two seeds in an arm or no spread at all (nothing to scale by)."""
    if n_a < 2 or n_b < 2:
        return None
    va, vb = sd_a * sd_a / n_a, sd_b * sd_b / n_b
    if va + vb == 0:
        return None
    df = (va + vb) ** 2 / (va * va / (n_a - 1) + vb * vb / (n_b - 1))
    return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * math.sqrt(va + vb)
