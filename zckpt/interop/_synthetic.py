"""Tiny DeepSpeed-style ZeRO checkpoints written without DeepSpeed, for examples and tests.

The files follow the layout DeepSpeed 0.19 writes (see ``_files.py``): the same file names and
keys, fp32 partitions cut the way ZeRO cuts them, padding filled with NaN (DeepSpeed leaves it
uninitialised, so readers must never use it). Two differences keep the writer pickle-clean: no
``param_slice_mappings`` (as DeepSpeed before 0.7) and ``zero_stage`` / no loss scaler as plain
values. It is an independent oracle for world sizes and models the fixtures lack.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["write_zero_checkpoint"]


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.empty(0)


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, torch.full((n - t.numel(),), math.nan, dtype=t.dtype)])


def _opt_state(parts: Sequence[torch.Tensor], lr: float) -> dict[str, Any]:
    state = {
        g: {"step": torch.tensor(1.0), "exp_avg": p * 0.5, "exp_avg_sq": p * p}
        for g, p in enumerate(parts)
    }
    groups = [{"lr": lr, "betas": (0.9, 0.999), "params": [g]} for g in range(len(parts))]
    return {"state": state, "param_groups": groups}


def write_zero_checkpoint(
    save_dir: str | os.PathLike[str],
    params: Mapping[str, torch.Tensor],
    *,
    world_size: int,
    stage: int,
    dtype: torch.dtype = torch.bfloat16,
    groups: Sequence[Sequence[str]] | None = None,
    frozen: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    tied: Mapping[str, str] | None = None,
    tag: str = "step1",
    alignment: int = 2,
) -> None:
    """Write ``params`` (the fp32 masters) as a DeepSpeed ZeRO checkpoint under ``save_dir``.

    Args:
        save_dir: the save_dir; ``latest`` names ``tag``.
        params: trainable parameters, fp32.
        world_size: data-parallel ranks.
        stage: 1, 2 or 3.
        dtype: the training dtype (module weights; ``bf16_`` optimizer files for bf16).
        groups: parameter names per optimizer param group (default: one group).
        frozen: frozen parameters in the training dtype (recorded for stage >= 2).
        buffers: persistent buffers, saved as given.
        tied: alias name -> parameter name (DeepSpeed's ``shared_params``).
        tag: the tag directory.
        alignment: stage 1/2 groups are padded to ``alignment * world_size`` elements.

    Example:
        >>> import tempfile, torch, zckpt.interop
        >>> d = tempfile.mkdtemp()
        >>> w = torch.randn(3, 5)
        >>> write_zero_checkpoint(d, {"w": w}, world_size=4, stage=3, dtype=torch.float16)
        >>> sorted(os.listdir(f"{d}/step1"))[:2]
        ['zero_pp_rank_0_mp_rank_00_model_states.pt', 'zero_pp_rank_0_mp_rank_00_optim_states.pt']
        >>> torch.equal(zckpt.interop.deepspeed_fp32_state_dict(d)["w"], w)
        True
    """
    frozen, buffers, tied = dict(frozen or {}), dict(buffers or {}), dict(tied or {})
    groups = [list(g) for g in groups] if groups is not None else [list(params)]
    ws = world_size
    d = os.path.join(os.fspath(save_dir), tag)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(tag)
    empty = stage == 3
    module: dict[str, torch.Tensor] = dict(buffers)
    for n, t in [*params.items(), *frozen.items()]:
        lp = t.to(dtype)
        module[n] = torch.empty(0, dtype=dtype) if empty else lp
    for alias, target in tied.items():
        module[alias] = module[target]
    shapes = [OrderedDict((n, params[n].shape) for n in g) for g in groups]
    parts: list[list[torch.Tensor]] = [[] for _ in range(ws)]
    paddings: list[list[int]] = [[] for _ in range(ws)]
    fulls: list[list[torch.Tensor]] = [[] for _ in range(ws)]  # stage 1/2, padding included
    for g in groups:
        if stage == 3:
            for r in range(ws):
                pieces = []
                for n in g:
                    flat, c = params[n].reshape(-1), -(-params[n].numel() // ws)
                    pieces.append(_pad(flat[r * c : (r + 1) * c], c))
                parts[r].append(_flat(pieces))
            continue
        flat = _flat([params[n] for n in g])
        size = -(-flat.numel() // (alignment * ws)) * alignment * ws
        padded, p = _pad(flat, size), size // ws
        pad = size - flat.numel()
        for r in range(ws):
            # DeepSpeed strips the padding from the last rank only, with Python slicing: when
            # it spans more than that partition, the "lean" length is negative.
            part = padded[r * p : (r + 1) * p]
            parts[r].append(part[: p - pad].clone() if r == ws - 1 else part.clone())
            paddings[r].append(pad if r == ws - 1 else 0)
            fulls[r].append(part)
    for r in range(ws):
        fragments: dict[str, torch.Tensor] | None = None
        if stage == 2:
            fragments = dict(frozen)
        elif stage == 3:
            fragments = {}
            for n, t in frozen.items():
                c = -(-t.numel() // ws)
                fragments[n] = _pad(t.reshape(-1)[r * c : (r + 1) * c], c)
        model = {
            "module": module,
            "buffer_names": list(buffers),
            "optimizer": None,
            "param_shapes": shapes,
            "frozen_param_shapes": None if stage == 1 else {n: t.shape for n, t in frozen.items()},
            "shared_params": tied if r == 0 else {},
            "frozen_param_fragments": fragments,
            "lr_scheduler": {"last_batch_iteration": 0},
            "global_steps": 1,
            "dp_world_size": ws,
            "mp_world_size": 1,
            "ds_version": "0.19.8",
            "epoch": 1,
        }
        if stage == 3:
            torch.save(model, os.path.join(d, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
        elif r == 0:
            torch.save(model, os.path.join(d, "mp_rank_00_model_states.pt"))
        prefix = "bf16_" if dtype == torch.bfloat16 else ""
        osd: dict[str, Any] = {"zero_stage": stage, "dynamic_loss_scale": False}
        if stage == 3:
            osd.update(
                optimizer_state_dict=_opt_state(parts[r], 1e-3),
                fp32_flat_groups=parts[r],
                partition_count=ws,
            )
        else:
            osd.update(
                base_optimizer_state=_opt_state(fulls[r], 1e-3),
                single_partition_of_fp32_groups=parts[r],
                group_paddings=paddings[r],
                partition_count=[ws] * len(groups),
            )
        name = f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        torch.save({"optimizer_state_dict": osd, "ds_version": "0.19.8"}, os.path.join(d, name))
