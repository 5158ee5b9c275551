"""verify_checkpoint: check everything a load relies on, for one tag or every tag of a save_dir.

A load trusts nothing it reads: the manifest is validated as a whole, each file it opens must
be the regular file the manifest committed (size and index checksum), each blob header must
agree with the manifest, and each chunk's checksum is checked as it is read. ``verify`` runs the
same checks (the same functions) over every file and every chunk, plus the whole-file hashes a
load does not need to read, so a checkpoint that verifies loads, and one that would fail to
load does not verify.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from zckpt.errors import ZckptError
from zckpt.format import iter_problems
from zckpt.store._layout import LATEST, LATEST_UNIVERSAL, MANIFEST, read_latest
from zckpt.store._manifest import FileRecord
from zckpt.store._read import (
    Checkpoint,
    _check_tag_link,
    open_checkpoint,
    read_manifest,
    resolve,
)
from zckpt.store._resolve import storage_for
from zckpt.store._storage import LocalStorage, Storage, StorageError, open_regular

__all__ = ["TagReport", "verify_checkpoint"]


@dataclass(frozen=True)
class TagReport:
    """What :func:`verify_checkpoint` found in one tag directory.

    Example:
        >>> TagReport("/ckpt/a", "a", 3, 100, ("a: bad",)).ok
        False
    """

    path: str
    tag: str
    files: int
    nbytes: int
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _mapped_problems(path: str, rec: FileRecord) -> list[str]:
    """Whole-file xxh3 and every chunk of a blob that has the recorded size."""
    fd = open_regular(path)
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if rec.size else None
    finally:
        os.close(fd)
    if mm is None:
        return [f"{path}: empty file"]
    mv = memoryview(mm)
    found: list[str] = []
    try:
        if xxhash.xxh3_64_intdigest(mv) != rec.xxh3:
            found.append(f"{path}: whole-file xxh3 mismatch (the manifest says {rec.xxh3:#018x})")
        # Messages only: the exceptions (and their tracebacks) keep no view of the mapping alive.
        found += [f"{path}: {_one_line(p)}" for p in iter_problems(mv)]
    finally:
        mv.release()
        with contextlib.suppress(BufferError):  # a view still referenced: closed when collected
            mm.close()
    return found


def _stored_problems(storage: Storage, path: str, rec: FileRecord) -> list[str]:
    """The whole-file pass of :func:`_mapped_problems` for a blob read whole from ``storage``
    (one blob in memory at a time)."""
    buf = memoryview(bytearray(rec.size))
    got = storage.read_into(path, 0, buf)
    if got != rec.size:
        return [f"{path}: {got} bytes read, the manifest says {rec.size}"]
    found: list[str] = []
    if xxhash.xxh3_64_intdigest(buf) != rec.xxh3:
        found.append(f"{path}: whole-file xxh3 mismatch (the manifest says {rec.xxh3:#018x})")
    return found + [f"{path}: {_one_line(p)}" for p in iter_problems(buf)]


def _file_problems(ck: Checkpoint, rec: FileRecord, client: bool) -> list[str]:
    path = ck.file_path(rec)
    if not ck.storage.exists(path):
        return [f"{path}: missing"]
    try:
        # What a load checks first: a regular file of the recorded size, the index the manifest
        # committed, fragments and tensor metas as the manifest says.
        if client:
            ck.client_state()
        else:
            ck.header(rec)
    except (ZckptError, OSError) as e:
        return [_one_line(e)]
    try:
        if not isinstance(ck.storage, LocalStorage):  # an object store: read the blob whole
            return _stored_problems(ck.storage, path, rec)
        return _mapped_problems(path, rec)
    except (ZckptError, OSError) as e:
        return [f"{path}: {_one_line(e)}"]


def _verify_tag(
    storage: Storage, tag_dir: str, tag: str | None, on_bytes: Callable[[int], None] | None
) -> TagReport:
    problems: list[str] = []
    try:
        ck = open_checkpoint(tag_dir, tag, storage=storage)
    except (ZckptError, OSError) as e:
        # The manifest may be sound and a file bad (opening checks the first file): go on with
        # the manifest alone, so every file's problems are listed, not just the first.
        found = resolve(storage, tag_dir, tag)
        try:
            if found is None:
                raise
            _check_tag_link(storage, tag_dir, found[0])  # what a load refuses, verify does
            ck = Checkpoint(found[0], read_manifest(storage, found[0]), storage)
        except (ZckptError, OSError):
            return TagReport(tag_dir, tag or os.path.basename(tag_dir), 0, 0, (_one_line(e),))
        if "differs from the one" in str(e):
            problems.append(_one_line(e))
    m = ck.manifest
    recs = [(r, False) for r in m.files] + ([(m.client, True)] if m.client else [])
    for rec, client in recs:
        problems += _file_problems(ck, rec, client)
        if on_bytes is not None:
            on_bytes(rec.size)
    total = sum(r.size for r, _ in recs)
    return TagReport(ck.path, ck.tag, len(recs), total, tuple(problems))


def _tag_dirs(storage: Storage, save_dir: str) -> Iterator[str]:
    """Every directory entry of ``save_dir`` that holds a manifest (valid or not)."""
    for name in storage.listdir(save_dir):
        if name.startswith("."):
            continue
        if storage.exists(os.path.join(save_dir, name, MANIFEST)):
            yield name


def verify_checkpoint(
    path: str | os.PathLike[str],
    tag: str | None = None,
    *,
    storage: Storage | None = None,
    on_bytes: Callable[[int], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[TagReport]:
    """Check a tag directory, one ``tag`` of a save_dir, or every tag of a save_dir.

    For each tag: the manifest as a whole, then for every file what a load checks (a regular
    file of the recorded size, bound to the manifest by its index checksum, whose header agrees
    with the manifest), its whole-file xxh3 and every chunk's checksum; the client state
    decodes. For a save_dir, also that ``latest`` (and ``latest_universal``) name a tag that
    verifies; a directory holding a ``manifest.zckm`` that does not validate is a problem, one
    without any manifest (an interrupted save, invisible to loads) is not.

    Returns:
        One :class:`TagReport` per tag checked; a problem of the save_dir itself (``latest``)
        comes as a report whose tag is ``latest``.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> for t in ("a", "b"):
        ...     _ = zckpt.save_checkpoint(d, {"w": torch.ones(3)}, zckpt.ZeroSpec(2, 1), tag=t)
        >>> [(r.tag, r.files, r.ok) for r in zckpt.verify_checkpoint(d)]
        [('a', 2, True), ('b', 2, True)]
    """
    storage, path = storage_for(path, storage, storage_options)
    if tag is not None or storage.exists(os.path.join(path, MANIFEST)):
        return [_verify_tag(storage, path, tag, on_bytes)]
    if not storage.is_dir(path) and not os.path.isdir(path):
        raise StorageError(2, f"{path}: no such directory")
    reports = [_verify_tag(storage, path, name, on_bytes) for name in _tag_dirs(storage, path)]
    by_tag = {r.tag: r for r in reports}
    for pointer in (LATEST, LATEST_UNIVERSAL):
        if not storage.exists(os.path.join(path, pointer)):
            continue
        try:
            named = read_latest(storage, path, pointer)
        except (ZckptError, OSError) as e:
            reports.append(TagReport(path, pointer, 0, 0, (_one_line(e),)))
            continue
        target = by_tag.get(named or "")
        if target is None:
            # Not among the directories: a symlinked tag, or nothing; check it as a load would.
            found = _verify_tag(storage, path, named, on_bytes)
            if not found.ok:
                named_problems = tuple(f"'{pointer}' names {named!r}: {p}" for p in found.problems)
                reports.append(TagReport(path, pointer, 0, 0, named_problems))
    if not reports:
        raise StorageError(2, f"{path}: no committed checkpoint and no 'latest' to check")
    return reports
