"""Round 1 of the save protocol behind save_checkpoint (:func:`prepare_save`): every rank
validates its inputs and the ranks agree on the tag, a generation and any error, before any
file is written; rank 0 takes the tag's lock (:func:`tag_lock`) and surveys the tag directory
(committed or not, earlier generations' files). Its result, a :class:`PreparedSave`, is what
rounds 2 and 3 (``_commit.py: write_and_commit``) write and commit, on the caller's thread or,
for an asynchronous save, a background one; the rounds are apart because that second half is
run on its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zckpt.dist import Comm, SingleProcess
from zckpt.dist._dtensor import local_boxes
from zckpt.errors import ArgumentError, SpecError, ZckptError
from zckpt.format import _encode
from zckpt.shard import LocalBox, Shard, shard_state
from zckpt.spec import ZeroSpec
from zckpt.store._blobs import check_client_state, drop_frozen, plan_for
from zckpt.store._layout import (
    MANIFEST,
    TagError,
    check_same_tags,
    check_tag,
    generation_of,
    lock_name,
    new_generation,
    wait_tag_lock,
)
from zckpt.store._read import read_manifest
from zckpt.store._resolve import storage_for
from zckpt.store._save_result import ConcurrentSaveError, SaveError, _failure_text
from zckpt.store._storage import Lock, Storage
from zckpt.tree import Skeleton, flatten

__all__ = ["PreparedSave", "prepare_save", "tag_lock"]


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
        >>> from zckpt.store._commit import write_and_commit
        >>> from zckpt.store._prepare import prepare_save
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


def _manifest_generation(storage: Storage, tag_dir: str) -> str | None:
    """The committed generation of a tag directory, or None when nothing valid is committed."""
    try:
        return read_manifest(storage, tag_dir).generation
    except (ZckptError, OSError):
        return None
