"""Finding committed checkpoints: resolve the tag (``latest`` once), read and verify the manifest,
open the :class:`~zckpt.store._checkpoint.Checkpoint` (its blobs' reads are there), and follow
``latest`` once more when retention deleted the tag meanwhile."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

from zckpt.errors import FormatError, ZckptError
from zckpt.store._checkpoint import Checkpoint, FileSource
from zckpt.store._layout import LATEST, LATEST_UNIVERSAL, MANIFEST, check_tag, read_latest
from zckpt.store._manifest import Manifest, decode_manifest
from zckpt.store._resolve import storage_for
from zckpt.store._storage import LocalStorage, Storage, StorageError

# Checkpoint and FileSource (zckpt.store._checkpoint) are named here too, where they were first.
__all__ = [
    "Checkpoint",
    "CheckpointNotFoundError",
    "FileSource",
    "open_checkpoint",
    "read_manifest",
]

_MAX_MANIFEST = 1 << 31


class CheckpointNotFoundError(ZckptError, FileNotFoundError):
    """No committed checkpoint at the path or tag asked for.

    Example:
        >>> issubclass(CheckpointNotFoundError, FileNotFoundError)
        True
    """


def read_manifest(storage: Storage, tag_dir: str) -> Manifest:
    """The verified manifest of a tag directory.

    Raises:
        CheckpointNotFoundError: no manifest (the tag was never committed).
        FormatError: the manifest is torn or corrupt.
    """
    path = os.path.join(tag_dir, MANIFEST)
    whole = getattr(storage, "read_whole", None)
    if whole is not None:  # an object store: one GET, one version of an object replaced meanwhile
        data: bytes | None = whole(path, _MAX_MANIFEST + 1)
    elif storage.exists(path):
        # One read, not a size and then a read: a manifest replaced between the two (an
        # overwrite's commit) read the new file's bytes to the old one's length, a torn manifest.
        data = storage.read(path, 0, _MAX_MANIFEST + 1)
    else:
        data = None
    if data is None:
        raise CheckpointNotFoundError(
            errno.ENOENT, f"{tag_dir}: no committed checkpoint (missing {MANIFEST})"
        )
    return _decode(data, path)


def _decode(data: bytes, path: str) -> Manifest:
    if len(data) > _MAX_MANIFEST:
        raise FormatError(f"{path}: more than {_MAX_MANIFEST} bytes is too large for a manifest")
    return decode_manifest(data, path)


class Found(NamedTuple):
    """Where a checkpoint was found: its tag directory and tag, whether ``latest`` (or
    ``latest_universal``) named it, and the manifest's bytes when finding it read them."""

    tag_dir: str
    tag: str
    via_latest: bool
    manifest: bytes | None = None


def locate(storage: Storage, path: str, tag: str | None) -> Found | None:
    """Find the checkpoint of a save_dir or tag directory; None if nothing is committed there.

    This is the one place a load resolves ``latest``: what it returns is passed down to
    :func:`opened` and :func:`following_latest`, never looked up again (so the tag loaded is the
    tag ``latest`` named when it was read, once). A directory holding a manifest is a tag
    directory. Otherwise the tag is ``tag``, else the one ``latest`` names, else
    ``latest_universal`` (every zckpt checkpoint loads at any world size, so DeepSpeed users'
    pointer is honoured the same way). On an object store the manifest probe is a GET (one
    request, whose bytes are kept when it finds one) and ``latest`` one more.

    Example:
        >>> import tempfile, torch, zckpt
        >>> from zckpt.store import LocalStorage
        >>> d = tempfile.mkdtemp()
        >>> _ = zckpt.save_checkpoint(d, {"w": torch.ones(1)}, zckpt.ZeroSpec(1, 1), tag="a")
        >>> locate(LocalStorage(), d, None)[1:3], locate(LocalStorage(), d + "/a", None)[1:3]
        (('a', True), ('a', False))
    """
    if tag is None:
        here = os.path.join(path, MANIFEST)
        whole = getattr(storage, "read_whole", None)
        if whole is not None:
            data: bytes | None = whole(here, _MAX_MANIFEST + 1)
            if data is not None:
                return Found(path, os.path.basename(os.path.normpath(path)), False, data)
        elif storage.exists(here):
            return Found(path, os.path.basename(os.path.normpath(path)), False)
        tag = read_latest(storage, path, LATEST) or read_latest(storage, path, LATEST_UNIVERSAL)
        if tag is None:
            return None
        return Found(os.path.join(path, check_tag(tag)), tag, True)
    return Found(os.path.join(path, check_tag(tag)), tag, False)


def resolve(storage: Storage, path: str, tag: str | None) -> tuple[str, str] | None:
    """(tag directory, tag) for a save_dir or tag directory; None if nothing is committed there
    (:func:`locate`)."""
    found = locate(storage, path, tag)
    return None if found is None else (found.tag_dir, found.tag)


T = TypeVar("T")


def following_latest(
    storage: Storage,
    path: str,
    tag: str | None,
    load: Callable[[], T] | None = None,
    *,
    found: Found | None = None,
    use: Callable[[Checkpoint], T] | None = None,
) -> T:
    """Run a load; if it fails because what it read is gone (an overwrite's commit deleted the
    old generation's blobs, or retention the tag ``latest`` named), find the checkpoint again
    once and, if it is another one, run the load once more on that.

    Either ``found`` (what :func:`locate` found) and ``use``, which is given the checkpoint
    ``found`` names, opened here without resolving ``latest`` again; or ``load``, which opens
    the checkpoint itself. On a :class:`CheckpointNotFoundError` or a ``StorageError`` (a blob
    that is not there), ``latest`` (when the load followed it) and the tag's manifest are read
    again: a tag ``latest`` moved to, or the same tag committed anew (another generation: it
    was overwritten meanwhile, and the old generation's blobs deleted), is loaded once more,
    whole, from its own manifest, so a load reads one checkpoint, never a mix of two. The same
    generation means the checkpoint itself lost a file: the error is raised. A second failure
    is raised as it is, its message saying the tag was overwritten while being loaded when it
    was. With ``load``, only a tag ``latest`` moved to is followed (``load``'s own loads follow
    generations).

    Example:
        >>> from zckpt.store import LocalStorage
        >>> following_latest(LocalStorage(), "/nonexistent", "t", lambda: 3)
        3
    """
    if use is None:
        if load is None:
            raise TypeError("following_latest: pass load, or found and use")
        if tag is None:  # the tag latest names now, to tell whether it moved if load fails
            with contextlib.suppress(ZckptError, OSError):
                found = locate(storage, path, None)
        if found is None:  # a tag named, or nothing there (load says what): nothing to follow
            return load()
        try:
            return load()
        except (CheckpointNotFoundError, StorageError):
            now = _found_again(storage, path, None)
            if not found.via_latest or now is None or now.tag == found.tag:
                raise
            return load()
    if found is None:
        raise TypeError("following_latest: use needs found")
    tried: list[str] = []  # the generation of each checkpoint opened
    try:
        ck = opened(storage, path, tag, found)
        tried.append(ck.manifest.generation)
        return use(ck)
    except (CheckpointNotFoundError, StorageError) as e:
        first = e
    now = _found_again(storage, path, tag)
    if now is None or (now.tag == found.tag and not tried):
        raise first
    try:
        ck = opened(storage, path, tag, now)
    except (ZckptError, OSError):
        raise first from None
    if now.tag == found.tag and ck.manifest.generation == tried[0]:
        raise first  # the same checkpoint: one of its own files is gone
    try:
        return use(ck)
    except StorageError as e:
        tried.append(ck.manifest.generation)
        last = _generation_now(storage, path, tag, now.tag)
        if last is not None and last not in tried:  # moved on again: say so, and what to do
            e.strerror = (
                f"{e.strerror} (tag {now.tag!r} was overwritten while it was being loaded, "
                f"twice: generations {' -> '.join([*tried, last])}; load again)"
            )
        raise


def _generation_now(storage: Storage, path: str, tag: str | None, name: str) -> str | None:
    """The generation committed now under the tag ``name`` that ``path`` and ``tag`` lead to
    (None when they lead elsewhere, or nowhere)."""
    now = _found_again(storage, path, tag)
    if now is None or now.tag != name:
        return None
    try:
        return opened(storage, path, tag, now).manifest.generation
    except (ZckptError, OSError):
        return None


def _found_again(storage: Storage, path: str, tag: str | None) -> Found | None:
    """:func:`locate` once more after a failed load; None when that fails too."""
    try:
        return locate(storage, path, tag)
    except (ZckptError, OSError):
        return None


def opened(storage: Storage, path: str, tag: str | None, found: Found) -> Checkpoint:
    """The checkpoint ``found`` names, its manifest read (or decoded from the bytes ``locate``
    read) and verified; the skeleton is checked against its files' when the first header is
    read (:meth:`Checkpoint.check_skeleton`).

    Raises:
        CheckpointNotFoundError: the tag is not committed (or no longer).
        FormatError: the manifest is corrupt.
    """
    try:
        if found.manifest is not None:
            manifest = _decode(found.manifest, os.path.join(found.tag_dir, MANIFEST))
        else:
            manifest = read_manifest(storage, found.tag_dir)
    except CheckpointNotFoundError:
        raise not_found(path, tag, storage) from None
    except StorageError as e:
        raise CheckpointNotFoundError(errno.ENOENT, e.strerror or str(e)) from None
    _check_tag_link(storage, path, found.tag_dir)
    return Checkpoint(found.tag_dir, manifest, storage)


def open_checkpoint(
    path: str | os.PathLike[str],
    tag: str | None = None,
    *,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Open a committed zckpt checkpoint: a ``save_dir`` (tag from ``latest``) or a tag directory.

    ``path`` may be a URL (``s3://bucket/run1``; ``storage_options`` go to its fsspec
    filesystem) or any path of ``storage`` (see :func:`~zckpt.store.storage_for`).

    Raises:
        CheckpointNotFoundError: no ``latest`` and no tag, or the tag is not committed.
        FormatError: the manifest is corrupt.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> _ = zckpt.save_checkpoint(d, {"w": torch.ones(3)}, zckpt.ZeroSpec(1, 1), tag="a")
        >>> zckpt.open_checkpoint(f"{d}/a").tag
        'a'
    """
    storage, path = storage_for(path, storage, storage_options)
    found = locate(storage, path, tag)
    if found is None:
        raise not_found(path, tag, storage)
    ck = opened(storage, path, tag, found)
    ck.check_skeleton()
    return ck


def not_found(path: str, tag: str | None, storage: Storage) -> CheckpointNotFoundError:
    """What is missing at ``path``, as :func:`~zckpt.store._explain.explain` says it."""
    from zckpt.store._explain import explain  # here: opening a checkpoint that is there needs none

    return CheckpointNotFoundError(errno.ENOENT, explain(path, tag, storage=storage).message)


def _check_tag_link(storage: Storage, save_dir: str, tag_dir: str) -> None:
    """A tag reached through a save_dir may be a symbolic link only to a directory inside it.

    Otherwise a save_dir's tag (or the one ``latest`` names) could be another checkpoint
    altogether, consistent in itself and so undetectable; a tag directory named directly is
    the user's own choice and is followed.
    """

    if tag_dir == save_dir or not isinstance(storage, LocalStorage):
        return
    if not os.path.islink(tag_dir):
        return
    root, target = os.path.realpath(save_dir), os.path.realpath(tag_dir)
    if os.path.commonpath([root, target]) != root:
        raise CheckpointNotFoundError(
            errno.ENOENT,
            f"{tag_dir} is a symbolic link to {target}, outside {save_dir}: refused (pass "
            f"{target} itself to load that checkpoint)",
        )
