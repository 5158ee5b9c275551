"""get_fp32_state_dict_from_zero_checkpoint: the module's fp32 weights, streamed or lazy."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zckpt.assemble._keys import Fp32Key, fp32_keys
from zckpt.store._checkpoint import Checkpoint
from zckpt.store._read import (
    CheckpointNotFoundError,
    following_latest,
    locate,
    not_found,
    opened,
)
from zckpt.store._resolve import storage_for
from zckpt.store._storage import LocalStorage, Storage

if TYPE_CHECKING:
    import torch

__all__ = ["LazyTensor", "fp32_keys_of", "get_fp32_state_dict_from_zero_checkpoint"]


@dataclass(frozen=True, eq=False)
class LazyTensor:
    """A tensor read, merged and upcast only when materialised with :meth:`contiguous`.

    Example:
        >>> import torch
        >>> t = LazyTensor((2,), torch.float32, lambda: torch.zeros(2))
        >>> t.shape, t.contiguous().tolist()
        (torch.Size([2]), [0.0, 0.0])
    """

    _shape: tuple[int, ...]
    dtype: torch.dtype
    _load: Callable[[], torch.Tensor]

    @property
    def shape(self) -> torch.Size:
        """The tensor's shape (known without reading anything)."""
        import torch

        return torch.Size(self._shape)

    def size(self) -> torch.Size:
        """Same as :attr:`shape`."""
        return self.shape

    def contiguous(self) -> torch.Tensor:
        """Read and return the tensor (each call reads it anew; nothing is cached)."""
        return self._load()

    materialize = contiguous


def get_fp32_state_dict_from_zero_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
    lazy_mode: bool = False,
    *,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The module's state dict in fp32, rebuilt from every rank's partitions.

    Parameters come from the fp32 master weights when the checkpoint has them (bitwise), else
    from the module weights upcast to fp32; integer buffers keep their dtype; tied parameters
    come back as one shared tensor, so ``model.load_state_dict`` accepts the result. Memory:
    the output plus at most one tensor's read buffer; with ``lazy_mode`` only what you
    materialise, one tensor at a time.

    Also reads checkpoints DeepSpeed wrote (stages 1-3, detected by their files) and
    directories that PyTorch DCP wrote (:func:`~zckpt.interop.is_dcp_checkpoint`: the tensors
    under its ``model`` key, or all of them when it has none; 16-bit ones upcast;
    ``interop/_dcp_fp32.py``),
    neither running their pickles' code. Those two at a URL are copied to a private local
    directory first, removed when the call returns (with ``lazy_mode``, when the last
    :class:`LazyTensor` is gone): see ``interop/_staged.py``.

    Args:
        checkpoint_dir: a ``save_dir`` (tag from ``tag`` or ``latest``) or a tag directory.
        tag: which tag.
        exclude_frozen_parameters: leave out parameters recorded as frozen at save.
        lazy_mode: return :class:`LazyTensor` values; ``.contiguous()`` reads one.
        storage: the filesystem (default: local files, or the fsspec filesystem of a URL).
        storage_options: options for a URL's fsspec filesystem.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> w = torch.randn(4, 3)
        >>> s = {"module": {"w": w.bfloat16()}, "master": {"w": w}}
        >>> _ = zckpt.save_checkpoint(d, s, zckpt.ZeroSpec(4, 2), tag="t")
        >>> torch.equal(zckpt.get_fp32_state_dict_from_zero_checkpoint(d)["w"], w)
        True
    """
    storage, path = storage_for(checkpoint_dir, storage, storage_options)
    if isinstance(storage, LocalStorage):  # DeepSpeed and DCP folders are read as local files
        foreign = _local_foreign(path, tag, exclude_frozen_parameters, lazy_mode)
        if foreign is not None:
            return foreign
    try:
        return _zckpt_fp32(storage, path, tag, exclude_frozen_parameters, lazy_mode)
    except CheckpointNotFoundError:
        if isinstance(storage, LocalStorage):
            raise
        from zckpt.interop._staged import staged  # a DeepSpeed or DCP one there? Copied here

        with staged(storage, path, tag) as copy:
            if copy is None:
                raise
            got = get_fp32_state_dict_from_zero_checkpoint(
                copy.local, tag, exclude_frozen_parameters, lazy_mode
            )
            return copy.keep_for(got) if lazy_mode else got


def _zckpt_fp32(
    storage: Storage, path: str, tag: str | None, exclude_frozen_parameters: bool, lazy: bool
) -> dict[str, Any]:
    found = locate(storage, path, tag)  # latest is read here, once
    if found is None:
        raise not_found(path, tag, storage)
    if lazy:
        ck = opened(storage, path, tag, found)
        ck.check_skeleton()
        return _fp32(ck, exclude_frozen_parameters, True)

    def attempt(ck: Checkpoint) -> dict[str, Any]:
        ck.check_skeleton()
        return _fp32(ck, exclude_frozen_parameters, False)

    return following_latest(storage, path, tag, found=found, use=attempt)


def _local_foreign(
    path: str, tag: str | None, exclude_frozen_parameters: bool, lazy_mode: bool
) -> dict[str, Any] | None:
    """The fp32 state dict of the DeepSpeed or DCP checkpoint at the local ``path``; None when
    there is none."""
    # Imported here: zckpt.interop imports this module (LazyTensor).
    from zckpt.interop import deepspeed_fp32_state_dict, is_deepspeed_checkpoint

    if is_deepspeed_checkpoint(path, tag):
        return deepspeed_fp32_state_dict(path, tag, exclude_frozen_parameters, lazy_mode)
    from zckpt.interop._detect import find_dcp

    dcp = find_dcp(path if tag is None else os.path.join(path, tag))
    if dcp is None:
        return None
    from zckpt.interop._dcp_fp32 import dcp_fp32_state_dict  # a DCP checkpoint, or a tag

    return dcp_fp32_state_dict(dcp, lazy_mode)


def fp32_keys_of(ck: Checkpoint, exclude_frozen_parameters: bool = False) -> list[Fp32Key]:
    """The keys of an open zckpt checkpoint's fp32 state dict, from its manifest alone: what
    :func:`get_fp32_state_dict_from_zero_checkpoint` returns, without reading a tensor (or
    importing torch).

    Raises:
        LoadError: the checkpoint has no tensors under the spec's module prefix.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> s = {"module": {"w": torch.ones(2).half()}, "master": {"w": torch.ones(2)}}
        >>> _ = zckpt.save_checkpoint(d, s, zckpt.ZeroSpec(2, 2), tag="t")
        >>> [(k.name, k.dtype_name) for k in fp32_keys_of(zckpt.open_checkpoint(d))]
        [('w', 'float32')]
    """
    m = ck.manifest
    if not any(m.spec.is_module_path(p) for p, _ in m.skeleton.tensor_paths()):
        from zckpt.store._load import LoadError

        raise LoadError(
            f"{ck.path}: the checkpoint has no tensors under '{m.spec.module}' (the module state "
            "dict); use zckpt.load_checkpoint or zckpt.consolidate for other states"
        )
    exclude = frozenset(m.frozen) if exclude_frozen_parameters else frozenset()
    return fp32_keys(m.skeleton, m.spec, exclude)


def _fp32(ck: Checkpoint, exclude_frozen_parameters: bool, lazy_mode: bool) -> dict[str, Any]:
    from zckpt.assemble import Fp32Entry, assemble_fp32, index_sources
    from zckpt.format._dtypes import torch_dtype

    m = ck.manifest
    keys = fp32_keys_of(ck, exclude_frozen_parameters)
    entries = [Fp32Entry(k.name, k.source, torch_dtype(k.dtype_name), k.tied_to) for k in keys]
    index = index_sources(m.skeleton, ck.sources())
    if not lazy_mode:
        return dict(assemble_fp32(index, entries))
    out: dict[str, Any] = {}
    for e in entries:
        if e.tied_to is not None:
            out[e.name] = out[e.tied_to]
            continue
        meta = m.skeleton.tensors[e.source]

        def load(e: Any = e) -> torch.Tensor:
            return dict(assemble_fp32(index, [e]))[e.name]

        out[e.name] = LazyTensor(meta.shape, e.dtype, load)
    return out
