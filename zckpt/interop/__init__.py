"""Interoperability: reading DeepSpeed ZeRO checkpoints and PyTorch DCP checkpoints without
DeepSpeed and without running their pickles' code.

DeepSpeed's files are ``torch.save`` pickles; :func:`load_pickle` loads them with
``weights_only=True`` and an allow-list of the four DeepSpeed types they hold (inert stand-ins;
DeepSpeed is never imported). :func:`deepspeed_fp32_state_dict` rebuilds the fp32 state dict
exactly as DeepSpeed's ``zero_to_fp32`` does, for stages 1, 2 and 3 and fp16, bf16 and fp32
training; ``zckpt.get_fp32_state_dict_from_zero_checkpoint`` hands DeepSpeed directories to it.
Universal checkpoints (``ds_to_universal``'s output: ``latest_universal``, ``zero/<param>/``)
open into the same :class:`DeepSpeedCheckpoint` and are read the same way.
Checkpoints written by PyTorch's ``dcp.save`` (:func:`is_dcp_checkpoint`) give their
whole state dict at any source world size (:func:`dcp_state_dict`) and convert to zckpt
checkpoints (:func:`convert_dcp`).

Example:
    >>> import tempfile, torch, zckpt
    >>> from zckpt.interop._synthetic import write_zero_checkpoint
    >>> d = tempfile.mkdtemp()
    >>> w = torch.randn(10)
    >>> write_zero_checkpoint(d, {"w": w}, world_size=4, stage=1)
    >>> zckpt.interop.is_deepspeed_checkpoint(d)
    True
    >>> torch.equal(zckpt.get_fp32_state_dict_from_zero_checkpoint(d)["w"], w)
    True
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from zckpt._lazy import attach

if TYPE_CHECKING:
    from zckpt.interop._convert import ENGINE_KEYS, convert_deepspeed, deepspeed_training_state
    from zckpt.interop._dcp import DcpCheckpoint, DcpMissingFileError, open_dcp
    from zckpt.interop._dcp_convert import convert_dcp
    from zckpt.interop._dcp_metadata import DcpFormatError, DcpUnsafePickleError
    from zckpt.interop._dcp_state import dcp_state_dict
    from zckpt.interop._deepspeed import GroupLayout, deepspeed_fp32_state_dict, group_layouts
    from zckpt.interop._detect import deepspeed_tags, find_deepspeed
    from zckpt.interop._files import DeepSpeedCheckpoint, ExpertFile, open_deepspeed
    from zckpt.interop._safetensors import (
        Exported,
        export_safetensors,
        module_key_order,
        parse_size,
    )
    from zckpt.interop._universal import LATEST_UNIVERSAL, UniversalFiles
    from zckpt.interop._unpickle import (
        ALLOWED_GLOBALS,
        DeepSpeedFormatError,
        FragmentAddress,
        LossScaler,
        UnsafePickleError,
        ZeroStage,
        load_pickle,
    )

__getattr__, __dir__ = attach(
    __name__,
    {
        "zckpt.interop._convert": (
            "ENGINE_KEYS",
            "convert_deepspeed",
            "deepspeed_training_state",
        ),
        "zckpt.interop._dcp": ("DcpCheckpoint", "DcpMissingFileError", "open_dcp"),
        "zckpt.interop._dcp_convert": ("convert_dcp",),
        "zckpt.interop._dcp_metadata": ("DcpFormatError", "DcpUnsafePickleError"),
        "zckpt.interop._dcp_state": ("dcp_state_dict",),
        "zckpt.interop._deepspeed": (
            "GroupLayout",
            "deepspeed_fp32_state_dict",
            "group_layouts",
        ),
        "zckpt.interop._detect": (
            "deepspeed_tags",
            "find_deepspeed",
        ),
        "zckpt.interop._files": (
            "DeepSpeedCheckpoint",
            "ExpertFile",
            "open_deepspeed",
        ),
        "zckpt.interop._safetensors": (
            "Exported",
            "export_safetensors",
            "module_key_order",
            "parse_size",
        ),
        "zckpt.interop._universal": (
            "LATEST_UNIVERSAL",
            "UniversalFiles",
        ),
        "zckpt.interop._unpickle": (
            "ALLOWED_GLOBALS",
            "DeepSpeedFormatError",
            "FragmentAddress",
            "LossScaler",
            "UnsafePickleError",
            "ZeroStage",
            "load_pickle",
        ),
    },
)

__all__ = [
    "ALLOWED_GLOBALS",
    "ENGINE_KEYS",
    "LATEST_UNIVERSAL",
    "DcpCheckpoint",
    "DcpFormatError",
    "DcpMissingFileError",
    "DcpUnsafePickleError",
    "DeepSpeedCheckpoint",
    "DeepSpeedFormatError",
    "ExpertFile",
    "Exported",
    "FragmentAddress",
    "GroupLayout",
    "LossScaler",
    "UniversalFiles",
    "UnsafePickleError",
    "ZeroStage",
    "convert_dcp",
    "convert_deepspeed",
    "dcp_state_dict",
    "deepspeed_fp32_state_dict",
    "deepspeed_tags",
    "deepspeed_training_state",
    "export_safetensors",
    "module_key_order",
    "find_deepspeed",
    "group_layouts",
    "is_dcp_checkpoint",
    "is_deepspeed_checkpoint",
    "load_pickle",
    "open_dcp",
    "open_deepspeed",
    "parse_size",
]


def is_deepspeed_checkpoint(path: str | os.PathLike[str], tag: str | None = None) -> bool:
    """Whether ``path`` (with ``tag``, or ``latest``/``latest_universal``) is a directory
    DeepSpeed wrote (a regular or a universal checkpoint); ``path`` may be a URL (its store is
    asked for listings and ``latest`` only).

    Example:
        >>> import tempfile
        >>> is_deepspeed_checkpoint(tempfile.mkdtemp()), is_deepspeed_checkpoint("memory://no")
        (False, False)
    """
    found = _remote(path, tag)
    if found is not None:
        return found[0] == "deepspeed"
    from zckpt.interop._detect import find_deepspeed

    return find_deepspeed(_local(path), tag) is not None


def is_dcp_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory PyTorch's distributed checkpoint (DCP) wrote (it holds the
    ``.metadata`` file ``dcp.save`` writes last).

    Example:
        >>> import tempfile
        >>> is_dcp_checkpoint(tempfile.mkdtemp()), is_dcp_checkpoint("memory://no")
        (False, False)
    """
    found = _remote(path, None)
    if found is not None:
        return found[0] == "dcp" and found[1]
    from zckpt.interop._detect import find_dcp

    return find_dcp(_local(path)) is not None


def _local(path: str | os.PathLike[str]) -> str:
    from zckpt.store._resolve import local_path

    return local_path(os.fspath(path))


def _remote(path: str | os.PathLike[str], tag: str | None) -> tuple[str | None, bool] | None:
    """For a URL of an object store (not ``file://``): the kind of foreign checkpoint there
    (None: neither) and whether ``path`` is its directory itself; None for a local path."""
    from zckpt.store._resolve import is_url

    if not is_url(_local(path)):
        return None
    from zckpt.interop._staged import find_foreign
    from zckpt.store._resolve import storage_for

    storage, p = storage_for(path)
    found = find_foreign(storage, p, tag)
    return (None, False) if found is None else (found.kind, found.root == p)
