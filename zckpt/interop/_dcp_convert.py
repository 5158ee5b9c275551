"""Importing a DCP checkpoint into a zckpt checkpoint, loadable at any world size.

The state saved is :func:`~zckpt.interop._dcp_state.dcp_state_dict`'s (DCP's nested state
dict: tensors whole, in their saved dtypes; non-tensor values as they were saved), partitioned
by a stage-3 spec over the ranks that saved it (every tensor cut on its own), so
``zckpt.load_checkpoint`` gives any rank of any world size its part, or the whole state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from zckpt.interop._dcp import open_dcp
from zckpt.interop._dcp_state import checkpoint_state, require_intact
from zckpt.interop._output import check_disjoint, url_options
from zckpt.interop._staged import foreign_source
from zckpt.spec import ZeroSpec
from zckpt.store._save_result import Saved

__all__ = ["convert_dcp", "default_tag"]


def default_tag(src_dir: str | os.PathLike[str]) -> str:
    """The tag a converted DCP checkpoint gets without ``tag=``: its directory's name when that
    is a safe tag (``step100``), else ``dcp``.

    Example:
        >>> default_tag("/runs/a/step100"), default_tag("/runs/a/.tmp")
        ('step100', 'dcp')
    """
    from zckpt.store._layout import TagError, check_tag

    name = os.path.basename(os.path.normpath(os.fspath(src_dir)))
    try:
        return check_tag(name)
    except TagError:
        return "dcp"


def convert_dcp(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    tag: str | None = None,
    *,
    codec: str = "raw",
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Saved:
    """Import the DCP checkpoint ``src_dir`` (the whole state dict) as a zckpt checkpoint.

    Args:
        src_dir: the directory ``dcp.save`` wrote.
        dst_dir: the zckpt save_dir to write.
        tag: the zckpt tag (default :func:`default_tag`).
        codec: zckpt codec (``"raw"``, ``"zstd"``, ``"byteplane"``).
        overwrite: replace an existing tag in ``dst_dir``.
        storage_options: options for the fsspec filesystem of whichever of ``src_dir`` and
            ``dst_dir`` is a URL. A DCP checkpoint at a URL is copied to a private local
            directory first (``interop/_staged.py``), removed when the call returns.

    Raises:
        zckpt.interop._output.OutputPathError: ``dst_dir`` is ``src_dir``, lies inside it or
            contains it; nothing is written.
        DcpFormatError: the checkpoint is inconsistent, or an item does not match its zip
            CRC-32 (every item is read and checked first); nothing is written.
        zckpt.errors.StateError: a non-tensor value zckpt does not store (named).

    Example:
        >>> import tempfile, torch, zckpt
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> w = torch.randn(7)
        >>> torch.save({"model": {"w": w}, "epoch": 2}, src + "/sd.pt")
        >>> torch_save_to_dcp(src + "/sd.pt", src + "/step9")
        >>> convert_dcp(src + "/step9", dst).tag
        'step9'
        >>> got = zckpt.load_checkpoint(dst, world_size=3, rank=0)
        >>> torch.equal(got.state["model"]["w"], w[:3]), got.state["epoch"]
        (True, 2)
    """
    from zckpt.store._save import save_checkpoint

    check_disjoint(src_dir, dst_dir)
    src_options, dst_options = url_options(src_dir, dst_dir, storage_options)
    with foreign_source(src_dir, None, src_options) as local:
        ck = open_dcp(local)
        require_intact(ck)  # converted, a flipped bit would get a checksum of its own
        state = checkpoint_state(ck)
    spec = ZeroSpec(ck.ranks or 1, 3)
    return save_checkpoint(
        dst_dir,
        state,
        spec,
        tag=default_tag(src_dir) if tag is None else tag,
        codec=codec,
        overwrite=overwrite,
        storage_options=dst_options,
    )
