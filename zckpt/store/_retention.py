"""Retention and cleanup: keep the newest N committed tags; remove what no commit references."""

from __future__ import annotations

import os
from dataclasses import dataclass

from zckpt.errors import ZckptError
from zckpt.store._layout import LATEST, LATEST_UNIVERSAL, MANIFEST, generation_of, read_latest
from zckpt.store._storage import LocalStorage, Storage

__all__ = ["CommittedTag", "apply_retention", "clean", "list_tags"]


@dataclass(frozen=True)
class CommittedTag:
    """A committed tag and when it was committed.

    Example:
        >>> CommittedTag("step3", 1700000000.0).tag
        'step3'
    """

    tag: str
    committed_at: float


def list_tags(save_dir: str, *, storage: Storage | None = None) -> list[CommittedTag]:
    """Committed tags in ``save_dir``, oldest first (torn or foreign directories are skipped).

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> for t in ("a", "b"):
        ...     _ = zckpt.save_checkpoint(d, {"w": torch.ones(1)}, zckpt.ZeroSpec(1, 1), tag=t)
        >>> [c.tag for c in zckpt.list_tags(d)]
        ['a', 'b']
    """
    from zckpt.store._read import read_manifest

    storage = storage or LocalStorage()
    out = []
    for name in storage.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(".") or not storage.is_dir(path):
            continue
        try:
            m = read_manifest(storage, path)
        except (ZckptError, OSError):
            continue
        out.append(CommittedTag(name, m.committed_at))
    out.sort(key=lambda c: (c.committed_at, c.tag))
    return out


def _delete_tag(storage: Storage, tag_dir: str) -> None:
    # The manifest goes first: from then on the tag is uncommitted, whatever the rest becomes.
    storage.remove(os.path.join(tag_dir, MANIFEST))
    storage.rmtree(tag_dir)


def apply_retention(save_dir: str, keep_last: int, *, storage: Storage | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` committed tags, never the one ``latest`` names.

    Returns:
        The deleted tags.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> for t in ("a", "b", "c"):
        ...     _ = zckpt.save_checkpoint(d, {"w": torch.ones(1)}, zckpt.ZeroSpec(1, 1), tag=t)
        >>> zckpt.apply_retention(d, keep_last=1)
        ['a', 'b']
    """
    storage = storage or LocalStorage()
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    protected = {
        read_latest(storage, save_dir, LATEST),
        read_latest(storage, save_dir, LATEST_UNIVERSAL),
    }
    tags = list_tags(save_dir, storage=storage)
    doomed = [c.tag for c in tags[: max(0, len(tags) - keep_last)] if c.tag not in protected]
    for tag in doomed:
        _delete_tag(storage, os.path.join(save_dir, tag))
    return doomed


def _ours(name: str) -> bool:
    return (
        generation_of(name) is not None
        or name == MANIFEST
        or (name.startswith(".") and ".tmp." in name)
    )


def clean(save_dir: str, *, storage: Storage | None = None) -> list[str]:
    """Remove what no commit references: uncommitted tag directories (holding only zckpt's own
    files; anything else is left alone), temporary files, and blob files of generations other
    than the committed one. Run it when no save is running.

    Returns:
        The removed paths, relative to ``save_dir``.

    Example:
        >>> import tempfile, os, zckpt
        >>> d = tempfile.mkdtemp()
        >>> os.makedirs(f"{d}/torn")
        >>> zckpt.clean(d)
        ['torn']
    """
    from zckpt.store._read import read_manifest

    storage = storage or LocalStorage()
    removed = []
    for name in storage.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(".") and ".tmp." in name:
            storage.remove(path)
            removed.append(name)
            continue
        if name.startswith(".") or not storage.is_dir(path):
            continue
        try:
            m = read_manifest(storage, path)
        except (ZckptError, OSError):
            # Only directories that hold nothing but zckpt's own files are ours to delete.
            if all(_ours(f) for f in storage.listdir(path)):
                _delete_tag(storage, path)
                removed.append(name)
            continue
        for f in storage.listdir(path):
            g = generation_of(f)
            if (g is not None and g != m.generation) or (f.startswith(".") and ".tmp." in f):
                storage.remove(os.path.join(path, f))
                removed.append(os.path.join(name, f))
    return removed
