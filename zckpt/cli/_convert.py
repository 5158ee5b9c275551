"""``zckpt consolidate | reshard | convert | prune | clean``: the commands that write.

Every argument and the output path are checked before anything is written: a bad value, an
output that overlaps the input, or an existing output without ``--overwrite`` exits 1 with
nothing created. Exports are written whole or not at all (``zckpt/interop/_output.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import torch

import zckpt
from zckpt.assemble import ReshardedShards, index_sources
from zckpt.cli._consolidate import consolidate, end_process, export_to, output_kind
from zckpt.cli._inspect import source_codec
from zckpt.cli._main import CommandLineError, progress
from zckpt.cli._manage import clean, positive, prune
from zckpt.errors import SpecError
from zckpt.format._dtypes import cast_values
from zckpt.interop import (
    DeepSpeedFormatError,
    deepspeed_training_state,
    find_deepspeed,
    open_deepspeed,
)
from zckpt.interop._output import OutputExistsError, building_file, check_disjoint
from zckpt.interop._safetensors import module_key_order
from zckpt.spec._plan import EXPERT, REPLICATED, TENSOR
from zckpt.store._commit import write_and_commit
from zckpt.store._layout import LATEST, LATEST_UNIVERSAL, MANIFEST, TagError, generation_of
from zckpt.store._prepare import prepare_save
from zckpt.store._resolve import isdir, lexists, listdir
from zckpt.store._save_result import Saved

__all__ = [
    "WrittenShards",
    "clean",
    "consolidate",
    "consolidate_loaded",
    "convert",
    "output_kind",
    "prune",
    "reshard",
    "shard_nbytes",
    "source_codec",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLAG = "--overwrite"


def _nbytes(v: Any) -> int:
    n = 1
    for d in v.shape:
        n *= int(d)
    return n * torch.empty((), dtype=v.dtype).element_size()


def _save_torch(sd: dict[str, Any], out: str, dtype: torch.dtype, args: argparse.Namespace) -> int:
    done: dict[int, torch.Tensor] = {}  # by id: tied values stay one tensor in the file
    full: dict[str, torch.Tensor] = {}
    with building_file(out, overwrite=args.overwrite, flag=FLAG) as tmp:
        with progress(args, sum(_nbytes(v) for v in sd.values()), "read") as bar:
            for k, v in sd.items():
                if id(v) not in done:
                    t = v if isinstance(v, torch.Tensor) else v.contiguous()
                    done[id(v)] = cast_values(t, dtype, k) if t.is_floating_point() else t
                    bar.update(_nbytes(v))
                full[k] = done[id(v)]
        with open(tmp, "xb") as f:
            torch.save(full, f)
    print(f"wrote {out}: {len(full)} tensors")
    return 0


def _module_order(args: argparse.Namespace) -> list[str] | None:
    """The module's own key order (a DeepSpeed fp32 state dict comes in zero_to_fp32's), so
    shards are laid out as save_pretrained lays them out; None when it cannot be read."""
    try:
        return list(module_key_order(args.path, args.tag))
    except (zckpt.ZckptError, OSError):
        return None


def consolidate_loaded(args: argparse.Namespace, kind: str) -> int:
    """The rest of ``zckpt consolidate`` (:func:`zckpt.cli._consolidate.consolidate` checked the
    arguments and OUT) where torch does the reading: a zckpt checkpoint, or a ``.pt`` output.

    Example:
        >>> from zckpt.cli import main
        >>> main(["consolidate", "/nonexistent", "out.pt", "--quiet"])
        1
    """
    out: str = args.out
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(  # safetensors: streamed, always lazy
        args.path, args.tag, args.exclude_frozen, lazy_mode=args.lazy or kind != "torch"
    )
    dtype = DTYPES[args.dtype]
    if kind == "torch":
        code = _save_torch(sd, out, dtype, args)
        end_process(args)
        return code
    return export_to(sd, args, kind, _module_order(args))


def _check_save_dir(src: str, out: str) -> None:
    """Before reading: OUT is neither the input nor inside or around it, and not a file."""
    check_disjoint(src, out)
    if lexists(out) and not isdir(out):
        raise OutputExistsError(
            f"{out} exists and is not a directory; OUT is a checkpoint save_dir: "
            "choose another path"
        )


def _check_run(out: str, tag: str, overwrite: bool) -> None:
    """Refuse to add ``tag`` to a directory that already holds a training run, without
    ``--overwrite``; refuse always when OUT/tag holds files that are not zckpt's."""
    if not isdir(out):
        return
    tag_dir = os.path.join(out, tag)
    tags = [c.tag for c in zckpt.list_tags(out)]
    if tag not in tags and isdir(tag_dir):
        foreign = sorted(
            f for f in listdir(tag_dir) if not (f == MANIFEST or generation_of(f) is not None)
        )
        if foreign and not all(f.startswith(".") and ".tmp." in f for f in foreign):
            raise OutputExistsError(
                f"{tag_dir} holds files that are not a zckpt checkpoint's ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); tag {tag!r} cannot be written there: "
                "choose another OUT directory"
            )
    if overwrite:
        return
    pointers = [n for n in (LATEST, LATEST_UNIVERSAL) if lexists(os.path.join(out, n))]
    if not tags and not pointers:
        return
    held = [f"a '{n}' file" for n in pointers]
    if tags:
        shown = ", ".join(repr(t) for t in tags[-3:])
        more = "..., " if len(tags) > 3 else ""
        held.insert(0, f"committed tag{'s' if len(tags) > 1 else ''} {more}{shown}")
    replace = f" and replace its committed tag {tag!r}" if tag in tags else ""
    raise OutputExistsError(
        f"{out} already holds a training run ({'; '.join(held)}); writing tag {tag!r} there "
        f"would point its 'latest' at it{replace}: pass {FLAG} to do so, or choose a new directory"
    )


@contextlib.contextmanager
def _cli_wording(out: str, tag: str) -> Iterator[None]:
    """The store's refusal of an existing tag (a save that raced the up-front check), said
    with the command line's flag."""
    try:
        yield
    except TagError as e:
        committed = isdir(out) and tag in [c.tag for c in zckpt.list_tags(out)]
        if not committed:
            raise
        raise OutputExistsError(
            f"{os.path.join(out, tag)} already holds a committed checkpoint; pass {FLAG} "
            "to replace it (atomically)"
        ) from e


def shard_nbytes(shard: zckpt.Shard) -> int:
    """Bytes of tensor data a shard holds (before any codec).

    Example:
        >>> import torch, zckpt
        >>> s = {"w": torch.zeros(10)}
        >>> shard_nbytes(zckpt.shard_state(s, zckpt.plan_shards(s, zckpt.ZeroSpec(2, 1)), 0))
        24
    """
    return sum(f.numel * shard.skeleton.tensors[f.leaf].itemsize for f in shard.fragments)


class WrittenShards(Sequence[zckpt.Shard]):
    """``shards``, telling ``on_written(nbytes)`` each time the writer is done with one.

    The save protocol writes the shards it is given in order (``for shard in shards``): the
    writer asks for the next shard only once the previous one is written, so each step of the
    iteration reports the shard just written. Assembling, encoding and writing one new rank of
    ``zckpt reshard`` is one step; nothing in :mod:`zckpt.store` needs to know.

    Example:
        >>> import torch, zckpt
        >>> s = {"w": torch.zeros(10)}
        >>> plan = zckpt.plan_shards(s, zckpt.ZeroSpec(2, 1))
        >>> done = []
        >>> shards = WrittenShards([zckpt.shard_state(s, plan, r) for r in (0, 1)], done.append)
        >>> [sh.rank for sh in shards], done
        ([0, 1], [24, 16])
    """

    def __init__(self, shards: Sequence[zckpt.Shard], on_written: Callable[[int], None]) -> None:
        self._shards, self._on_written = shards, on_written

    def __len__(self) -> int:
        return len(self._shards)

    @overload
    def __getitem__(self, i: int) -> zckpt.Shard: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[zckpt.Shard]: ...
    def __getitem__(self, i: int | slice) -> zckpt.Shard | Sequence[zckpt.Shard]:
        return self._shards[i]

    def __iter__(self) -> Iterator[zckpt.Shard]:
        for shard in self._shards:
            yield shard
            self._on_written(shard_nbytes(shard))


def _check_ranks(args: argparse.Namespace, state: Any, new: zckpt.ZeroSpec) -> None:
    """Refuse, unless ``--allow-empty-ranks``, a world size past the most ranks that can hold
    any of the largest thing ZeRO partitions: a stage 1/2 flat buffer of n elements is cut into
    pieces of at least ``alignment`` elements (so at most ceil(n / alignment) ranks get one), a
    stage 3 tensor into pieces of at least one. The ranks past that would hold no partitioned
    state, yet each writes a file. A state with nothing partitioned (replicated tensors only,
    each written by one rank) allows as many ranks as it has elements; MoE experts pass.
    Planned at a small world size, so an absurd one costs nothing."""
    ws = new.world_size
    if args.allow_empty_ranks or ws == 1:
        return
    small = zckpt.plan_shards(state, dataclasses.replace(new, world_size=new.expert_parallel_size))
    skel = small.skeleton
    units: list[tuple[int, int, str, int]] = []  # (most ranks, elements, name, ranks at ws)
    for g in small.groups:
        part = new.padded(g.numel) // ws
        most = -(-g.numel // new.alignment)
        units.append((most, g.numel, g.key.split("[")[0] or "<root>", -(-g.numel // part)))
    for leaf, p in enumerate(small.placements):
        if p.kind == TENSOR:
            n = skel.tensors[leaf].numel
            units.append((n, n, skel.name(leaf), -(-n // -(-n // ws))))
    if not units:  # nothing partitioned: each replicated tensor is written by one rank
        held = [leaf for leaf, p in enumerate(small.placements) if p.kind == REPLICATED]
        total = sum(skel.tensors[leaf].numel for leaf in held)
        if ws <= total or any(p.kind == EXPERT for p in small.placements):
            return
        raise CommandLineError(
            f"{args.path}: --world-size {ws:,} is more ranks than the checkpoint has elements: "
            f"it partitions nothing (ZeRO stage {new.stage} replicates its {len(held):,} "
            f"tensors, {total:,} elements in all, each tensor written once, by one rank); "
            f"{ws - len(held):,} of the {ws:,} ranks would hold nothing, yet each writes a "
            f"file: choose --world-size {total:,} or fewer, or pass --allow-empty-ranks"
        )
    most, elements, name, _ = max(units)
    if ws <= most:
        return
    holding = max(r for *_, r in units)
    if new.stage == 3:
        how = "cuts each tensor into --world-size pieces"
    else:
        how = (
            "cuts each flat buffer into --world-size pieces of at least "
            f"{new.alignment} elements (the spec's alignment)"
        )
    largest = (
        f", and the largest, {name}, has {elements:,} elements: at most {most:,} ranks can "
        "hold a piece of it"
    )
    raise CommandLineError(
        f"{args.path}: --world-size {ws:,} is more ranks than there are elements to partition "
        f"(ZeRO stage {new.stage} {how}{largest}); {ws - holding:,} of the {ws:,} ranks would "
        f"hold no partitioned state, yet each writes a file: choose --world-size "
        f"{most:,} or fewer, or pass --allow-empty-ranks"
    )


def _save_state(
    args: argparse.Namespace,
    state: Any,
    spec: zckpt.ZeroSpec,
    tag: str,
    client: dict[str, Any],
    frozen: list[str],
    codec: str,
) -> Saved:
    """``save_checkpoint`` of a whole state held in memory (a DeepSpeed import), with a bar
    that advances as each rank's file is written."""
    with _cli_wording(args.out, tag):
        prepared = prepare_save(
            args.out,
            state,
            spec,
            tag=tag,
            client_state=client,
            frozen=frozen,
            codec=codec,
            overwrite=args.overwrite,
        )
    total = sum(shard_nbytes(sh) for sh in prepared.shards)
    with progress(args, total, "write") as bar:
        shards = WrittenShards(prepared.shards, bar.update)
        return write_and_commit(dataclasses.replace(prepared, shards=shards))


def _import_deepspeed(
    args: argparse.Namespace,
) -> tuple[str, dict[str, Any], zckpt.ZeroSpec, list[str], dict[str, Any]]:
    """``(tag, state, spec, frozen, client_state)`` of the DeepSpeed checkpoint at PATH, with
    a two-step bar: its files loaded, then the training state assembled from them."""
    with progress(args, 2, "import", unit="step") as bar:
        ck = open_deepspeed(args.path, args.tag)
        bar.update(1)
        state, spec, frozen, client = deepspeed_training_state(ck)
        bar.update(1)
    return ck.tag, state, spec, frozen, client


def reshard(args: argparse.Namespace) -> int:
    """``zckpt reshard PATH OUT --world-size M [--stage S]``: the same state, another spec.

    A zckpt checkpoint is resharded one new rank at a time: each rank's shard is assembled from
    the chunks of the old files it overlaps, written, and dropped, so memory holds one shard,
    not the state. A DeepSpeed checkpoint is imported whole first, then saved with the new spec.
    The tag, client_state and frozen list carry over; so does the codec, unless ``--codec``
    (raw for DeepSpeed input). OUT may not overlap PATH; an OUT already holding a training run
    needs ``--overwrite``; more ranks than elements to partition need ``--allow-empty-ranks``.
    Everything is checked before writing; a bar shows the ranks being written.

    Example:
        >>> from zckpt.cli import main
        >>> main(["reshard", "/nonexistent", "/tmp/x", "--world-size", "2"])
        1
    """
    positive("--world-size", args.world_size)
    _check_save_dir(args.path, args.out)
    from zckpt.interop._detect import find_dcp

    if find_dcp(args.path) is not None:
        raise _dcp_refused(args.path)
    found = find_deepspeed(args.path, args.tag)
    kept = args.codec is None
    if found is not None:
        _check_run(args.out, found[1], args.overwrite)
        tag, state, spec, frozen, client = _import_deepspeed(args)
        new = _new_spec(spec, args)
        _check_ranks(args, state, new)
        try:
            zckpt.plan_shards(state, new)  # a spec the state cannot take fails here
        except SpecError as e:
            raise _spec_error(args, e) from None
        codec = args.codec or "raw"
        saved = _save_state(args, state, new, tag, client, frozen, codec)
    else:
        old = zckpt.open_checkpoint(args.path, args.tag)
        spec, skel = old.manifest.spec, old.manifest.skeleton
        new = _new_spec(spec, args)
        _check_ranks(args, skel, new)
        try:
            plan = zckpt.plan_shards(skel, new)
        except SpecError as e:
            raise _spec_error(args, e) from None
        _check_run(args.out, old.tag, args.overwrite)
        codec = args.codec or source_codec(old)
        placeholder = zckpt.Shard(0, new, skel, (), ())  # gives prepare_save the spec only
        with _cli_wording(args.out, old.tag):
            prepared = prepare_save(
                args.out,
                placeholder,
                tag=old.tag,
                client_state=old.client_state(),
                frozen=old.manifest.frozen,
                codec=codec,
                overwrite=args.overwrite,
            )
        total = sum(f.numel * skel.tensors[f.leaf].itemsize for w in plan.writes for f in w)
        with progress(args, total, "reshard") as bar:
            shards = WrittenShards(
                ReshardedShards(index_sources(skel, old.sources()), plan), bar.update
            )
            excluded = old.manifest.excluded_frozen
            saved = write_and_commit(
                dataclasses.replace(prepared, shards=shards, excluded_frozen=excluded)
            )
    how = " (the source's)" if kept and found is None else ""
    print(
        f"wrote {saved.path}: world size {spec.world_size} -> {new.world_size}, "
        f"stage {spec.stage} -> {new.stage}, codec {codec}{how}"
    )
    return 0


def _dcp_refused(path: str) -> CommandLineError:
    return CommandLineError(
        f"{path} is a DCP checkpoint: import it with 'zckpt convert --from dcp "
        f"{path} OUT' (the result loads at any world size, and reshards)"
    )


def before_staging(args: argparse.Namespace, kind: str, root: str) -> None:
    """The checks ``reshard`` and ``convert`` make before reading a checkpoint, made before a
    foreign one at a URL is copied here (``cli/_main.py: _staged_input``): ``kind`` is what
    PATH holds (``"deepspeed"`` or ``"dcp"``), ``root`` its tag or DCP directory's URL. The
    commands make them again on the copy.

    Example:
        >>> import argparse
        >>> a = argparse.Namespace(command="reshard", world_size=2, path="memory://r/ds",
        ...                        out="/tmp/zckpt-bs-out", overwrite=False, tag=None)
        >>> before_staging(a, "dcp", "memory://r/ds")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        zckpt.cli._main.CommandLineError: memory://r/ds is a DCP checkpoint: import it with ...
    """
    import posixpath

    if args.command == "reshard":
        positive("--world-size", args.world_size)
    _check_save_dir(args.path, args.out)
    if args.command == "reshard" and kind == "dcp":
        raise _dcp_refused(args.path)
    if args.command == "convert" and args.source == "dcp":
        from zckpt.interop._dcp import DcpMissingFileError
        from zckpt.interop._dcp_convert import default_tag

        if kind != "dcp" or root != args.path:
            raise DcpMissingFileError(f"{args.path}: not a DCP checkpoint (no .metadata)")
        _check_run(args.out, args.tag or default_tag(args.path), args.overwrite)
        return
    if kind != "deepspeed":
        raise DeepSpeedFormatError(f"{args.path}: not a DeepSpeed checkpoint directory")
    _check_run(args.out, posixpath.basename(root), args.overwrite)


def _spec_error(args: argparse.Namespace, e: SpecError) -> SpecError:
    stage = "" if args.stage is None else f" --stage {args.stage}"
    return SpecError(f"{args.path}: cannot reshard to --world-size {args.world_size}{stage}: {e}")


def _new_spec(spec: zckpt.ZeroSpec, args: argparse.Namespace) -> zckpt.ZeroSpec:
    stage = spec.stage if args.stage is None else args.stage
    try:
        return dataclasses.replace(spec, world_size=args.world_size, stage=stage)
    except SpecError as e:
        raise _spec_error(args, e) from None


def convert(args: argparse.Namespace) -> int:
    """``zckpt convert --from deepspeed PATH OUT``: the whole DeepSpeed training state.

    What :func:`zckpt.interop.convert_deepspeed` writes, with progress bars. OUT may not
    overlap PATH (that would write into DeepSpeed's own tag folder); an OUT already holding a
    training run (a committed tag or a ``latest`` file) needs ``--overwrite``.

    Example:
        >>> from zckpt.cli import main
        >>> main(["convert", "--from", "deepspeed", "/nonexistent", "/tmp/x"])
        1
    """
    _check_save_dir(args.path, args.out)
    if args.source == "dcp":
        from zckpt.cli._dcp import convert_dcp_command
        from zckpt.interop._dcp_convert import default_tag

        _check_run(args.out, args.tag or default_tag(args.path), args.overwrite)
        return convert_dcp_command(args)
    found = find_deepspeed(args.path, args.tag)
    if found is None:
        raise DeepSpeedFormatError(f"{args.path}: not a DeepSpeed checkpoint directory")
    _check_run(args.out, found[1], args.overwrite)
    tag, state, spec, frozen, client = _import_deepspeed(args)
    saved = _save_state(args, state, spec, tag, client, frozen, args.codec or "raw")
    print(f"wrote {saved.path} (tag {saved.tag}); it loads at any world size and stage")
    return 0
