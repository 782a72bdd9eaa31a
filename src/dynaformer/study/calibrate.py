"""Wall-clock matching (`match: wall_clock`): the steps each variant trains so that steps × its measured step time
≈ the grid's wall_clock_s. Calibrated once per variant, recorded in grid.json and reused on resume."""

from __future__ import annotations

from .grid import Cell, Grid


def calibrate_steps(grid: Grid, cells: list[Cell], repeats: int = 5) -> dict[str, int]:
    """Steps per variant so that steps × (median step time) ≈ wall_clock_s; step times of all
    variants are measured interleaved in this process (drifts in machine speed hit all alike)."""
    import torch

    from ..configtools import from_dict
    from ..model import ModelConfig, Transformer
    from ..timing import time_interleaved

    fns = {}
    first = {}
    for c in cells:
        if c.model is not None and c.kind.wall_clock_matched and c.variant not in first:
            first[c.variant] = c
    for name, c in first.items():
        mcfg = from_dict(ModelConfig, c.model, "model")
        torch.manual_seed(0)
        model = Transformer(mcfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, mcfg.vocab_size, (c.train["batch_size"], mcfg.context_len))

        def step(model=model, opt=opt, x=x):
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    if not fns:
        return {}
    threads = next(iter(first.values())).train.get("threads") or 0
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        times = time_interleaved(fns, repeats, warmup=1)
    finally:
        torch.set_num_threads(old)
    return {v: max(1, int(grid.wall_clock_s / t)) for v, t in times.items()}
