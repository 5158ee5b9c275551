"""Whether a directory is a DeepSpeed checkpoint (and its tags) or a DCP one: no more than file
names.

Apart from :mod:`zckpt.interop._files` (which opens the files, and imports what reading them
takes) so that the commands that only ask (``zckpt inspect`` and ``verify`` of a zckpt
checkpoint, ``prune``, ``clean``) import none of it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from zckpt.store._layout import LATEST, LATEST_UNIVERSAL, check_tag, read_latest
from zckpt.store._storage import LocalStorage

__all__ = ["deepspeed_tags", "find_dcp", "find_deepspeed", "natural_order"]

_SUFFIX = "model_states.pt"


def _has_model_states(d: str) -> bool:
    try:
        return any(n.endswith(_SUFFIX) for n in os.listdir(d))
    except OSError:
        return False


def find_deepspeed(path: str | os.PathLike[str], tag: str | None = None) -> tuple[str, str] | None:
    """``(tag_dir, tag)`` when ``path`` is a DeepSpeed save_dir or tag directory, else None.

    A DeepSpeed tag directory (regular or universal) holds ``*model_states.pt`` files; a
    save_dir names one in ``latest``, else in ``latest_universal`` (or ``tag`` names it).

    Example:
        >>> import tempfile
        >>> find_deepspeed(tempfile.mkdtemp()) is None
        True
    """
    path = os.fspath(path)
    if tag is not None:
        d = os.path.join(path, check_tag(tag))
        return (d, tag) if _has_model_states(d) else None
    if _has_model_states(path):
        return path, os.path.basename(os.path.normpath(path))
    for pointer in (LATEST, LATEST_UNIVERSAL):  # the first one present decides
        if not os.path.isfile(os.path.join(path, pointer)):
            continue
        latest = read_latest(LocalStorage(), path, pointer)
        if latest is None:
            return None
        d = os.path.join(path, latest)
        return (d, latest) if _has_model_states(d) else None
    return None


def _natural(name: str) -> list[Any]:
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", name)]


def natural_order(names: list[str]) -> list[str]:
    """``names`` sorted as people count: ``global_step9`` before ``global_step10``.

    Example:
        >>> natural_order(["step10", "step9", "step1"])
        ['step1', 'step9', 'step10']
    """
    return sorted(names, key=_natural)


def deepspeed_tags(save_dir: str | os.PathLike[str]) -> list[str]:
    """The DeepSpeed tag directories (regular and universal) in ``save_dir`` (a path or a URL),
    in natural order (``global_step9`` before ``global_step10``): DeepSpeed records no commit
    order.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> for t in ("step10", "step9"):
        ...     write_zero_checkpoint(d, {"w": torch.ones(2)}, world_size=1, stage=1, tag=t)
        >>> deepspeed_tags(d)
        ['step9', 'step10']
    """
    from zckpt.store._resolve import is_url, local_path

    root = local_path(os.fspath(save_dir))
    if is_url(root):  # an object store: its listings
        from zckpt.interop._staged import foreign_tags
        from zckpt.store._resolve import storage_for

        return natural_order(foreign_tags(*storage_for(root)))
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [
        n
        for n in names
        if not n.startswith(".")
        and os.path.isdir(os.path.join(root, n))
        and not os.path.islink(os.path.join(root, n))
        and _has_model_states(os.path.join(root, n))
    ]
    return sorted(found, key=_natural)


#: The metadata file's name in a DCP (PyTorch distributed checkpoint) directory.
DCP_METADATA = ".metadata"


def find_dcp(path: str | os.PathLike[str]) -> str | None:
    """The DCP checkpoint directory ``path`` is (it holds a regular ``.metadata`` file, which
    ``dcp.save`` writes last), else None.

    Example:
        >>> import tempfile
        >>> find_dcp(tempfile.mkdtemp()) is None
        True
    """
    d = os.fspath(path)
    return d if os.path.isfile(os.path.join(d, DCP_METADATA)) else None
