"""save_checkpoint: every rank writes its shard durably; rank 0 commits the manifest."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import zckpt
from zckpt.dist import Comm, SingleProcess
from zckpt.errors import SpecError, StateError, ZckptError
from zckpt.format import encode_shard_parts
from zckpt.shard import Shard, shard_state
from zckpt.spec import ZeroSpec, plan_shards
from zckpt.store._layout import (
    MANIFEST,
    TagError,
    blob_name,
    check_same_tags,
    check_tag,
    client_name,
    generation_of,
    new_generation,
    write_latest,
)
from zckpt.store._manifest import FileRecord, Manifest, encode_manifest
from zckpt.store._read import read_manifest
from zckpt.store._retention import apply_retention
from zckpt.store._storage import LocalStorage, Storage
from zckpt.tree import Skeleton, flatten

__all__ = ["SaveError", "Saved", "save_checkpoint"]


class SaveError(ZckptError, RuntimeError):
    """A save failed on one or more ranks; nothing was committed. ``errors`` maps rank -> text.

    Example:
        >>> e = SaveError("rank 1 failed", {1: "OSError: disk full"})
        >>> e.errors
        {1: 'OSError: disk full'}
    """

    def __init__(self, message: str, errors: Mapping[int, str] | None = None) -> None:
        super().__init__(message, dict(errors or {}))

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def errors(self) -> dict[int, str]:
        """Each failed rank's error."""
        return dict(self.args[1])


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


def drop_frozen(state: Any, frozen: Iterable[str]) -> Any:
    """The state without any dict entry keyed by a frozen parameter name.

    Example:
        >>> drop_frozen({"module": {"a": 1, "f": 2}, "master": {"a": 3}}, ["f"])
        {'module': {'a': 1}, 'master': {'a': 3}}
    """
    names = set(frozen)
    if not names:
        return state

    def walk(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: walk(v) for k, v in x.items() if k not in names}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return tuple(walk(v) for v in x)
        return x

    return walk(state)


def _check_client_state(client_state: Any) -> Any:
    if client_state is None:
        return {}
    if not isinstance(client_state, Mapping):
        raise StateError(f"client_state must be a dict, got {type(client_state).__name__}")
    try:
        flatten(client_state)
    except StateError as e:
        raise StateError(f"client_state: {e}") from None
    return dict(client_state)


def _write_blob(
    storage: Storage, tag_dir: str, name: str, shard: Shard, rank: int, enc: Mapping[str, Any]
) -> FileRecord:
    parts = encode_shard_parts(shard, **enc)
    size, digest = storage.write_atomic(os.path.join(tag_dir, name), parts.buffers)
    return FileRecord(name, rank, size, digest, shard.fragments)


def _client_shard(client_state: Mapping[str, Any]) -> Shard:
    plan = plan_shards(client_state, ZeroSpec(1, 1))
    return shard_state(client_state, plan, 0)


def _failure_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def save_checkpoint(
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
) -> Saved:
    """Save a sharded training state as ``save_dir/<tag>``, committed atomically.

    Every rank calls it and writes only its own shard; rank 0 creates the directory and, once every
    rank's file is durable, writes the manifest that commits the tag, then ``latest``. Without
    ``comm`` one process plays every rank of ``spec`` (tests, harnesses, offline conversion).

    Args:
        save_dir: the checkpoint directory (created if needed).
        state: the full state (each rank's shard is cut from it with ``spec``), or this rank's
            :class:`~zckpt.Shard` (e.g. from :func:`zckpt.shard_from_local`).
        spec: the partition spec (taken from the shard when ``state`` is a shard).
        tag: the checkpoint's name; default ``global_step{N}``, N from ``global_step`` or the
            state's ``global_steps``.
        client_state: your own values (msgpack-able values and tensors), kept in their own
            namespace; anything else is refused with its key path.
        save_latest: point ``latest`` at this tag after the commit.
        exclude_frozen_parameters: leave the parameters named in ``frozen`` out (module weights,
            masters and optimizer state keyed by them).
        frozen: names of frozen (``requires_grad=False``) parameters; recorded in the manifest.
        global_step: for the default tag.
        tag_validation: ``"warn"``, ``"ignore"`` or ``"fail"`` when ranks pass different tags.
        overwrite: replace an existing committed tag (atomically: the old checkpoint stays
            complete until the new manifest replaces it).
        keep_last: after the commit, delete all but the newest ``keep_last`` committed tags
            (never the one ``latest`` names).
        codec: ``"raw"`` (fastest), ``"zstd"`` or ``"byteplane"`` (float-aware, smallest).
        level: zstd level.
        chunk_bytes: frame size: the unit of checksums, parallel compression and partial reads.
        comm: the process group (:mod:`zckpt.dist`); None for one process writing every rank.
        storage: the filesystem (default: local POSIX files).

    Returns:
        :class:`Saved` with the tag directory and tag.

    Raises:
        TagError: unsafe tag, tags differ (``"fail"``), or the tag exists without ``overwrite``.
        StateError: something in the state or client_state cannot be stored (named by path).
        SaveError: a rank failed to write; names every failed rank; nothing was committed.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> state = {"master": {"w": torch.arange(6.0)}, "global_steps": 10}
        >>> zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(world_size=2, stage=1)).tag
        'global_step10'
        >>> import pathlib
        >>> pathlib.Path(d, "latest").read_text()
        'global_step10'
    """
    storage = storage or LocalStorage()
    comm = comm or SingleProcess()
    save_dir = os.fspath(save_dir)
    local_shard = state if isinstance(state, Shard) else None
    if local_shard is not None:
        spec = local_shard.spec if spec is None else spec
    if spec is None:
        raise SpecError("save_checkpoint needs a spec (or a Shard, which carries one)")
    if comm.size > 1 and comm.size != spec.world_size:
        raise SpecError(f"the process group has {comm.size} ranks but the spec {spec.world_size}")
    my_tag = check_tag(tag if tag is not None else _default_tag(state, global_step))
    client = _check_client_state(client_state)
    frozen_names = tuple(frozen)
    enc = {"codec": codec, "level": level, "chunk_bytes": chunk_bytes}

    # Round 1: agree on the tag and generation, and learn whether the tag already exists.
    tag_dir = os.path.join(save_dir, my_tag)
    exists = False
    if comm.rank == 0:
        storage.makedirs(save_dir)
        exists = _committed(storage, tag_dir)
        storage.makedirs(tag_dir)
    agreed = comm.all_gather({"tag": my_tag, "gen": new_generation(), "exists": exists})
    check_same_tags([a["tag"] for a in agreed], tag_validation)
    tag, gen, exists = agreed[0]["tag"], agreed[0]["gen"], agreed[0]["exists"]
    tag_dir = os.path.join(save_dir, tag)
    if exists and not overwrite:
        raise TagError(f"{tag_dir} already holds a committed checkpoint; pass overwrite=True")

    # Round 2: every rank writes its files durably and reports them (or its error).
    records: list[dict[str, Any]] = []
    errors: dict[int, str] = {}
    first_error: BaseException | None = None
    skeleton: Skeleton | None = None
    failing_rank = comm.rank
    try:
        if local_shard is not None:
            shards = [local_shard]
        else:
            kept = drop_frozen(state, frozen_names) if exclude_frozen_parameters else state
            plan = plan_shards(kept, spec)
            ranks = range(spec.world_size) if comm.size == 1 else [comm.rank]
            shards = [shard_state(kept, plan, r) for r in ranks]
        skeleton = shards[0].skeleton
        for sh in shards:
            failing_rank = sh.rank
            name = blob_name(gen, sh.rank, spec.world_size)
            records.append(_write_blob(storage, tag_dir, name, sh, sh.rank, enc).to_obj())
        if comm.rank == 0 and client:
            failing_rank = 0
            c = _write_blob(storage, tag_dir, client_name(gen), _client_shard(client), -1, enc)
            records.append(c.to_obj())
    except Exception as e:  # reported to every rank below, then raised as a SaveError
        errors[failing_rank], first_error = _failure_text(e), e
    reports = comm.all_gather(
        {"records": records, "errors": {str(k): v for k, v in errors.items()}}
    )
    failed = {int(k): v for r in reports for k, v in r["errors"].items()}
    if failed:
        if comm.rank == 0:
            _remove_generation(storage, tag_dir, gen)
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
        err = SaveError(f"saving {tag_dir} failed, nothing was committed: {detail}", failed)
        raise err from first_error

    # Round 3: rank 0 commits; every rank learns the outcome.
    commit_error: str | None = None
    if comm.rank == 0:
        try:
            if skeleton is None:  # unreachable: round 2 succeeded on rank 0
                raise ZckptError("internal error: no skeleton after a successful write")
            _commit(
                storage,
                save_dir,
                tag,
                gen,
                spec,
                skeleton,
                reports,
                frozen_names,
                exclude_frozen_parameters,
                save_latest,
                keep_last,
            )
        except (ZckptError, OSError) as e:
            commit_error = _failure_text(e)
            first_error = e
    outcome = comm.all_gather(commit_error)
    if outcome[0] is not None:
        raise SaveError(
            f"committing {tag_dir} failed: {outcome[0]}", {0: outcome[0]}
        ) from first_error
    return Saved(tag_dir, tag)


def _committed(storage: Storage, tag_dir: str) -> bool:
    try:
        read_manifest(storage, tag_dir)
    except (ZckptError, OSError):
        return False
    return True


def _remove_generation(storage: Storage, tag_dir: str, gen: str) -> None:
    for name in storage.listdir(tag_dir):
        if generation_of(name) == gen:
            storage.remove(os.path.join(tag_dir, name))


def _commit(
    storage: Storage,
    save_dir: str,
    tag: str,
    gen: str,
    spec: ZeroSpec,
    skeleton: Skeleton,
    reports: list[dict[str, Any]],
    frozen: tuple[str, ...],
    excluded: bool,
    save_latest: bool,
    keep_last: int | None,
) -> None:
    tag_dir = os.path.join(save_dir, tag)
    files = sorted(
        (FileRecord.from_obj(r) for rep in reports for r in rep["records"]),
        key=lambda f: f.rank,
    )
    client = next((f for f in files if f.rank == -1), None)
    files = [f for f in files if f.rank >= 0]
    manifest = Manifest(
        tag=tag,
        generation=gen,
        committed_at=time.time(),
        spec=spec,
        skeleton=skeleton,
        files=tuple(files),
        client=client,
        frozen=frozen,
        excluded_frozen=excluded,
        zckpt_version=zckpt.__version__,
    )
    storage.write_atomic(os.path.join(tag_dir, MANIFEST), [encode_manifest(manifest)])
    # The new generation is committed: files of earlier generations of this tag are garbage.
    for name in storage.listdir(tag_dir):
        g = generation_of(name)
        if g is not None and g != gen:
            storage.remove(os.path.join(tag_dir, name))
    if save_latest:
        write_latest(storage, save_dir, tag)
    if keep_last is not None:
        apply_retention(save_dir, keep_last, storage=storage)
