"""Importing a whole DeepSpeed ZeRO training state into a zckpt checkpoint.

DeepSpeed loads its ZeRO 1/2 optimizer state only at the world size that saved it, and stage 3
not at all elsewhere; a converted checkpoint loads at any world size and stage. The state
written is zckpt's usual layout, keyed by parameter name rather than by flat partition:

``module``
    the module state dict in the training dtype (buffers as saved; stage 3, whose files hold
    no 16-bit weights, gets the fp32 masters rounded to it, exactly as DeepSpeed derives them).
``master``
    the fp32 master weights of the trainable parameters.
``optimizer``
    ``state``: per parameter, every optimizer state tensor (``exp_avg``, ``exp_avg_sq``, ...)
    cut out of the flat partitions, and its ``step``; ``param_groups``: the hyperparameters,
    with ``params`` listing parameter names.
``lr_scheduler``, ``global_steps``, ``skipped_steps``, ``global_samples``, ``loss_scaler``
    as DeepSpeed saved them; ``deepspeed``: its config, version, stage, world size, buffer
    names and tied (shared) parameters.

Every other top-level key of DeepSpeed's model states file is the ``client_state`` it merged
in; it becomes the zckpt checkpoint's client_state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from zckpt.assemble import fp32_tensors, index_sources
from zckpt.format._decode import decode_threads
from zckpt.interop._deepspeed import fp32_sources, gather, group_layouts, partitions
from zckpt.interop._files import DeepSpeedCheckpoint, get, open_deepspeed
from zckpt.interop._output import check_disjoint, url_options
from zckpt.interop._staged import foreign_source
from zckpt.interop._unpickle import DeepSpeedFormatError, LossScaler
from zckpt.interop._zipcheck import require_intact
from zckpt.spec import ZeroSpec
from zckpt.store._save import save_checkpoint
from zckpt.store._save_result import Saved

__all__ = ["ENGINE_KEYS", "convert_deepspeed", "deepspeed_training_state"]

#: Top-level keys of DeepSpeed's model states that are the engine's own; the rest is client_state.
ENGINE_KEYS = frozenset(
    {
        "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
        "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
        "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples",
        "dp_world_size", "mp_world_size", "ds_config", "ds_version",
        "checkpoint_parallel_dimensions", "num_experts", "ds_autoep_layers",
        "universal_checkpoint_info", "iteration",
    }
)  # fmt: skip
_EXPERT_PATTERN = r"deepspeed_experts\.(\d+)\."


def _plain(x: Any) -> Any:
    """A value zckpt stores (no pickle): dtypes become their names, stand-ins their attributes."""
    if isinstance(x, torch.dtype):
        return str(x)
    if isinstance(x, LossScaler):
        return {"type": type(x).__name__, **_plain(x.state())}
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    return x


def training_scalars(ck: DeepSpeedCheckpoint) -> dict[str, Any]:
    """The small part of the training state ``convert`` writes besides module, masters and
    optimizer: the scheduler, step counters and loss scaler, as zckpt stores them.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.ones(4)}, world_size=2, stage=2)
        >>> "loss_scaler" in training_scalars(open_deepspeed(d))
        True
    """
    m0, o0 = ck.model[0], ck.optim[0]
    out: dict[str, Any] = {}
    for k in ("lr_scheduler", "global_steps", "skipped_steps", "global_samples"):
        if m0.get(k) is not None:
            out[k] = _plain(m0[k])
    scaler_keys = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")
    out["loss_scaler"] = _plain({k: o0[k] for k in scaler_keys if k in o0})
    return out


def _optimizer(ck: DeepSpeedCheckpoint, layouts: Any) -> dict[str, Any]:
    key = "optimizer_state_dict" if ck.stage == 3 else "base_optimizer_state"
    f0 = ck.optim_files[0]
    base = get(ck.optim[0], key, f0, Mapping)
    groups = get(base, "param_groups", f"{f0}: {key}", list)
    state0 = get(base, "state", f"{f0}: {key}", Mapping)
    if len(groups) != len(layouts):
        raise DeepSpeedFormatError(f"{f0}: {len(groups)} param_groups, {len(layouts)} in shapes")
    per_param: dict[str, dict[str, Any]] = {n: {} for lay in layouts for n in lay.shapes}
    states = [get(state0, g, f"{f0}: {key}/state", Mapping) for g in range(len(layouts))]
    for k in sorted({k for st in states for k in st}):
        values = [st.get(k) for st in states]
        if any(isinstance(v, torch.Tensor) and v.dim() == 1 for v in values):
            # Laid out like the flat fp32 partitions (padding included for stage 1/2).
            for name, t in gather(ck, layouts, partitions(ck, k)).items():
                per_param[name][k] = t
            continue
        for lay in layouts:  # per-group scalars (Adam's step): every parameter gets its own
            v = values[lay.group]
            for name in lay.shapes:
                per_param[name][k] = v.clone() if isinstance(v, torch.Tensor) else _plain(v)
    pgs = []
    for lay, pg in zip(layouts, groups):
        pgs.append({**_plain({k: v for k, v in pg.items() if k != "params"}),
                    "params": list(lay.shapes)})  # fmt: skip
    return {"state": per_param, "param_groups": pgs}


def _module(ck: DeepSpeedCheckpoint, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 16-bit module state dict; ``full`` is the fp32 state dict (frozen ones 16-bit)."""
    m0, f0 = ck.model[0], ck.model_files[0]
    saved = get(m0, "module", f0, Mapping)
    experts = {k: v for e in ck.experts for k, v in e.state.items()}
    if ck.stage != 3:
        return {**saved, **experts}
    module: dict[str, torch.Tensor] = {}
    shared = dict(m0.get("shared_params") or {})
    for name, t in saved.items():
        if name in shared and shared[name] in module:
            module[name] = module[shared[name]]
        elif name not in full:
            raise DeepSpeedFormatError(f"{f0}: module entry '{name}' is in no file's records")
        else:  # stage 3 saves no 16-bit weights: DeepSpeed's are its masters rounded
            module[name] = full[name].to(t.dtype) if full[name].dtype != t.dtype else full[name]
    return {**module, **experts}


def deepspeed_training_state(
    ck: DeepSpeedCheckpoint,
) -> tuple[dict[str, Any], ZeroSpec, list[str], dict[str, Any]]:
    """``(state, spec, frozen, client_state)``: the whole training state of a DeepSpeed
    checkpoint, keyed by parameter name, and the spec it was partitioned with.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.ones(3)}, world_size=2, stage=2)
        >>> state, spec, frozen, client = deepspeed_training_state(open_deepspeed(d))
        >>> sorted(state["optimizer"]["state"]["w"]), spec.world_size, client
        (['exp_avg', 'exp_avg_sq', 'step'], 2, {'epoch': 1})
    """
    m0, f0 = ck.model[0], ck.model_files[0]
    layouts = group_layouts(ck)
    skel, sources, entries = fp32_sources(ck, zero_to_fp32_compat=True)
    full = fp32_tensors(index_sources(skel, sources), entries, decode_threads())
    masters = {n: full[n] for lay in layouts for n in lay.shapes}
    saved = get(m0, "module", f0, Mapping)
    buffers = list(m0.get("buffer_names") or ())
    shared = dict(m0.get("shared_params") or {})
    frozen = [n for n in saved if n not in masters and n not in buffers and n not in shared]
    state: dict[str, Any] = {
        "module": _module(ck, full),
        "master": masters,
        "optimizer": _optimizer(ck, layouts),
    }
    state.update(training_scalars(ck))
    state["deepspeed"] = _plain({
        "ds_version": m0.get("ds_version"), "ds_config": m0.get("ds_config"),
        "zero_stage": ck.stage, "dp_world_size": ck.world_size, "buffer_names": buffers,
        "shared_params": shared, "frozen": frozen,
    })  # fmt: skip
    experts = [lay for lay in layouts if any("deepspeed_experts." in n for n in lay.shapes)]
    ep = 1
    if ck.experts and experts:
        ep = ck.world_size // int(get(ck.optim[0], "partition_count", f0, list)[experts[0].group])
    spec = ZeroSpec(
        ck.world_size,
        ck.stage,
        param_groups=tuple(tuple(lay.shapes) for lay in layouts),
        experts=(_EXPERT_PATTERN,) if ck.experts else (),
        expert_parallel_size=ep,
    )
    client = {str(k): v for k, v in ck.model[0].items() if k not in ENGINE_KEYS}
    return state, spec, frozen, _plain(client)


def convert_deepspeed(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    tag: str | None = None,
    *,
    codec: str = "raw",
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Saved:
    """Import a DeepSpeed ZeRO checkpoint (the whole training state) as a zckpt checkpoint.

    The result loads at any world size and stage with :func:`zckpt.load_checkpoint`; its tag is
    DeepSpeed's. See the module docstring for the layout.

    Args:
        src_dir: DeepSpeed save_dir (tag from ``tag`` or ``latest``) or tag directory.
        dst_dir: the zckpt save_dir to write.
        tag: the DeepSpeed tag.
        codec: zckpt codec (``"raw"``, ``"zstd"``, ``"byteplane"``).
        overwrite: replace an existing tag in ``dst_dir``.
        storage_options: options for the fsspec filesystem of whichever of ``src_dir`` and
            ``dst_dir`` is a URL. A DeepSpeed checkpoint at a URL is copied to a private local
            directory first (``interop/_staged.py``), removed when the call returns.

    Raises:
        zckpt.interop._output.OutputPathError: ``dst_dir`` is ``src_dir``, lies inside it or
            contains it (it would write into DeepSpeed's own folders); nothing is written.
        DeepSpeedFormatError: a record of the DeepSpeed files does not match its zip CRC-32
            (every one is read and checked first: the converted checkpoint's own checksums
            would otherwise vouch for the flipped bits); nothing is written.

    Example:
        >>> import tempfile, torch, zckpt
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> w = torch.randn(7)
        >>> write_zero_checkpoint(src, {"w": w}, world_size=2, stage=1)
        >>> convert_deepspeed(src, dst).tag
        'step1'
        >>> got = zckpt.load_checkpoint(dst, world_size=3, rank=0)
        >>> torch.equal(got.state["master"]["w"], w[:4]), got.client_state
        (True, {'epoch': 1})
    """
    check_disjoint(src_dir, dst_dir)
    src_options, dst_options = url_options(src_dir, dst_dir, storage_options)
    with foreign_source(src_dir, tag, src_options) as local:
        ck = open_deepspeed(local, tag)
        require_intact(ck.files)  # converted, a flipped bit would get a checksum of its own
        state, spec, frozen, client = deepspeed_training_state(ck)
    return save_checkpoint(
        dst_dir, state, spec, tag=ck.tag, client_state=client, frozen=frozen, codec=codec,
        overwrite=overwrite, exclude_frozen_parameters=excluded_frozen(ck),
        storage_options=dst_options,
    )  # fmt: skip


def excluded_frozen(ck: DeepSpeedCheckpoint) -> bool:
    """Whether DeepSpeed saved ``ck`` with ``exclude_frozen_parameters=True``.

    Stage 2 and 3 record ``frozen_param_shapes`` (empty when nothing is frozen) unless frozen
    parameters were excluded, when it is None; DeepSpeed records no names then. Stage 1 records
    none either way (its frozen parameters are in ``module``, or were excluded from it).
    The converted checkpoint says "frozen parameters excluded", so a strict load accepts the
    destination model's frozen parameters as missing, as for zckpt's own such checkpoints.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.ones(3)}, world_size=2, stage=2)
        >>> excluded_frozen(open_deepspeed(d))
        False
    """
    return ck.stage >= 2 and ck.model[0].get("frozen_param_shapes", {}) is None
