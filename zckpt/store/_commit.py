"""The save protocol behind save_checkpoint: round 1 validates and agrees on the tag
(:func:`prepare_save`); rounds 2 and 3 write every file durably and let rank 0 commit the
manifest and ``latest`` (:func:`write_and_commit`). Asynchronous saves run the second half in a
background thread."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zckpt
from zckpt.dist import Comm, SingleProcess
from zckpt.dist._dtensor import local_boxes
from zckpt.errors import ArgumentError, FormatError, SpecError, ZckptError
from zckpt.format import _encode
from zckpt.shard import LocalBox, Shard, shard_state
from zckpt.spec import ZeroSpec
from zckpt.store._blobs import (
    check_client_state,
    client_shard,
    drop_frozen,
    plan_for,
    split_experts,
    write_blob,
)
from zckpt.store._layout import (
    MANIFEST,
    TagError,
    blob_name,
    check_same_tags,
    check_tag,
    client_name,
    dir_lock,
    expert_name,
    generation_of,
    lock_name,
    new_generation,
    wait_tag_lock,
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
from zckpt.store._read import read_manifest
from zckpt.store._resolve import storage_for
from zckpt.store._retention import apply_retention
from zckpt.store._storage import LocalStorage, Lock, Storage
from zckpt.tree import Skeleton, flatten

__all__ = [
    "ConcurrentSaveError",
    "PreparedSave",
    "SaveError",
    "Saved",
    "drop_frozen",
    "prepare_save",
    "split_experts",
    "write_and_commit",
]


class SaveError(ZckptError, RuntimeError):
    """A save failed. ``errors`` maps rank -> text; ``committed`` tells the truth about the tag.

    ``committed`` is False when nothing of the save was committed (the tag, if it existed, still
    holds what it held); True when the tag was committed and loads by name but a step after the
    commit failed (replacing ``latest``, or retention): the message says which.

    Example:
        >>> e = SaveError("rank 1 failed", {1: "OSError: disk full"})
        >>> e.errors, e.committed
        ({1: 'OSError: disk full'}, False)
    """

    def __init__(
        self, message: str, errors: Mapping[int, str] | None = None, committed: bool = False
    ) -> None:
        super().__init__(message, dict(errors or {}), committed)

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def errors(self) -> dict[int, str]:
        """Each failed rank's error."""
        return dict(self.args[1])

    @property
    def committed(self) -> bool:
        """Whether the tag was committed despite the error."""
        return bool(self.args[2]) if len(self.args) > 2 else False


class ConcurrentSaveError(SaveError):
    """Another save of the same tag is running (a second job writing into the same directory);
    nothing was written. The message names the other writer.

    Example:
        >>> issubclass(ConcurrentSaveError, SaveError)
        True
    """


@dataclass(frozen=True)
class Saved:
    """Where a committed checkpoint lives.

    Example:
        >>> Saved("/ckpt/step3", "step3").tag
        'step3'
    """

    path: str
    tag: str


def _default_tag(state: Any, global_step: int | None) -> str:
    if global_step is None and isinstance(state, Mapping):
        for k in ("global_steps", "global_step"):
            v = state.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                global_step = v
                break
    if global_step is None:
        raise TagError(
            "no tag given and no global step known: pass tag=..., global_step=..., "
            "or keep an int 'global_steps' in the state"
        )
    return f"global_step{global_step}"


def _failure_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass(frozen=True, eq=False)
class PreparedSave:
    """A save after validation and the first collective round, before any file is written.

    ``shards`` are what this process writes (views of the caller's tensors: an asynchronous save
    replaces them with snapshots before handing the rest to a background thread).
    """

    save_dir: str
    tag: str
    generation: str
    spec: ZeroSpec
    shards: Sequence[Shard]
    skeleton: Skeleton | None  # the state's, recorded by the manifest; None if nothing to write
    client: dict[str, Any]
    frozen: tuple[str, ...]
    excluded_frozen: bool
    save_latest: bool
    keep_last: int | None
    encoding: dict[str, Any]
    comm: Comm
    storage: Storage
    lock: Lock | None = None  # rank 0's lock on the tag, held until the save ends
    created_tag_dir: bool = False  # rank 0 made the tag directory: a failed save removes it
    # Rank 0: the blob files of earlier generations in the tag directory, listed under the tag
    # lock before this save wrote anything (an overwrite's old generation, a killed save's):
    # removed once this save has committed.
    older_files: tuple[str, ...] = ()

    @property
    def tag_dir(self) -> str:
        """``save_dir/tag``."""
        return os.path.join(self.save_dir, self.tag)

    def with_shards(self, shards: tuple[Shard, ...], client: dict[str, Any]) -> PreparedSave:
        """The same save writing other shard data (snapshots)."""
        return dataclasses.replace(self, shards=shards, client=client)


def prepare_save(
    save_dir: str | os.PathLike[str],
    state: Any,
    spec: ZeroSpec | None = None,
    *,
    tag: str | None = None,
    client_state: Mapping[str, Any] | None = None,
    save_latest: bool = True,
    exclude_frozen_parameters: bool = False,
    frozen: Iterable[str] = (),
    global_step: int | None = None,
    tag_validation: str = "warn",
    overwrite: bool = False,
    keep_last: int | None = None,
    codec: str = "raw",
    level: int = 1,
    chunk_bytes: int = 8 << 20,
    comm: Comm | None = None,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> PreparedSave:
    """Validate a save and agree on it across ranks (round 1); write nothing yet.

    Every rank checks its own inputs, then the ranks all-gather their tags, a generation and any
    error, so a bad input on one rank makes every rank raise instead of leaving the others
    waiting. Arguments are those of :func:`save_checkpoint`.

    Example:
        >>> import tempfile, torch, zckpt
        >>> from zckpt.store._commit import prepare_save, write_and_commit
        >>> d, spec = tempfile.mkdtemp(), zckpt.ZeroSpec(2, 1)
        >>> p = prepare_save(d, {"w": torch.ones(4)}, spec, tag="t")
        >>> [s.rank for s in p.shards], write_and_commit(p).tag
        ([0, 1], 't')
    """
    storage, save_dir = storage_for(save_dir, storage, storage_options)
    comm = comm or SingleProcess()
    my_tag = ""
    shards: list[Shard] = []
    client: dict[str, Any] = {}
    exists = False
    lock: Lock | None = None
    created = False
    older: tuple[str, ...] = ()
    local_error: BaseException | None = None
    try:
        # Every argument is checked before anything touches the disk.
        _check_options(tag_validation, save_latest, overwrite, keep_last, codec, level, chunk_bytes)
        local_shard = state if isinstance(state, Shard) else None
        boxes: dict[int, LocalBox] = {}
        if local_shard is not None:
            spec = local_shard.spec if spec is None else spec
        else:
            kept = drop_frozen(state, frozen) if exclude_frozen_parameters else state
            skel, leaves = flatten(kept)
            # DTensor leaves (FSDP2, tensor parallelism): each rank writes its own blocks.
            boxes = local_boxes(skel, leaves, comm.size)
            if boxes and spec is None:
                spec = ZeroSpec(comm.size, 3)
        if spec is None:
            raise SpecError("save_checkpoint needs a spec (or a Shard, which carries one)")
        if comm.size > 1 and comm.size != spec.world_size:
            raise SpecError(
                f"the process group has {comm.size} ranks but the spec {spec.world_size}"
            )
        if boxes and comm.size != spec.world_size:
            raise SpecError(
                f"a state of DTensors is saved by every rank of its mesh (comm=TorchComm()): "
                f"one process cannot write the {spec.world_size} ranks of the spec"
            )
        my_tag = check_tag(tag if tag is not None else _default_tag(state, global_step))
        client = check_client_state(client_state)
        if local_shard is not None:
            shards = [local_shard]
        else:
            plan = plan_for(skel, spec)
            ranks = range(spec.world_size) if comm.size == 1 else [comm.rank]
            shards = [shard_state(kept, plan, r, boxes) for r in ranks]
        if comm.rank == 0:
            storage.makedirs(save_dir)
            lock = tag_lock(storage, save_dir, my_tag)
            tag_dir = os.path.join(save_dir, my_tag)
            exists, created, older = _survey(storage, tag_dir)
            storage.makedirs(tag_dir)
    except Exception as e:  # shared with every rank below, so none is left waiting
        local_error = e
    agreed = comm.all_gather(
        {
            "tag": my_tag,
            "gen": new_generation(),
            "exists": exists,
            "error": None if local_error is None else _failure_text(local_error),
        }
    )
    try:
        if local_error is not None:
            raise local_error
        failed = {r: a["error"] for r, a in enumerate(agreed) if a["error"] is not None}
        if failed:
            detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
            raise SaveError(f"saving to {save_dir} failed before writing: {detail}", failed)
        if spec is None:  # unreachable: a missing spec is a local error above
            raise SpecError("save_checkpoint needs a spec")
        check_same_tags([a["tag"] for a in agreed], tag_validation)
        tag, gen, exists = agreed[0]["tag"], agreed[0]["gen"], agreed[0]["exists"]
        if exists and not overwrite:
            raise TagError(
                f"{os.path.join(save_dir, tag)} already holds a committed checkpoint; "
                "pass overwrite=True"
            )
    except BaseException:
        if lock is not None:
            if created:
                storage.remove_dir(os.path.join(save_dir, my_tag))
            lock.release()
        raise
    return PreparedSave(
        save_dir=save_dir,
        tag=tag,
        generation=gen,
        spec=spec,
        shards=tuple(shards),
        skeleton=shards[0].skeleton if shards else None,
        client=client,
        frozen=tuple(frozen),
        excluded_frozen=exclude_frozen_parameters,
        save_latest=save_latest,
        keep_last=keep_last,
        encoding={"codec": codec, "level": level, "chunk_bytes": chunk_bytes},
        comm=comm,
        storage=storage,
        lock=lock,
        created_tag_dir=created,
        older_files=older,
    )


def _check_options(
    tag_validation: str,
    save_latest: bool,
    overwrite: bool,
    keep_last: int | None,
    codec: str,
    level: int,
    chunk_bytes: int,
) -> None:
    if tag_validation not in ("fail", "warn", "ignore"):
        raise TagError(f"tag_validation must be 'fail', 'warn' or 'ignore', got {tag_validation!r}")
    for name, v in (("save_latest", save_latest), ("overwrite", overwrite)):
        if not isinstance(v, bool):
            raise ArgumentError(f"{name} must be True or False, got {v!r}")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise ArgumentError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    try:
        _encode._check_args(codec, level, chunk_bytes, None)
    except ValueError as e:
        raise ArgumentError(str(e)) from None


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
    reports = comm.all_gather(
        {"records": records, "errors": {str(k): v for k, v in errors.items()}}
    )
    failed = {int(k): v for r in reports for k, v in r["errors"].items()}
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


_LOCK_PATIENCE = 3.0  # seconds a save waits for a tag lock held by retention or clean


def tag_lock(storage: Storage, save_dir: str, tag: str) -> Lock:
    """The lock on ``save_dir/tag`` for a save, or a :class:`ConcurrentSaveError` naming the
    process that holds it. A killed save's lease lock (object stores) is waited out and taken
    over; one whose holder keeps renewing it is refused (see
    :func:`~zckpt.store._layout.wait_tag_lock`)."""
    lock, waited = wait_tag_lock(storage, save_dir, tag, _LOCK_PATIENCE)
    if lock is None:
        owner = storage.lock_owner(os.path.join(save_dir, lock_name(tag))) or "another process"
        raise ConcurrentSaveError(
            f"{os.path.join(save_dir, tag)}: another save of this tag is running ({owner}; "
            f"still holding its lock after {waited:.1f} s); nothing was written. Two jobs are "
            "writing into one save_dir: stop the other one, or save under another tag"
        )
    return lock


def _survey(storage: Storage, tag_dir: str) -> tuple[bool, bool, tuple[str, ...]]:
    """Rank 0, holding the tag's lock: whether the tag is committed, whether its directory is
    absent (this save creates it), and the blob files of earlier generations in it.

    One listing answers all three for a new tag: the manifest is read (to tell a valid one
    from a torn or foreign file) only when the listing shows one, and whether the directory
    exists is asked only when the listing is empty on a store with real directories (where a
    directory is a name prefix, ``dirs_are_prefixes``, an empty listing is an absent
    directory and there is none to remove). The store's listings must see every object
    written before them (``docs/layout.md``); the tag lock keeps other saves of the tag out
    until this one ends, and retention and ``clean`` skip a locked tag, so the files listed
    here are the older generations still there at the commit.
    """
    names = storage.listdir(tag_dir)
    committed = MANIFEST in names and _manifest_generation(storage, tag_dir) is not None
    if names or getattr(storage, "dirs_are_prefixes", False):
        absent = not names
    else:
        absent = not storage.exists(tag_dir)
    older = tuple(n for n in names if generation_of(n) is not None)
    return committed, absent, older


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


def _manifest_generation(storage: Storage, tag_dir: str) -> str | None:
    """The committed generation of a tag directory, or None when nothing valid is committed."""
    try:
        return read_manifest(storage, tag_dir).generation
    except (ZckptError, OSError):
        return None


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
