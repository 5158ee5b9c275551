"""What a DeepSpeed checkpoint holds, in the terms ``zckpt inspect`` uses for its own.

``zckpt inspect`` describes a DeepSpeed checkpoint with the same keys as a zckpt one: its
tensors are those ``zckpt convert --from deepspeed`` would store, under the same paths
(``module/...``, ``master/...``, ``optimizer/state/<param>/<key>``), found from the files'
records alone (shapes, dtypes, names), without assembling a tensor. ``tests/test_cli_inspect.py``
holds this to what ``convert`` actually writes, on every DeepSpeed fixture.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from zckpt.interop import DeepSpeedCheckpoint, DeepSpeedFormatError, group_layouts
from zckpt.interop._convert import training_scalars
from zckpt.interop._deepspeed import fp32_sources
from zckpt.interop._unpickle import get
from zckpt.tree import _alias_key, flatten, format_path

__all__ = ["DeepSpeedFiles", "DeepSpeedTensors", "deepspeed_files", "deepspeed_tensors"]

#: A file named for one data-parallel rank (``[bf16_]zero_pp_rank_<r>_mp_rank_00_*.pt``).
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_\d+_")


class DeepSpeedFiles(NamedTuple):
    """A DeepSpeed checkpoint's files, counted as ``inspect`` counts a zckpt checkpoint's.

    ``rank`` are one data-parallel rank's (``*zero_pp_rank_<r>_*``: its optimizer partition
    and, at stage 3, its model states), ``expert`` one MoE expert's
    (``layer_<l>_expert_<e>_*``), ``shared`` the rest, read by every rank (stage 1/2's
    ``mp_rank_00_model_states.pt``, a universal checkpoint's ``zero/`` files).

    Example:
        >>> DeepSpeedFiles(3, 2, 0, 1, 1000).files
        3
    """

    files: int
    rank: int
    expert: int
    shared: int
    nbytes: int


def deepspeed_files(ck: DeepSpeedCheckpoint) -> DeepSpeedFiles:
    """Count ``ck.files`` (what ``verify`` loads) by kind, and their size.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop import open_deepspeed
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.ones(4)}, world_size=2, stage=2)
        >>> deepspeed_files(open_deepspeed(d))[:4]
        (3, 2, 0, 1)
    """
    experts = {e.path for e in ck.experts}
    rank = expert = 0
    for f in ck.files:
        if f in experts:
            expert += 1
        elif _RANK_FILE.search(os.path.basename(f)):
            rank += 1
    nbytes = sum(os.path.getsize(f) for f in ck.files)
    n = len(ck.files)
    return DeepSpeedFiles(n, rank, expert, n - rank - expert, nbytes)


class DeepSpeedTensors(NamedTuple):
    """What ``convert`` would store: ``tensors`` as ``(path, dtype, shape, stored bytes)``,
    ``tied`` as ``{alias path: stored path}`` and the ``frozen`` parameter names.

    Example:
        >>> DeepSpeedTensors([], {}, []).tied
        {}
    """

    tensors: list[tuple[str, torch.dtype, tuple[int, ...], int]]
    tied: dict[str, str]
    frozen: list[str]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def deepspeed_tensors(ck: DeepSpeedCheckpoint) -> DeepSpeedTensors:
    """The tensors, ties and frozen names of ``convert``'s training state for ``ck``, from
    metadata: the order, paths, dtypes and shapes ``convert`` writes.

    ``stored`` is what the DeepSpeed files hold of each tensor: its bytes, except stage 3's
    16-bit trainable weights, which DeepSpeed does not save (``convert`` rounds the masters).

    Raises:
        DeepSpeedFormatError: the files' records disagree (the file is named).

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop import open_deepspeed
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.ones(4)}, world_size=2, stage=2)
        >>> [t[0] for t in deepspeed_tensors(open_deepspeed(d)).tensors][:2]
        ['module/w', 'master/w']
    """
    m0, f0 = ck.model[0], ck.model_files[0]
    saved = get(m0, "module", f0, Mapping)
    shared = {str(a): str(t) for a, t in dict(m0.get("shared_params") or {}).items()}
    buffers = set(m0.get("buffer_names") or ())
    layouts = group_layouts(ck)
    masters = {n: tuple(s) for lay in layouts for n, s in lay.shapes.items()}
    rows: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
    tied: dict[str, str] = {}

    # module: as saved (and the experts' files); stage 3 saves no 16-bit weights.
    module: dict[str, tuple[torch.dtype, tuple[int, ...], int, Any]] = {}
    if ck.stage == 3:
        skel, _, entries = fp32_sources(ck, zero_to_fp32_compat=True)
        full = {e.name: (e.dtype, tuple(skel.tensors[e.source].shape)) for e in entries}
        for name, t in saved.items():
            if name in shared and shared[name] in module:
                tied[format_path(("module", name))] = format_path(("module", shared[name]))
                continue
            if name not in full:
                raise DeepSpeedFormatError(f"{f0}: module entry '{name}' is in no file's records")
            dtype, shape = full[name]
            # convert keeps the fp32 state dict's own tensor where the dtypes agree: an fp32
            # run's module weights are then its masters (one tensor, two paths).
            same = dtype == t.dtype
            # (the 16-bit copy of a trainable weight is not saved; an fp32 one is its master)
            stored = 0 if name in masters and not same else _nbytes(t.dtype, shape)
            module[name] = (t.dtype, shape, stored, ("full", name) if same else None)
    else:
        for name, t in saved.items():
            module[name] = (t.dtype, tuple(t.shape), t.numel() * t.element_size(), _alias_key(t))
    for e in ck.experts:
        for name, t in e.state.items():
            module[name] = (t.dtype, tuple(t.shape), t.numel() * t.element_size(), _alias_key(t))
    first: dict[Any, str] = {}
    for name, (dtype, shape, stored, key) in module.items():
        path = format_path(("module", name))
        if key is not None and key in first:
            tied[path] = first[key]
            continue
        if key is not None:
            first[key] = path
        rows.append((path, dtype, shape, stored))

    # master: the trainable parameters' fp32 weights.
    for name, shape in masters.items():
        path = format_path(("master", name))
        if ck.stage == 3 and ("full", name) in first:
            tied[path] = first[("full", name)]
            continue
        rows.append((path, torch.float32, shape, _nbytes(torch.float32, shape)))

    # optimizer/state/<param>/<key>: each key, sorted, cut per parameter.
    key = "optimizer_state_dict" if ck.stage == 3 else "base_optimizer_state"
    of0 = ck.optim_files[0]
    base = get(ck.optim[0], key, of0, Mapping)
    state0 = get(base, "state", f"{of0}: {key}", Mapping)
    states = [get(state0, g, f"{of0}: {key}/state", Mapping) for g in range(len(layouts))]
    per_param: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]] = {n: [] for n in masters}
    for k in sorted({k for st in states for k in st}):
        values = [st.get(k) for st in states]
        flat = [v for v in values if isinstance(v, torch.Tensor) and v.dim() == 1]
        if flat:
            for name, shape in masters.items():
                per_param[name].append((str(k), flat[0].dtype, shape))
            continue
        for lay in layouts:
            v = values[lay.group]
            if isinstance(v, torch.Tensor):
                for name in lay.shapes:
                    per_param[name].append((str(k), v.dtype, tuple(v.shape)))
    for name, keys in per_param.items():
        for k, dtype, shape in keys:
            rows.append((format_path(("optimizer", "state", name, k)), dtype, shape,
                         _nbytes(dtype, shape)))  # fmt: skip

    # the rest of the state convert writes, as it writes it (small: no partitions).
    skel, _ = flatten(training_scalars(ck))
    for p, leaf in skel.tensor_paths():
        path = format_path(p)
        if p != skel.paths[leaf]:
            tied[path] = skel.name(leaf)
            continue
        meta = skel.tensors[leaf]
        rows.append((path, meta.dtype, tuple(meta.shape), meta.nbytes))

    frozen = [n for n in saved if n not in masters and n not in buffers and n not in shared]
    return DeepSpeedTensors(rows, tied, frozen)
