"""save_checkpoint: every rank writes its shard durably; rank 0 commits the manifest."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal, overload

from zckpt.dist import Comm
from zckpt.spec import ZeroSpec
from zckpt.store._async import AsyncSaver, PendingSave, dispatch
from zckpt.store._save_result import Saved, SaveError
from zckpt.store._storage import Storage

__all__ = ["SaveError", "Saved", "save_checkpoint"]


@overload
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
    storage_options: Mapping[str, Any] | None = None,
    async_: Literal[False] = False,
) -> Saved: ...


@overload
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
    storage_options: Mapping[str, Any] | None = None,
    async_: Literal[True] | AsyncSaver,
) -> PendingSave: ...


@overload
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
    storage_options: Mapping[str, Any] | None = None,
    async_: bool | AsyncSaver = False,
) -> Saved | PendingSave: ...


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
    storage_options: Mapping[str, Any] | None = None,
    async_: bool | AsyncSaver = False,
) -> Saved | PendingSave:
    """Save a sharded training state as ``save_dir/<tag>``, committed atomically.

    Every rank calls it and writes only its own shard; rank 0 creates the directory and, once every
    rank's file is durable, writes the manifest that commits the tag, then ``latest``. Without
    ``comm`` one process plays every rank of ``spec`` (tests, harnesses, offline conversion).

    Args:
        save_dir: the checkpoint directory (created if needed).
        state: the full state (each rank's shard is cut from it with ``spec``), or this rank's
            :class:`~zckpt.Shard` (e.g. from :func:`zckpt.shard_from_local`). DTensor leaves
            (an FSDP2 model's ``state_dict()``, ``get_optimizer_state_dict``) are saved by every
            rank of their mesh, each writing only its own local block (a replicated block once,
            by the replica at mesh coordinate 0), no gather; the manifest records the global
            shapes and dtypes. Placements ``Shard(d)`` and ``Replicate()``; ``Partial()`` and
            FSDP2-over-TP's strided sharding are refused (a ``StateError``).
        spec: the partition spec (taken from the shard when ``state`` is a shard); for a
            state of DTensors default ``ZeroSpec(comm.size, 3)`` (what its plain tensors follow).
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
        storage: the filesystem (default: local POSIX files, or the fsspec filesystem of a
            URL: ``s3://bucket/run1``, ``memory://run1``; see :func:`~zckpt.store.storage_for`).
        storage_options: options for the URL's fsspec filesystem (``endpoint_url``, ``key``,
            ``secret``, ...), as ``fsspec.open`` takes them.
        async_: ``True`` to return as soon as the state is copied into reused staging memory
            and write and commit in a background thread (with the process-wide
            :func:`~zckpt.store.default_saver`), or an :class:`~zckpt.store.AsyncSaver` to use
            that one. ``False`` (default): return once committed. Any save, synchronous too,
            first waits for the default saver's save in flight and raises its error.

    Returns:
        :class:`Saved` with the tag directory and tag; with ``async_``, a
        :class:`~zckpt.store.PendingSave` whose ``wait()`` returns it once committed.

    Raises:
        TagError: unsafe tag, tags differ (``"fail"``), or the tag exists without ``overwrite``.
        StateError: something in the state or client_state cannot be stored (named by path).
        SaveError: a rank failed to write; names every failed rank; nothing was committed.
            With ``async_``, raised by ``wait()`` and by the next save instead, on every rank.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> state = {"master": {"w": torch.arange(6.0)}, "global_steps": 10}
        >>> zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(world_size=2, stage=1)).tag
        'global_step10'
        >>> import pathlib
        >>> pathlib.Path(d, "latest").read_text()
        'global_step10'
        >>> state["global_steps"] = 11
        >>> pending = zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(2, 1), async_=True)
        >>> state["master"]["w"].zero_()[:2]                # training goes on at once
        tensor([0., 0.])
        >>> pending.wait().tag
        'global_step11'
        >>> zckpt.load_checkpoint(d).state["master"]["w"].tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    options: dict[str, Any] = dict(
        tag=tag,
        client_state=client_state,
        save_latest=save_latest,
        exclude_frozen_parameters=exclude_frozen_parameters,
        frozen=frozen,
        global_step=global_step,
        tag_validation=tag_validation,
        overwrite=overwrite,
        keep_last=keep_last,
        codec=codec,
        level=level,
        chunk_bytes=chunk_bytes,
        comm=comm,
        storage=storage,
        storage_options=storage_options,
    )
    return dispatch(async_, save_dir, state, spec, options)
