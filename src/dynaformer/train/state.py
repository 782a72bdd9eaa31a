"""Model and optimizer state in a portable form: full (unsharded) CPU tensors, optimizer state keyed
by parameter name. The same checkpoint loads into a single process, DDP or FSDP2 at any world size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from ..errors import CheckpointError

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """Full state dict on CPU (under FSDP, gathered: complete on rank 0, empty elsewhere)."""
    sd = get_model_state_dict(model, options=_FULL) if sharded else model.state_dict()
    return {k: v.detach().to("cpu") for k, v in sd.items()}


def load_model_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], sharded: bool) -> None:
    if sharded:
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(sd, strict=False)


def _optimizers(optimizer: Any) -> Any:
    """What torch.distributed.checkpoint takes: the optimizers of an `optim.OptimizerChain` (Muon + AdamW)
    as a list, a single optimizer as is."""
    return getattr(optimizer, "optimizers", optimizer)


def _names_by_param(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """{"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]}."""
    if sharded:
        return get_optimizer_state_dict(model, _optimizers(optimizer), options=_FULL)
    sd = optimizer.state_dict()
    names = _names_by_param(model)
    index_to_name = {}
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index_to_name[i] = names[id(p)]
            i += 1
    return {"state": {index_to_name[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any], sharded: bool) -> None:
    if sharded:
        set_optimizer_state_dict(model, _optimizers(optimizer), optim_state_dict=sd,
                                 options=StateDictOptions(full_state_dict=True))
        return
    names = _names_by_param(model)
    name_to_index, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name_to_index[names[id(p)]] = i
            i += 1
    optimizer.load_state_dict({
        "state": {name_to_index[n]: s for n, s in sd["state"].items()},
        "param_groups": [{**g, "params": [name_to_index[n] for n in g["params"]]} for g in sd["param_groups"]],
    })


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    """This rank's view of model and optimizer state for DCP (DTensor shards under FSDP2, replicas under DDP),
    keyed by parameter name; the optimizer's param_groups (plain numbers) are returned apart, so the DCP
    folder holds tensors only and nothing in it is ever unpickled."""
    msd, osd = get_state_dict(model, _optimizers(optimizer))
    return {"model": msd, "optim": {"state": osd["state"]}}, osd["param_groups"]


def load_sharded_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       param_groups: list[dict] | None) -> None:
    from .checkpoint import _dedup_keys, load_dcp

    if not isinstance(param_groups, list):
        raise CheckpointError(f"checkpoint '{ckpt}': trainer.pt lacks the optimizer's param_groups")
    (msd, osd) = get_state_dict(model, _optimizers(optimizer))  # this world size's layout; filled in place by DCP
    state = {"model": _dedup_keys(msd, ckpt), "optim": {"state": osd["state"]}}
    load_dcp(ckpt, state)
    set_state_dict(model, _optimizers(optimizer), model_state_dict={**msd, **state["model"]},
                   optim_state_dict={"state": state["optim"]["state"], "param_groups": param_groups})
