"""Retention and cleanup: keep the newest N committed tags; remove what no commit references."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zckpt.errors import ArgumentError, ZckptError
from zckpt.store._layout import (
    DIR_LOCK,
    LATEST,
    LATEST_UNIVERSAL,
    MANIFEST,
    dir_lock,
    generation_of,
    locked_tag,
    read_latest,
    try_tag_lock,
)
from zckpt.store._resolve import storage_for
from zckpt.store._storage import Storage

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


def list_tags(
    save_dir: str,
    *,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[CommittedTag]:
    """Committed tags in ``save_dir``, oldest first.

    Torn or foreign directories are skipped, and so is a tag that is a symbolic link: it still
    loads by name, but retention never keeps, counts or deletes what lies behind it.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> for t in ("a", "b"):
        ...     _ = zckpt.save_checkpoint(d, {"w": torch.ones(1)}, zckpt.ZeroSpec(1, 1), tag=t)
        >>> [c.tag for c in zckpt.list_tags(d)]
        ['a', 'b']
    """
    from zckpt.store._read import read_manifest

    storage, save_dir = storage_for(save_dir, storage, storage_options)
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


def _is_temp(name: str) -> bool:
    """A temporary name of an atomic write (``.<name>.tmp.<random>``)."""
    return name.startswith(".") and ".tmp." in name


def _ours(name: str) -> bool:
    """A file name zckpt writes inside a tag directory."""
    return generation_of(name) is not None or name == MANIFEST or _is_temp(name)


def _delete_tag(storage: Storage, tag_dir: str) -> None:
    """Uncommit, then remove zckpt's own files; the directory goes only if nothing else is in
    it (a file zckpt did not write is never deleted)."""
    # The manifest goes first: from then on the tag is uncommitted, whatever the rest becomes.
    storage.remove(os.path.join(tag_dir, MANIFEST))
    for name in storage.listdir(tag_dir):
        if _ours(name):
            storage.remove(os.path.join(tag_dir, name))
    storage.remove_dir(tag_dir)


def apply_retention(
    save_dir: str,
    keep_last: int,
    *,
    storage: Storage | None = None,
    locked: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Delete all but the newest ``keep_last`` committed tags, never the one ``latest`` names.

    Safe beside other jobs: it holds the save_dir's commit lock (``locked=True``: the caller
    already does), skips a tag that a running save holds (an overwrite in flight), never
    follows a tag that is a symbolic link, and deletes only files zckpt writes.

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
    storage, save_dir = storage_for(save_dir, storage, storage_options)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ArgumentError(f"keep_last must be an int >= 1, got {keep_last!r}")
    if not locked:
        with dir_lock(storage, save_dir):
            return apply_retention(save_dir, keep_last, storage=storage, locked=True)
    protected = {
        read_latest(storage, save_dir, LATEST),
        read_latest(storage, save_dir, LATEST_UNIVERSAL),
    }
    tags = list_tags(save_dir, storage=storage)
    doomed = [c.tag for c in tags[: max(0, len(tags) - keep_last)] if c.tag not in protected]
    deleted = []
    for tag in doomed:
        lock = try_tag_lock(storage, save_dir, tag)
        if lock is None:  # a save of this tag is running: it is not ours to delete
            continue
        try:
            _delete_tag(storage, os.path.join(save_dir, tag))
        finally:
            lock.release()
        deleted.append(tag)
    return deleted


def clean(
    save_dir: str,
    *,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Remove what no commit references: uncommitted tag directories (holding only zckpt's own
    files; anything else is left alone), temporary files, blob files of generations other than
    the committed one, and lock files no live process holds.

    A tag that a running save holds (its lock, see :func:`~zckpt.store._layout.try_tag_lock`)
    is left alone, so ``clean`` is safe to run beside training; so are symbolic links.

    Returns:
        The removed paths, relative to ``save_dir``.

    Example:
        >>> import tempfile, os, zckpt
        >>> d = tempfile.mkdtemp()
        >>> os.makedirs(f"{d}/torn")
        >>> zckpt.clean(d)
        ['torn']
    """
    storage, save_dir = storage_for(save_dir, storage, storage_options)
    removed = []
    with dir_lock(storage, save_dir):
        names = storage.listdir(save_dir)
        for name in names:
            path = os.path.join(save_dir, name)
            if name == DIR_LOCK:
                continue
            tag = locked_tag(name)
            if tag is not None:
                lock = try_tag_lock(storage, save_dir, tag)
                if lock is not None:  # nobody holds it: a dead save's (release removes it)
                    lock.release()
                    removed.append(name)
                continue
            if _is_temp(name):
                storage.remove(path)
                removed.append(name)
                continue
            if name.startswith(".") or not storage.is_dir(path):
                continue
            lock = try_tag_lock(storage, save_dir, name)
            if lock is None:  # a save in flight
                continue
            try:
                removed += _clean_tag(storage, save_dir, name)
            finally:
                lock.release()
        removed += _abort_uploads(storage, save_dir)
    return removed


def _abort_uploads(storage: Storage, save_dir: str) -> list[str]:
    """Object stores: abort the multipart uploads a killed save left unfinished, in tags no
    running save holds."""
    listing = getattr(storage, "unfinished_uploads", None)
    if listing is None:
        return []
    removed = []
    for tag in sorted({name.split("/", 1)[0] for name in listing(save_dir) if "/" in name}):
        lock = try_tag_lock(storage, save_dir, tag)
        if lock is None:  # a save in flight: its uploads are its own
            continue
        try:
            aborted = storage.abort_uploads(os.path.join(save_dir, tag))  # type: ignore[attr-defined]
            removed += [f"{os.path.join(tag, n)} (unfinished upload)" for n in aborted]
        finally:
            lock.release()
    return removed


def _clean_tag(storage: Storage, save_dir: str, name: str) -> list[str]:
    from zckpt.store._read import read_manifest

    path = os.path.join(save_dir, name)
    try:
        m = read_manifest(storage, path)
    except (ZckptError, OSError):
        # Only directories that hold nothing but zckpt's own files are ours to delete.
        if all(_ours(f) for f in storage.listdir(path)):
            _delete_tag(storage, path)
            return [name]
        return []
    removed = []
    for f in storage.listdir(path):
        g = generation_of(f)
        if (g is not None and g != m.generation) or _is_temp(f):
            storage.remove(os.path.join(path, f))
            removed.append(os.path.join(name, f))
    return removed
