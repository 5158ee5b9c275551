"""load_checkpoint: each rank reads only the byte ranges it must hold, at any world size/stage."""

from __future__ import annotations

import errno
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from zckpt.assemble import assemble
from zckpt.dist._dtensor import local_box
from zckpt.errors import ArgumentError, CoverageError, SpecError, StateError, ZckptError
from zckpt.shard import LocalBox
from zckpt.spec import Fragment, ShardPlan, ZeroSpec, plan_shards
from zckpt.store._checkpoint import Checkpoint
from zckpt.store._explain import DCP, DEEPSPEED, explain
from zckpt.store._read import CheckpointNotFoundError, following_latest, locate
from zckpt.store._resolve import storage_for
from zckpt.store._storage import Storage
from zckpt.tree import (
    DICT,
    LIST,
    TENSOR,
    TUPLE,
    VALUE,
    Skeleton,
    format_path,
    iter_nodes,
    unflatten,
)

__all__ = ["SKIP", "LoadError", "Loaded", "load_checkpoint"]

log = logging.getLogger("zckpt")

OPTIMIZER, LR_SCHEDULER = "optimizer", "lr_scheduler"


class LoadError(ZckptError, RuntimeError):
    """The checkpoint cannot be loaded as asked (e.g. strict module keys do not match).

    Example:
        >>> issubclass(LoadError, RuntimeError)
        True
    """


class Loaded(NamedTuple):
    """What :func:`load_checkpoint` returns.

    ``load_path`` is the tag directory (None when nothing could be loaded); ``state`` the
    restored state: tensors this rank holds whole have their shape, partitioned tensors are this
    rank's 1-D range (``plan.holds(rank)`` says which); ``plan`` the plan it was loaded with.

    Example:
        >>> Loaded(None, {}, None, None, (), ()).load_path is None
        True
        >>> import torch
        >>> Loaded("/ck/t", {"epoch": 1}, {"w": torch.ones(2)}, None, (), ())
        Loaded(load_path='/ck/t', 1 tensors, 8 bytes, client_state keys ['epoch'], ...)
    """

    load_path: str | None
    client_state: dict[str, Any]
    state: Any
    plan: ShardPlan | None
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]

    def __repr__(self) -> str:
        if self.load_path is None:
            return "Loaded(load_path=None: nothing loaded)"
        n = nbytes = 0
        for t in tree_tensors(self.state):
            n, nbytes = n + 1, nbytes + t.numel() * t.element_size()
        spec = self.plan.spec if self.plan is not None else None
        where = "" if spec is None else f", world_size={spec.world_size}, stage={spec.stage}"
        return (
            f"Loaded(load_path={self.load_path!r}, {n} tensors, {nbytes} bytes{where}, "
            f"client_state keys {sorted(map(str, self.client_state))}, "
            f"missing_keys={list(self.missing_keys)}, unexpected_keys={list(self.unexpected_keys)})"
        )


def tree_tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in a pytree (iteratively: states may nest deep)."""
    out, stack = [], [x]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return out


def _keep_top(skel: Skeleton, drop: set[str]) -> tuple[Any, list[int]]:
    """The skeleton tree without the dropped top-level keys, and the leaves still referenced."""
    tag, body = skel.node
    node = (tag, tuple((k, v) for k, v in body if k not in drop)) if tag == DICT else skel.node
    leaves = sorted({n[1] for _, n in iter_nodes(node) if n[0] == TENSOR})
    return node, leaves


def load_checkpoint(
    load_dir: str | os.PathLike[str],
    spec: ZeroSpec | None = None,
    rank: int = 0,
    *,
    tag: str | None = None,
    world_size: int | None = None,
    stage: int | None = None,
    load_module_strict: bool = True,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
    load_module_only: bool = False,
    custom_load_fn: Callable[[dict[str, Any]], Any] | None = None,
    module_keys: Iterable[str] | None = None,
    load_masters: bool | None = None,
    into: Any = None,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Loaded:
    """Load a committed checkpoint at any world size and stage; rank ``rank`` reads only its ranges.

    The state is read as the target spec says this rank holds it: its partition of every
    partitioned tensor (as a 1-D tensor) and every replicated tensor whole. With no ``spec``
    and no ``world_size`` the whole state is loaded (one process, or plain data parallelism).

    Args:
        load_dir: a ``save_dir`` (tag from ``tag``, else ``latest``, else ``latest_universal``)
            or a tag directory.
        spec: the target partition spec; default: the saved one, at ``world_size``/``stage``
            when given, else at world size 1.
        rank: this rank in the target spec.
        tag: which tag of ``load_dir``.
        world_size: shorthand for the saved spec at another world size.
        stage: shorthand for the saved spec at another stage (with or without world_size).
        load_module_strict: module keys must equal ``module_keys`` exactly (when given); else
            missing keys are reported and unexpected ones dropped.
        load_optimizer_states: load the ``optimizer`` subtree and the fp32 masters.
        load_lr_scheduler_states: load the ``lr_scheduler`` subtree.
        load_module_only: load only the ``module`` subtree (client_state is still returned).
        custom_load_fn: replaces the module loading step: it receives the loaded module
            subtree and returns what goes into the state's module slot (None drops it).
        module_keys: the module keys your model expects, for strict/non-strict checks.
        load_masters: load the fp32 masters (default: with the optimizer states); True keeps
            them even with ``load_module_only`` or ``load_optimizer_states=False``, for an fp32
            model resuming a mixed-precision run (the masters are its exact weights).
        into: destinations to read into, in place: a pytree shaped like the state (or like
            this rank's holdings), whose tensor leaves receive the values where they live (raw
            chunks are read straight into their memory, compressed ones decoded into it; no
            fresh memory, no copy). A destination must be a contiguous tensor of the saved dtype
            and shape (or flat: 1-D of the tensor's element count, or, for a partitioned
            tensor, of this rank's range's), sharing no memory with another saved tensor's
            destination: anything else is a :class:`LoadError` naming the path. A leaf set to
            :data:`SKIP` is not read at all (and is absent from the result); paths ``into``
            does not name get new tensors. A DTensor (FSDP2, tensor parallelism; placements
            ``Shard(d)`` and ``Replicate()`` on a mesh of any shape) or a
            :class:`~zckpt.LocalBox` receives only its own block of the saved global tensor,
            whatever world size, mesh and placements saved it: each run of the block is read
            straight into the local tensor (staged through host memory when it is on a GPU),
            and the result holds the DTensor itself; ``rank`` and the spec play no part for
            it. Its global shape and dtype must be the saved tensor's (else a LoadError).
        storage: the filesystem (default: local files, or the fsspec filesystem of a URL such
            as ``s3://bucket/run1``: see :func:`~zckpt.store.storage_for`).
        storage_options: options for a URL's fsspec filesystem (``endpoint_url``, ...).

    Returns:
        :class:`Loaded` ``(load_path, client_state, state, plan, missing_keys, unexpected_keys)``;
        ``load_path`` is None when no tag was given and there is no ``latest`` (DeepSpeed's
        contract): logged for a directory with no checkpoint yet (a fresh run); a
        ``UserWarning`` saying exactly why when the path does not exist, holds something that is
        not a checkpoint, or holds committed tags but no ``latest`` (they are listed).

    Raises:
        CheckpointNotFoundError: a named tag (or the one ``latest`` names) is not committed,
            or ``load_dir`` is a DeepSpeed checkpoint (the message says how to convert it).
        ArgumentError: a world size, stage or rank out of range.
        FormatError: a manifest or blob is corrupt (names the file, tensor and offset).
        LoadError: strict module keys do not match.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> state = {"module": {"w": torch.arange(6.0)}, "master": {"w": torch.arange(6.0)}}
        >>> _ = zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(2, 2), tag="t")
        >>> got = zckpt.load_checkpoint(d, world_size=3, rank=2)
        >>> got.state["master"]["w"].tolist(), got.state["module"]["w"].shape
        ([4.0, 5.0], torch.Size([6]))
    """
    storage, load_dir = storage_for(load_dir, storage, storage_options)
    _check_target(world_size, stage, rank)
    found = locate(storage, load_dir, tag)  # latest is read here, once
    if found is None:
        reason = explain(load_dir, tag, storage=storage)
        if reason.kind in (DEEPSPEED, DCP):  # a checkpoint, of another kind: never "nothing"
            raise CheckpointNotFoundError(errno.ENOENT, reason.message)
        if reason.fresh:  # a directory meant for checkpoints, none saved yet: DeepSpeed's None
            log.warning("zckpt: nothing loaded: %s", reason.message)
        else:
            warnings.warn(f"zckpt: nothing loaded: {reason.message}", stacklevel=2)
        return Loaded(None, {}, None, None, (), ())
    keys = None if module_keys is None else list(module_keys)

    def attempt(ck: Checkpoint) -> Loaded:
        return _load(
            ck,
            spec,
            rank,
            world_size,
            stage,
            load_module_strict,
            load_optimizer_states,
            load_lr_scheduler_states,
            load_module_only,
            custom_load_fn,
            keys,
            load_masters,
            into,
        )

    return following_latest(storage, load_dir, tag, found=found, use=attempt)


class _Skip:
    def __repr__(self) -> str:
        return "SKIP"


SKIP: Any = _Skip()
"""An ``into=`` leaf that tells :func:`load_checkpoint` not to read that tensor."""


def _lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    """``tree`` at ``path``, or None where it has no such entry."""
    node = tree
    for k in path:
        if node is SKIP:  # a whole subtree skipped
            return SKIP
        if isinstance(node, Mapping):
            if k not in node:
                return None
            node = node[k]
        elif isinstance(node, list | tuple) and isinstance(k, int) and 0 <= k < len(node):
            node = node[k]
        else:
            return None
    return node


class _Routes:
    """Where ``into`` sends each saved tensor: ``read[leaf]`` is the memory the leaf is read
    into (a tensor), or SKIP when every path of the leaf says SKIP; ``paths`` holds every path
    that names a destination. A leaf has one value but may have several paths (a tied weight,
    fp32 masters equal to fp32 weights): one tensor destination wins the read, the other paths'
    tensors get a copy, SKIP paths are left out of the result, and a path ``into`` does not name
    still gets the value (read fresh when no path names a tensor)."""

    def __init__(self, skel: Skeleton, into: Any, keep: list[int]) -> None:
        self.paths: dict[tuple[Any, ...], Any] = {}
        self.read: dict[int, Any] = {}
        # Leaves read as a block of a distributed tensor: a LocalBox, or a DTensor's.
        self.boxes: dict[int, LocalBox] = {}
        wanted, fresh = set(keep), set()
        for path, n in iter_nodes(skel.node):
            if n[0] != TENSOR or n[1] not in wanted:
                continue
            d = _lookup(into, path)
            if d is None:
                fresh.add(n[1])
                continue
            box = d if isinstance(d, LocalBox) else None
            if d is not SKIP and box is None and not isinstance(d, torch.Tensor):
                raise LoadError(
                    f"into={format_path(path)}: expected a tensor or SKIP (or a LocalBox), got "
                    f"{type(d).__name__}"
                )
            if box is None and d is not SKIP:
                try:
                    box = local_box(d, f"into={format_path(path)}")
                except StateError as e:
                    raise LoadError(str(e)) from None
            self.paths[path] = d
            prior = self.read.get(n[1], SKIP)
            if box is not None or n[1] in self.boxes:
                same = box is not None and _same_block(self.boxes.get(n[1]), box)
                if prior is not SKIP and prior is not d and not same:
                    raise LoadError(
                        f"into={format_path(path)}: {skel.name(n[1])} is tied to another path "
                        "with another destination; a distributed tensor's paths must name the "
                        "same one"
                    )
                if box is not None:
                    self.boxes[n[1]] = box
            if prior is SKIP:
                self.read[n[1]] = d
        for leaf in fresh:
            if self.read.get(leaf) is SKIP:
                del self.read[leaf]  # another path wants it: read fresh

    @property
    def skipped(self) -> set[int]:
        return {leaf for leaf, d in self.read.items() if d is SKIP}

    def copies(self, node: Any) -> list[tuple[int, torch.Tensor]]:
        """(leaf, tensor) for every destination of ``node``'s tree that is not its leaf's read
        memory and must receive a copy."""
        out = []
        for path, n in iter_nodes(node):
            d = self.paths.get(path) if n[0] == TENSOR else None
            if n[0] == TENSOR and n[1] in self.boxes:
                continue  # one destination (checked above)
            if isinstance(d, torch.Tensor) and not _same_memory(d, self.read[n[1]]):
                out.append((n[1], d))
        return out

    def route(self, node: Any, path: tuple[Any, ...] = ()) -> Any:
        """The skeleton tree as the result is built from it: a SKIP path dropped (a dict entry
        removed, a list item None), a path with its own destination holding that tensor."""
        tag, body = node
        if tag == TENSOR:
            d = self.paths.get(path)
            if d is SKIP:
                return None
            return node if d is None or d is self.read[body] else (VALUE, d)
        if tag == DICT:
            kids = ((k, self.route(v, (*path, k))) for k, v in body)
            return (DICT, tuple((k, v) for k, v in kids if v is not None))
        if tag in (LIST, TUPLE):
            kids = (self.route(v, (*path, i)) for i, v in enumerate(body))
            return (tag, tuple((VALUE, None) if v is None else v for v in kids))
        return node


def _same_block(a: LocalBox | None, b: LocalBox) -> bool:
    """Two destinations of a tied distributed tensor that are one block of one memory (an
    FSDP2 model's tied weight: two DTensor objects over its local shard): one read fills both."""
    return (
        a is not None
        and a.box == b.box
        and a.shape == b.shape
        and _same_memory(a.data, b.data)
        and a.data.stride() == b.data.stride()
    )


def _same_memory(a: torch.Tensor, b: Any) -> bool:
    return (
        isinstance(b, torch.Tensor)
        and a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.numel() == b.numel()
    )


def _destination(skel: Skeleton, f: Fragment, d: torch.Tensor | None) -> torch.Tensor | None:
    """The 1-D view of ``d`` that fragment ``f`` is read into (None: a new tensor)."""
    if d is None:
        return None
    meta = skel.tensors[f.leaf]
    whole = f.start == 0 and f.stop == meta.numel
    where = f"into={skel.name(f.leaf)}"
    if d.dtype != meta.dtype:
        raise LoadError(f"{where}: the destination is {d.dtype}, the checkpoint holds {meta.dtype}")
    if d.numel() not in ({meta.numel, f.numel} if whole else {f.numel}):
        what = f"{meta.numel} elements" if whole else f"this rank's {f.numel} elements"
        raise LoadError(
            f"{where}: the destination has {d.numel()} elements, the checkpoint {what} "
            f"([{f.start}, {f.stop}) of {list(meta.shape)})"
        )
    if whole and d.dim() != 1 and tuple(d.shape) != tuple(meta.shape):
        # As many elements in another shape: a transposed weight would be filled row by row.
        raise LoadError(
            f"{where}: the destination's shape is {list(d.shape)}, the checkpoint's "
            f"{list(meta.shape)}; pass a tensor of the saved shape (or a flat 1-D one)"
        )
    if not d.is_contiguous() or d.device.type != "cpu":
        raise LoadError(f"{where}: the destination must be a contiguous CPU tensor")
    return d.detach().view(-1)


def _box_views(skel: Skeleton, leaf: int, b: LocalBox) -> list[tuple[Fragment, torch.Tensor]]:
    """Each run of box ``b`` of ``leaf`` and the 1-D view of the box's memory it is read into;
    a box of another global shape or dtype than the saved tensor is a LoadError."""
    meta = skel.tensors[leaf]
    where = f"into={skel.name(leaf)}"
    if b.shape != meta.shape:
        raise LoadError(
            f"{where}: the destination is a block of a {list(b.shape)} tensor, the checkpoint "
            f"holds {list(meta.shape)}"
        )
    if b.data.dtype != meta.dtype:
        raise LoadError(
            f"{where}: the destination is {b.data.dtype}, the checkpoint holds {meta.dtype}"
        )
    if not b.data.is_contiguous():
        raise LoadError(f"{where}: the destination's local tensor must be contiguous")
    flat = b.data.detach().view(-1)
    return [(f, flat[at : at + f.numel]) for f, at in b.runs(leaf)]


def _check_disjoint(skel: Skeleton, dests: list[tuple[int, torch.Tensor]]) -> None:
    """Refuse destinations of different saved tensors that share memory (the same tensor
    passed twice, overlapping views of one buffer): whichever is read last would overwrite
    the other, and the load would return as if both held their values. Paths of one leaf
    (tied weights) may share memory: they receive the same values."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), leaf)
        for leaf, t in dests
        if t.numel()
    )
    best = other = (0, -1)  # the furthest end so far (end, leaf); the furthest of other leaves
    for start, end, leaf in spans:
        hit = other if leaf == best[1] else best
        if start < hit[0]:
            x, y = sorted((leaf, hit[1]))
            raise LoadError(
                f"into={skel.name(x)} and into={skel.name(y)}: the destinations share memory, "
                "but the checkpoint holds two different tensors there; pass a tensor of its "
                "own to each"
            )
        if leaf == best[1]:
            best = max(best, (end, leaf))
        elif end > best[0]:
            best, other = (end, leaf), best
        elif end > other[0]:
            other = (end, leaf)


def _check_target(world_size: int | None, stage: int | None, rank: int) -> None:
    for name, v, lo in (("world_size", world_size, 1), ("stage", stage, 1), ("rank", rank, 0)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ArgumentError(f"load_checkpoint: {name} must be an int >= {lo}, got {v!r}")
    if stage is not None and stage > 3:
        raise ArgumentError(f"load_checkpoint: stage must be 1, 2 or 3, got {stage!r}")


def _load(
    ck: Checkpoint,
    spec: ZeroSpec | None,
    rank: int,
    world_size: int | None,
    stage: int | None,
    load_module_strict: bool,
    load_optimizer_states: bool,
    load_lr_scheduler_states: bool,
    load_module_only: bool,
    custom_load_fn: Callable[[dict[str, Any]], Any] | None,
    module_keys: Iterable[str] | None,
    load_masters: bool | None,
    into: Any = None,
) -> Loaded:
    saved = ck.manifest.spec
    if spec is None:
        spec = saved.with_world_size(world_size or 1, stage)
    elif world_size is not None or stage is not None:
        raise SpecError("pass either spec or world_size/stage, not both")
    skel = ck.manifest.skeleton
    plan = plan_shards(skel, spec)
    plan._check_rank(rank)

    drop: set[str] = set()
    masters = (
        load_optimizer_states and not load_module_only if load_masters is None else load_masters
    )
    if load_module_only:
        drop = {str(k) for k, _ in skel.node[1]} - {saved.module} if skel.node[0] == DICT else set()
    else:
        if not load_optimizer_states:
            drop.add(OPTIMIZER)
        if not load_lr_scheduler_states:
            drop.add(LR_SCHEDULER)
    if masters:
        drop.discard(saved.master)
    else:
        drop.add(saved.master)
    node, keep = _keep_top(skel, drop)
    routes = None if into is None else _Routes(skel, into, keep)
    dests: dict[int, Any] = {} if routes is None else routes.read
    copies: list[tuple[int, torch.Tensor]] = []
    if routes is not None:
        skipped = routes.skipped
        keep = [leaf for leaf in keep if leaf not in skipped]
        copies = routes.copies(node)
        node = routes.route(node)
    kept = set(keep)
    boxes = {} if routes is None else {k: b for k, b in routes.boxes.items() if k in kept}

    held = [f for f in plan.holds(rank) if f.leaf in kept and f.leaf not in boxes]
    outs = [_destination(skel, f, dests.get(f.leaf)) for f in held] if dests else None
    # A box's runs are read into the box's own memory (staged when it is not on the CPU).
    staged: list[tuple[int, torch.Tensor]] = []
    for leaf, b in boxes.items():
        if outs is None:
            outs = [None] * len(held)
        for f, run in _box_views(skel, leaf, b):
            on_host = run.device.type == "cpu"
            if not on_host:
                staged.append((len(held), run))
            held.append(f)
            outs.append(run if on_host else None)
    # Checked before anything is read: the other destinations of a leaf, for its copies.
    extra: dict[int, list[torch.Tensor]] = {}
    for leaf, d in copies:
        extra.setdefault(leaf, []).append(d)
    copy_into = [
        (i, view)
        for i, f in enumerate(held)
        for d in extra.get(f.leaf, ())
        if (view := _destination(skel, f, d)) is not None
    ]
    _check_disjoint(
        skel,
        [(f.leaf, v) for f, v in zip(held, outs or ()) if v is not None]
        + [(held[i].leaf, v) for i, v in copy_into],
    )
    index = ck.source_index()
    try:
        with ck.reading():  # each blob opened once for the load (one disk stream per blob)
            parts = assemble(index, held, out=outs)
    except CoverageError as e:
        raise CoverageError(f"{ck.path}: {e}") from None
    ck.check_skeleton()  # no read when this rank read a header (the first one checked it)
    for i, view in copy_into:
        view.copy_(parts[i])
    for i, run in staged:
        run.copy_(parts[i])
    leaves: list[Any] = [None] * len(skel.tensors)
    for leaf in keep:
        meta = skel.tensors[leaf]
        # Empty tensors have no fragment: their shape says it all. A partitioned tensor of which
        # this rank holds nothing (more ranks than elements) is an empty 1-D range.
        leaves[leaf] = torch.empty(meta.shape if meta.numel == 0 else (0,), dtype=meta.dtype)
    for f, t in zip(held, parts):
        if f.leaf in boxes:
            continue
        meta = skel.tensors[f.leaf]
        whole = f.start == 0 and f.stop == meta.numel
        leaves[f.leaf] = t.view(meta.shape) if whole else t
    for leaf in boxes:
        leaves[leaf] = dests[leaf]  # the DTensor (or LocalBox) itself, now holding its block
    state = unflatten(Skeleton(node, skel.tensors, skel.paths), leaves)

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    if isinstance(state, dict) and saved.module in state:
        module = state[saved.module]
        if module_keys is not None and isinstance(module, dict):
            expected = list(module_keys)
            missing = tuple(k for k in expected if k not in module)
            unexpected = tuple(k for k in module if k not in set(expected))
            if load_module_strict and (missing or unexpected):
                raise LoadError(
                    f"{ck.path}: module keys do not match (strict): missing {list(missing)}, "
                    f"unexpected {list(unexpected)}"
                )
            for k in unexpected:
                del module[k]
        if custom_load_fn is not None:
            replaced = custom_load_fn(module)
            if replaced is None:
                del state[saved.module]
            else:
                state[saved.module] = replaced
    return Loaded(ck.path, ck.client_state(), state, plan, missing, unexpected)
