"""Rounds 2 and 3 of the save protocol behind save_checkpoint (:func:`write_and_commit`): every
rank writes its files durably, the ranks exchange their records and errors, and rank 0 commits
the manifest, then ``latest`` and retention, under the save_dir's lock (or discards this
generation's files when anything failed). Round 1, which validates and agrees on the tag, is
``_prepare.py: prepare_save``; this half is apart from it because an asynchronous save runs it on
its own, in a background thread, on a ``PreparedSave`` whose shards are snapshots.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zckpt
from zckpt.errors import FormatError, ZckptError
from zckpt.store._agreement import disagreement, report, structure
from zckpt.store._blobs import client_shard, plan_for, split_experts, write_blob
from zckpt.store._layout import (
    MANIFEST,
    blob_name,
    client_name,
    dir_lock,
    expert_name,
    generation_of,
    write_latest,
)
from zckpt.store._manifest import (
    FileRecord,
    Manifest,
    check_tiling,
    encode_manifest,
    file_report,
    writes_v2,
)
from zckpt.store._prepare import PreparedSave, _manifest_generation
from zckpt.store._retention import apply_retention
from zckpt.store._save_result import Saved, SaveError, _failure_text
from zckpt.store._storage import LocalStorage, Lock, Storage

__all__ = ["write_and_commit"]


def write_and_commit(p: PreparedSave) -> Saved:
    """Rounds 2 and 3 of a save: write every file durably, then rank 0 commits.

    Safe to run in a background thread (an asynchronous save) once ``p.shards`` no longer alias
    tensors that training mutates. Rank 0's lock on the tag is released when it returns.
    """
    try:
        return _write_and_commit(p)
    finally:
        if p.lock is not None:
            p.lock.release()


def _write_and_commit(p: PreparedSave) -> Saved:
    storage, comm, tag_dir, gen = p.storage, p.comm, p.tag_dir, p.generation
    # Records of files whose fragments are the plan's travel without them (rank 0: O(files)).
    plan = None if p.skeleton is None else plan_for(p.skeleton, p.spec)
    # Rank and expert blobs of a version 2 checkpoint leave the skeleton to the manifest (the
    # client state's blob has a skeleton of its own: always version 1).
    v2 = p.skeleton is not None and writes_v2(p.spec, p.skeleton)
    enc = {**p.encoding, "version": 2} if v2 else p.encoding
    records: list[dict[str, Any]] = []
    errors: dict[int, str] = {}
    first_error: BaseException | None = None
    failing_rank = comm.rank
    try:
        for sh in p.shards:
            failing_rank = sh.rank
            base, experts = split_experts(sh)
            name = blob_name(gen, sh.rank, p.spec.world_size)
            rec = write_blob(storage, tag_dir, name, base, sh.rank, enc)
            records.append(file_report(rec, plan))
            for e, esh in experts.items():
                rec = write_blob(storage, tag_dir, expert_name(gen, e), esh, sh.rank, enc, e)
                records.append(file_report(rec, plan))
        if comm.rank == 0 and p.client:
            failing_rank = 0
            client = client_shard(p.client)
            rec = write_blob(storage, tag_dir, client_name(gen), client, -1, p.encoding)
            records.append(rec.to_obj())
    except Exception as e:  # reported to every rank below, then raised as a SaveError
        errors[failing_rank], first_error = _failure_text(e), e
    # where this rank wrote, compared on object stores (a local path may name one shared
    # directory by several paths: rank 0 lists it instead, in _commit)
    where = None if isinstance(storage, LocalStorage) else tag_dir
    reports = comm.all_gather(
        {
            "records": records,
            "errors": {str(k): v for k, v in errors.items()},
            **report(p.skeleton, p.spec, where),
        }
    )
    failed = {int(k): v for r in reports for k, v in r["errors"].items()}
    if not failed:
        _check_agreement(p, reports)
    if failed:
        if comm.rank == 0:
            _discard(p)
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
        err = SaveError(f"saving {tag_dir} failed, nothing was committed: {detail}", failed)
        raise err from first_error

    outcome: dict[str, Any] = {"error": None, "committed": False}
    if comm.rank == 0:
        try:
            outcome = _commit(p, reports)
        except Exception as e:  # every rank must learn it; raised below
            outcome, first_error = {"error": _failure_text(e), "committed": False}, e
    told = comm.all_gather(outcome)[0]
    if told["error"] is not None:
        raise SaveError(told["error"], {0: told["error"]}, bool(told["committed"])) from first_error
    return Saved(tag_dir, p.tag)


def _check_agreement(p: PreparedSave, reports: list[dict[str, Any]]) -> None:
    """Raise a SaveError on every rank (rank 0 discarding the generation's files) when the
    ranks' places, specs or tensors differ (``_agreement.py``)."""

    def structures() -> list[Any]:  # only when the digests differ: names are not free
        return p.comm.all_gather(None if p.skeleton is None else structure(p.skeleton))

    found = disagreement(reports, structures)
    if found is None:
        return
    if p.comm.rank == 0:
        _discard(p)
    raise SaveError(
        f"saving {p.tag_dir} failed, nothing was committed: {found.why}",
        dict.fromkeys(found.odd, found.what),
    )


def _not_seen(storage: Storage, tag_dir: str, files: list[FileRecord]) -> str | None:
    """Why rank 0 cannot commit ``files``: some are not in ``tag_dir`` as rank 0 lists it (a
    rank that saved to a directory of its own, or to a disk the other nodes do not share:
    the manifest would name files no load finds); None when every one is there. One listing
    (on an object store, a request per thousand objects)."""
    there = set(storage.listdir(tag_dir))
    gone = [f for f in files if f.name not in there]
    if not gone:
        return None
    f = gone[0]
    who = "the client state's file" if f.rank < 0 else f"rank {f.rank}'s file"
    return (
        f"{tag_dir}: {who} {f.name} is not there as rank 0 lists the directory ({len(gone)} "
        f"of the {len(files)} files written are missing): every rank must save to one "
        "directory that all of them share (one shared filesystem, or an object store); "
        "nothing was committed"
    )


def _discard(p: PreparedSave) -> None:
    """Remove every file of this (uncommitted) generation, and the tag directory if this save
    made it and nothing else is in it. Best effort: a failing disk may refuse."""
    storage, tag_dir = p.storage, p.tag_dir
    try:
        for name in storage.listdir(tag_dir):
            if generation_of(name) == p.generation:
                storage.remove(os.path.join(tag_dir, name))
        if p.created_tag_dir:
            storage.remove_dir(tag_dir)
    except OSError:
        pass


def _commit(p: PreparedSave, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0: write the manifest (the commit), then ``latest`` and retention, under the
    save_dir's lock; return the outcome every rank reports (``error`` text, ``committed``)."""
    storage, save_dir, tag, gen = p.storage, p.save_dir, p.tag, p.generation
    tag_dir = p.tag_dir
    skeleton = p.skeleton
    if skeleton is None:
        _discard(p)
        return {"error": f"{tag_dir}: rank 0 wrote no shard, nothing committed", "committed": False}
    files = sorted(
        (FileRecord.from_obj(r, allow_derived=True) for rep in reports for r in rep["records"]),
        key=lambda f: f.rank,
    )
    client = next((f for f in files if f.rank == -1), None)
    files = [f for f in files if f.rank >= 0]
    manifest = Manifest(
        tag=tag,
        generation=gen,
        committed_at=time.time(),
        spec=p.spec,
        skeleton=skeleton,
        files=tuple(files),
        client=client,
        frozen=p.frozen,
        excluded_frozen=p.excluded_frozen,
        zckpt_version=zckpt.__version__,
    )
    if not manifest.derived:
        # Files laid out otherwise than the plan (DTensor blocks): every element written once,
        # or nothing is committed (a load would refuse the manifest).
        try:
            check_tiling(manifest, tag_dir)
        except FormatError as e:
            _discard(p)
            return {"error": f"{e}; nothing was committed", "committed": False}
    # On a local filesystem rank 0 lists the directory (another node's disk is not this one);
    # on an object store a URL names one place for every rank (their tag_dirs were compared).
    local = isinstance(storage, LocalStorage)
    missing = (
        _not_seen(storage, tag_dir, [*files, *([client] if client else [])]) if local else None
    )
    if missing:
        _discard(p)
        return {"error": missing, "committed": False}
    with contextlib.ExitStack() as held:
        beside: list[threading.Thread] = []
        held.callback(_join, beside)  # runs last: after the dir lock's release
        # On an object store the tag lock's check (a GET) goes while the save_dir's lock is
        # taken (a PUT), not after it: its answer counts if that lock came within
        # _CHECK_FRESH seconds, else (another job's commit was waited for) it is asked again.
        remote = p.lock is not None and not isinstance(storage, LocalStorage)
        check = _beside(p.lock.intact, beside) if remote and p.lock is not None else None
        asked = time.monotonic()
        try:
            held.enter_context(dir_lock(storage, save_dir))
        except (ZckptError, OSError) as e:  # e.g. no room for the lock file on a full disk
            _discard(p)
            return {
                "error": f"committing {tag_dir} failed, nothing was committed: taking the "
                f"save_dir's commit lock failed: {e}",
                "committed": False,
            }
        if p.lock is not None and not isinstance(storage, LocalStorage):
            # Nothing of the tag is written after this block: its lock goes while the
            # save_dir's does (runs first), not one after the other (an object store's release
            # is a read and a conditional delete, two round trips each).
            held.callback(_release_beside, p.lock, beside)
        fresh = check is not None and time.monotonic() - asked <= _CHECK_FRESH
        if p.lock is not None and not (check() if check and fresh else p.lock.intact()):
            _discard(p)
            return {
                "error": f"{tag_dir}: the save's lock on the tag was removed while it ran "
                "(another process deleted it); nothing was committed",
                "committed": False,
            }
        try:
            storage.write_atomic(os.path.join(tag_dir, MANIFEST), [encode_manifest(manifest)])
        except (ZckptError, OSError) as e:
            # The rename may have happened before the failure (a directory fsync that failed):
            # what is on disk decides what the caller is told.
            if _manifest_generation(storage, tag_dir) == gen:
                return {
                    "error": f"{tag_dir}: committed, but the commit may not be durable: {e}",
                    "committed": True,
                }
            _discard(p)
            return {
                "error": f"committing {tag_dir} failed, nothing was committed: {e}",
                "committed": False,
            }
        # Committed. Files of earlier generations of this tag, listed before this save wrote
        # anything (its own are of a generation never used before), are garbage (best effort).
        try:
            for name in p.older_files:
                if generation_of(name) != gen:
                    storage.remove(os.path.join(tag_dir, name))
        except OSError:
            pass
        if p.save_latest:
            try:
                write_latest(storage, save_dir, tag)
            except (ZckptError, OSError) as e:
                now = _latest_text(storage, save_dir)
                if now == repr(tag):  # renamed into place; only its directory fsync failed
                    what = "names it, but that may not be durable"
                else:
                    what = f"still names {now}"
                return {
                    "error": f"{tag_dir} is committed and loads by name (tag={tag!r}), but "
                    f"replacing {os.path.join(save_dir, 'latest')} failed, so it {what}: {e}",
                    "committed": True,
                }
        if p.keep_last is not None:
            try:
                apply_retention(save_dir, p.keep_last, storage=storage, locked=True)
            except (ZckptError, OSError) as e:
                return {
                    "error": f"{tag_dir} is committed (and 'latest' names it when asked), but "
                    f"retention (keep_last={p.keep_last}) failed: {e}",
                    "committed": True,
                }
    return {"error": None, "committed": True}


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join()


_CHECK_FRESH = 1.0  # seconds: a tag lock's check this much older than the save_dir's lock


def _beside(fn: Callable[[], bool], beside: list[threading.Thread]) -> Callable[[], bool]:
    """Start ``fn`` in a thread of its own, added to ``beside``; return what waits for its
    answer (False if it raised: a check that cannot tell says the lock is not intact)."""
    got = [False]

    def run() -> None:
        with contextlib.suppress(Exception):
            got[0] = fn()

    t = threading.Thread(target=run, name="zckpt-check-tag-lock", daemon=True)
    t.start()
    beside.append(t)

    def answer() -> bool:
        t.join()
        return got[0]

    return answer


def _release_beside(lock: Lock, beside: list[threading.Thread]) -> None:
    """Start releasing ``lock`` in a thread of its own, added to ``beside`` (to be joined).
    A release that fails leaves the lock to its lease, as one in the caller's thread would."""
    t = threading.Thread(target=lock.release, name="zckpt-release-tag-lock", daemon=True)
    t.start()
    beside.append(t)


def _latest_text(storage: Storage, save_dir: str) -> str:
    from zckpt.store._layout import read_latest

    try:
        old = read_latest(storage, save_dir)
    except (ZckptError, OSError):
        return "what it named before (unreadable now)"
    return "nothing (there is no 'latest')" if old is None else repr(old)
