"""DeepSpeed universal checkpoints (``ds_to_universal``'s output), read as DeepSpeed checkpoints.

The layout DeepSpeed 0.19 writes (``P``: a trainable parameter's name)::

    <save_dir>/latest_universal                         the tag, as text
    <save_dir>/<tag>/mp_rank_00_model_states.pt         stage 1/2: the source checkpoint's, copied
    <save_dir>/<tag>/zero_pp_rank_R_mp_rank_00_model_states.pt     stage 3: copied, one per rank
    <save_dir>/<tag>/zero/optimizer_state.pt            zero_stage, loss scaler, partition_count,
                                                        param_groups (stage 3: rank 0's whole
                                                        optimizer_state_dict besides)
    <save_dir>/<tag>/zero/P/fp32.pt                     the fp32 master, whole: {'param': tensor,
                                                        'cat_dim': 0} (stage 3: a flat tensor)
    <save_dir>/<tag>/zero/P/exp_avg.pt, exp_avg_sq.pt   its optimizer state, the same way
    <save_dir>/<tag>/zero/P/step.pt                     stage 1/2: its param group's step

Stage 1/2 output also has ``zero/<name>/fp32.pt`` for every other module entry (tied aliases,
frozen parameters, buffers: upcast to fp32, integer buffers too). DeepSpeed's loader never reads
them, nor does zckpt: those values are in the copied model states, in their saved dtype.

:func:`zckpt.interop.open_deepspeed` opens a universal tag directory into the same
:class:`~zckpt.interop.DeepSpeedCheckpoint` as any other: the model states as usual, the stage
and world size of the run that saved it, and in place of the per-rank optimizer files one record
in the same form (``optim[0]``, built by :func:`optimizer_record`). Its ``universal`` field holds
the per-parameter tensors (:class:`UniversalFiles`); a param group's partitions are then its
parameters' own tensors, one each, and the same layout and assembly code builds the fp32 state
dict and the whole training state. Every file is loaded through the same pickle allow-list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zckpt.interop._moe import is_expert_group
from zckpt.interop._unpickle import DeepSpeedFormatError, get, load_pickle

if TYPE_CHECKING:
    import torch

__all__ = [
    "LATEST_UNIVERSAL",
    "OPTIMIZER_STATE",
    "UniversalFiles",
    "is_universal",
    "load_universal",
    "optimizer_record",
    "universal_world_size",
]

#: The pointer file DeepSpeed's universal loader reads (``load_universal: true``).
LATEST_UNIVERSAL = "latest_universal"
#: The optimizer's global state, relative to a universal tag directory.
OPTIMIZER_STATE = os.path.join("zero", "optimizer_state.pt")
_MASTER = "fp32"
_STEP = "step"
_STAGE3_KEYS = (_MASTER, "exp_avg", "exp_avg_sq")  # all DeepSpeed's stage 3 loader reads


def is_universal(tag_dir: str | os.PathLike[str]) -> bool:
    """Whether ``tag_dir`` has a universal checkpoint's ``zero/optimizer_state.pt``.

    Example:
        >>> import tempfile
        >>> is_universal(tempfile.mkdtemp())
        False
    """
    return os.path.isfile(os.path.join(os.fspath(tag_dir), OPTIMIZER_STATE))


@dataclass(frozen=True, eq=False)
class UniversalFiles:
    """A universal checkpoint's ``zero/`` folder, loaded: each trainable parameter's tensors.

    ``groups[g]`` names param group ``g``'s parameters (``param_shapes`` order);
    ``tensors[name][key]`` is parameter ``name``'s ``key`` (``"fp32"``: its master, or an
    optimizer state such as ``"exp_avg"``), flat, a view of the memory-mapped file;
    ``steps[name]`` its ``step.pt`` (stage 1/2); ``files`` every file loaded.

    Example:
        >>> import tempfile, torch
        >>> z = os.path.join(tempfile.mkdtemp(), "zero")
        >>> os.makedirs(f"{z}/w")
        >>> for key in ("fp32", "exp_avg", "exp_avg_sq"):
        ...     torch.save({"param": torch.ones(2, 3), "cat_dim": 0}, f"{z}/w/{key}.pt")
        >>> torch.save(torch.tensor(3.0), f"{z}/w/step.pt")
        >>> u = load_universal(z, [{"w": (2, 3)}], stage=2)
        >>> u.keys(0), u.step(0).item(), [t.shape for t in u.partitions()[0]]
        (('exp_avg', 'exp_avg_sq'), 3.0, [torch.Size([6])])
    """

    path: str
    groups: tuple[tuple[str, ...], ...]
    tensors: Mapping[str, Mapping[str, torch.Tensor]]
    steps: Mapping[str, Any]
    files: tuple[str, ...]

    def keys(self, group: int) -> tuple[str, ...]:
        """Param group ``group``'s optimizer state keys (every key but the master), sorted."""
        names = self.groups[group]
        return tuple(sorted(k for k in self.tensors[names[0]] if k != _MASTER)) if names else ()

    def partitions(self, key: str | None = None) -> list[list[torch.Tensor]]:
        """``[group][i]``: the masters (or ``key``'s tensors) of each group's parameters, flat.

        Raises:
            DeepSpeedFormatError: a parameter has no ``key`` file (the file is named).
        """
        key = key or _MASTER
        out = []
        for names in self.groups:
            row = []
            for name in names:
                t = self.tensors[name].get(key)
                if t is None:
                    path = os.path.join(self.path, name, f"{key}.pt")
                    raise DeepSpeedFormatError(f"{path}: missing (parameter '{name}' has no {key})")
                row.append(t)
            out.append(row)
        return out

    def step(self, group: int) -> Any:
        """Param group ``group``'s step (stage 1/2: from ``step.pt``), or None when none was
        saved; every parameter of the group must agree, as DeepSpeed's loader asserts.

        Raises:
            DeepSpeedFormatError: some of the group's parameters have a step and others do not,
                or they differ (the files are named).
        """
        names = self.groups[group]
        have = [n for n in names if n in self.steps]
        if not have:
            return None
        first = self.steps[have[0]]
        where = os.path.join(self.path, have[0], f"{_STEP}.pt")
        for n in names:
            other = os.path.join(self.path, n, f"{_STEP}.pt")
            if n not in self.steps:
                raise DeepSpeedFormatError(
                    f"{other}: missing, but {where} exists (param group {group})"
                )
            if not _same(self.steps[n], first):
                raise DeepSpeedFormatError(
                    f"{other}: step {_show(self.steps[n])}, but {where} has {_show(first)}: the "
                    f"steps of param group {group} differ"
                )
        return first


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and bool(torch.equal(a, b))
    return type(a) is type(b) and bool(a == b)


def _show(v: Any) -> str:
    import torch

    return str(v.item()) if isinstance(v, torch.Tensor) else repr(v)


def _check_name(name: str, zero_dir: str) -> None:
    # The name becomes a path under zero/: never let a crafted one leave it.
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise DeepSpeedFormatError(
            f"{zero_dir}: parameter name {name!r} cannot name a folder of a universal checkpoint"
        )


def _tensor(v: Any, path: str, numel: int, name: str) -> torch.Tensor:
    import torch

    if isinstance(v, Mapping):
        if v.get("is_expert_param"):
            raise DeepSpeedFormatError(
                f"{path}: an MoE expert parameter of a universal checkpoint; not supported"
            )
        v = get(v, "param", path, torch.Tensor)
    if not isinstance(v, torch.Tensor):
        raise DeepSpeedFormatError(
            f"{path}: holds a {type(v).__name__}, not a tensor or {{'param': tensor}}"
        )
    if v.numel() != numel:
        raise DeepSpeedFormatError(
            f"{path}: {v.numel()} elements, but param_shapes gives '{name}' {numel}"
        )
    return v.reshape(-1)


def _step(v: Any, path: str) -> Any:
    import torch

    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v
    if isinstance(v, int | float) and not isinstance(v, bool):
        return v
    raise DeepSpeedFormatError(f"{path}: holds a {type(v).__name__}, not a step (a scalar)")


def load_universal(
    zero_dir: str | os.PathLike[str],
    shapes: Sequence[Mapping[str, Sequence[int]]],
    stage: int,
) -> UniversalFiles:
    """Load the ``zero/<name>/*.pt`` files of every trainable parameter (``shapes``: the model
    states' ``param_shapes``), each through the pickle allow-list, checked against its shape.

    Stage 1/2 reads every ``*.pt`` file of a parameter's folder, as DeepSpeed's loader does
    (``fp32`` required, ``step`` the param group's step); stage 3 reads ``fp32``, ``exp_avg`` and
    ``exp_avg_sq``, all DeepSpeed's stage 3 loader reads. Folders of anything else are not read.

    Raises:
        DeepSpeedFormatError: a folder or file missing, a tensor of the wrong size, the
            parameters of one param group with different keys (the file is named).
        UnsafePickleError: a file references a type outside the allow-list.

    Example:
        >>> import tempfile
        >>> load_universal(tempfile.mkdtemp(), [{"w": (2,)}], stage=1)
        Traceback (most recent call last):
        ...
        zckpt.interop._unpickle.DeepSpeedFormatError: /tmp/.../w: missing: no files for ...
    """
    zero_dir = os.fspath(zero_dir)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    steps: dict[str, Any] = {}
    files: list[str] = []
    for g, group in enumerate(shapes):
        for name, shape in group.items():
            _check_name(name, zero_dir)
            folder = os.path.join(zero_dir, name)
            if name in tensors:
                raise DeepSpeedFormatError(f"{folder}: '{name}' is in two param groups")
            if not os.path.isdir(folder):
                raise DeepSpeedFormatError(
                    f"{folder}: missing: no files for trainable parameter '{name}' "
                    f"(param group {g})"
                )
            if stage == 3:
                keys: Sequence[str] = _STAGE3_KEYS
            else:
                try:
                    listed = os.listdir(folder)
                except OSError as e:
                    raise DeepSpeedFormatError(f"{folder}: cannot list ({e})") from None
                keys = sorted(n[: -len(".pt")] for n in listed if n.endswith(".pt"))
            if _MASTER not in keys:
                raise DeepSpeedFormatError(
                    f"{os.path.join(folder, _MASTER + '.pt')}: missing (the fp32 master of "
                    f"'{name}')"
                )
            numel = 1
            for s in shape:
                numel *= int(s)
            tensors[name] = {}
            for key in keys:
                path = os.path.join(folder, f"{key}.pt")
                if not os.path.lexists(path):
                    raise DeepSpeedFormatError(f"{path}: missing")
                v = load_pickle(path)
                files.append(path)
                if key == _STEP:
                    steps[name] = _step(v, path)
                else:
                    tensors[name][key] = _tensor(v, path, numel, name)
        _same_keys(zero_dir, list(group), tensors, g)
    return UniversalFiles(
        zero_dir, tuple(tuple(group) for group in shapes), tensors, steps, tuple(files)
    )


def _same_keys(zero_dir: str, names: list[str], tensors: Mapping[str, Any], g: int) -> None:
    # DeepSpeed's loader assumes "all params in the same param_group have the same keys".
    if not names:
        return
    want = set(tensors[names[0]])
    for n in names[1:]:
        for key in sorted(want ^ set(tensors[n])):
            lacking = n if key in want else names[0]
            raise DeepSpeedFormatError(
                f"{os.path.join(zero_dir, lacking, key + '.pt')}: missing, but other parameters "
                f"of param group {g} have a {key}"
            )


def universal_world_size(saved: Mapping[str, Any], stage: int, where: str) -> int:
    """The data-parallel world size of the run a universal checkpoint came from, from
    ``optimizer_state.pt``'s ``partition_count`` (stage 3: an int; 1/2: one per param group).

    Raises:
        DeepSpeedFormatError: no usable ``partition_count``, or param groups partitioned over
            different numbers of ranks (MoE and hierarchical partitioning are not supported).

    Example:
        >>> universal_world_size({"partition_count": [2, 2]}, 2, "optimizer_state.pt")
        2
    """
    pc = saved.get("partition_count")
    counts = [pc] if stage == 3 else pc
    if not isinstance(counts, list) or not counts:
        raise DeepSpeedFormatError(f"{where}: 'partition_count' is {pc!r}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise DeepSpeedFormatError(f"{where}: 'partition_count' is {pc!r}")
    if len(set(counts)) != 1:
        raise DeepSpeedFormatError(
            f"{where}: param groups partitioned over {counts} ranks (MoE or hierarchical "
            "partitioning); not supported for universal checkpoints"
        )
    return int(counts[0])


def optimizer_record(
    saved: Mapping[str, Any], files: UniversalFiles, stage: int, where: str
) -> dict[str, Any]:
    """``optimizer_state.pt`` in the form of a regular checkpoint's ``optimizer_state_dict``.

    The base optimizer's record (``base_optimizer_state``, stage 3 ``optimizer_state_dict``)
    gets ``param_groups`` as saved and, per param group, its step and one placeholder per
    optimizer state key: an empty 1-D tensor, saying the key is laid out like the masters;
    its values are each parameter's own tensor (:meth:`UniversalFiles.partitions`). Stage 3's
    step is rank 0's, per group, as saved (DeepSpeed's loader gives every group group 0's, and
    group 0's hyperparameters too); its flat partitions are left out (they are rank 0's only).

    Raises:
        DeepSpeedFormatError: missing or inconsistent records (``where`` names the file);
            an MoE expert param group (not supported).

    Example:
        >>> import torch
        >>> u = UniversalFiles("zero", (("w",),), {"w": {"fp32": torch.ones(2),
        ...                    "exp_avg": torch.ones(2)}}, {"w": torch.tensor(3.0)}, ())
        >>> rec = optimizer_record({"zero_stage": 2, "param_groups": [{"lr": 0.1}]}, u, 2, "f")
        >>> sorted(rec["base_optimizer_state"]["state"][0]), rec["zero_stage"]
        (['exp_avg', 'step'], 2)
    """
    import torch

    n = len(files.groups)
    if stage == 3:
        inner = get(saved, "optimizer_state_dict", where, Mapping)
        at = f"{where}: optimizer_state_dict"
        groups = get(inner, "param_groups", at, list)
        state0 = get(inner, "state", at, Mapping)
        saved_state = [get(state0, g, f"{at}/state", Mapping) for g in range(n)]
    else:
        groups = get(saved, "param_groups", where, list)
        saved_state = [{} for _ in range(n)]
    if len(groups) != n:
        raise DeepSpeedFormatError(
            f"{where}: {len(groups)} param_groups, but param_shapes has {n} groups"
        )
    for g, pg in enumerate(groups):
        if not isinstance(pg, Mapping):
            raise DeepSpeedFormatError(f"{where}: param_groups[{g}] is not a mapping")
        if is_expert_group(pg):
            raise DeepSpeedFormatError(
                f"{where}: param group {g} is an MoE expert group; MoE universal checkpoints "
                "are not supported"
            )
    state: dict[int, dict[str, Any]] = {}
    for g in range(n):
        entry = {
            k: v
            for k, v in saved_state[g].items()
            if not (isinstance(v, torch.Tensor) and v.dim() == 1)
        }
        step = files.step(g)
        if step is not None:
            entry[_STEP] = step
        entry.update({k: torch.empty(0) for k in files.keys(g)})
        state[g] = entry
    key = "optimizer_state_dict" if stage == 3 else "base_optimizer_state"
    drop = {"optimizer_state_dict", "param_groups", "fp32_flat_groups"}
    record = {k: v for k, v in saved.items() if k not in drop}
    record[key] = {"state": state, "param_groups": list(groups)}
    return record
