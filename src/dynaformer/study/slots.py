"""GPU slots of `compare`: worker slot i runs its cells on GPU i mod (the GPUs cells may use), or with
`--nproc_per_cell K` on K GPUs of its own, through CUDA_VISIBLE_DEVICES. Nothing is pinned on a CPU machine."""

from __future__ import annotations

import os

from ..errors import DynaformerError


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str | None, nproc_per_cell: int = 1) -> list[int]:
    """The GPU indices cells may use: `--devices 0,2,3`, checked against the visible GPUs, or all visible
    ones (none on a CPU machine: nothing is pinned)."""
    count = visible_gpus()
    if spec is None:
        ids = list(range(count))
    else:
        ids = []
        for part in spec.split(","):
            if not part.strip().isdigit():
                raise DynaformerError(f"--devices: '{part.strip()}' is not a GPU index (expected e.g. 0,1,2,3)")
            i = int(part)
            if i >= count:
                raise DynaformerError(f"--devices: GPU {i} does not exist (this machine has {count} visible GPU"
                                      f"{'' if count == 1 else 's'})")
            if i in ids:
                raise DynaformerError(f"--devices: GPU {i} is named twice")
            ids.append(i)
    if ids and nproc_per_cell > len(ids):
        raise DynaformerError(f"--nproc_per_cell {nproc_per_cell} needs that many GPUs, but only {len(ids)} "
                              f"are available to cells")
    return ids


def slot_env(slot: int, devices: list[int], nproc_per_cell: int = 1) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for worker slot `slot`: its nproc_per_cell GPUs, slot by slot round the devices;
    indices are translated through this process's own CUDA_VISIBLE_DEVICES, if any. Empty without GPUs."""
    if not devices:
        return {}
    mine = [devices[(slot * nproc_per_cell + j) % len(devices)] for j in range(nproc_per_cell)]
    parent = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return {"CUDA_VISIBLE_DEVICES": ",".join(parent[i] if i < len(parent) else str(i) for i in mine)}
