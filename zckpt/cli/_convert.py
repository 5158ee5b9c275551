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
from collections.abc import Iterator
from typing import Any

import torch

import zckpt
from zckpt.assemble import ReshardedShards, index_sources
from zckpt.cli._main import CommandLineError, progress
from zckpt.errors import SpecError
from zckpt.interop import (
    DeepSpeedFormatError,
    convert_deepspeed,
    deepspeed_training_state,
    find_deepspeed,
    open_deepspeed,
    parse_size,
)
from zckpt.interop._output import (
    OutputExistsError,
    building_file,
    check_dir_output,
    check_disjoint,
    check_file_output,
)
from zckpt.interop._safetensors import is_directory_output, write_safetensors
from zckpt.store._commit import prepare_save, write_and_commit
from zckpt.store._layout import LATEST, LATEST_UNIVERSAL, MANIFEST, TagError, generation_of
from zckpt.store._resolve import isdir, lexists, listdir

__all__ = ["clean", "consolidate", "convert", "prune", "reshard"]

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
                    done[id(v)] = t.to(dtype) if t.is_floating_point() else t
                    bar.update(_nbytes(v))
                full[k] = done[id(v)]
        with open(tmp, "xb") as f:
            torch.save(full, f)
    print(f"wrote {out}: {len(full)} tensors")
    return 0


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise CommandLineError(f"{flag} must be at least 1, got {value}")


def consolidate(args: argparse.Namespace) -> int:
    """``zckpt consolidate PATH OUT``: the fp32 state dict as safetensors or a torch.save file.

    OUT is checked before the checkpoint is read: it may not be PATH or contain it, and an
    existing OUT needs ``--overwrite`` (then it is replaced atomically).

    Example:
        >>> from zckpt.cli import main
        >>> main(["consolidate", "/nonexistent", "out.safetensors", "--quiet"])
        1
    """
    out: str = args.out
    torch_file = out.endswith((".pt", ".bin"))
    if args.max_shard_size is not None:
        if torch_file:
            raise CommandLineError(
                f"--max-shard-size applies to safetensors output, not .pt/.bin (OUT is {out})"
            )
        try:
            parse_size(args.max_shard_size)
        except ValueError as e:
            raise CommandLineError(f"--max-shard-size: {e}") from None
    check_disjoint(args.path, out, allow_inside=True)
    if torch_file or not is_directory_output(out, args.max_shard_size):
        check_file_output(out, overwrite=args.overwrite, flag=FLAG)
    else:
        check_dir_output(out, overwrite=args.overwrite, flag=FLAG)
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(
        args.path, args.tag, args.exclude_frozen, lazy_mode=args.lazy
    )
    dtype = DTYPES[args.dtype]
    if torch_file:
        return _save_torch(sd, out, dtype, args)
    total = sum(_nbytes(v) for v in sd.values())
    with progress(args, total, "export") as bar:
        r = write_safetensors(
            sd,
            out,
            max_shard_size=args.max_shard_size,
            dtype=None if dtype == torch.float32 else dtype,
            on_tensor=lambda _name, n: bar.update(n),
            overwrite=args.overwrite,
            flag=FLAG,
        )
    where = r.index_path or (r.files[0] if len(r.files) == 1 else out)
    print(f"wrote {where}: {len(r.files)} file(s), {r.total_size} bytes, {len(sd)} tensors")
    for alias, name in sorted(r.tied.items()):
        print(f"tied: {alias} -> {name} (stored once)")
    return 0


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


def reshard(args: argparse.Namespace) -> int:
    """``zckpt reshard PATH OUT --world-size M [--stage S]``: the same state, another spec.

    A zckpt checkpoint is resharded one new rank at a time: each rank's shard is assembled from
    the chunks of the old files it overlaps, written, and dropped, so memory holds one shard,
    not the state. A DeepSpeed checkpoint is imported whole first, then saved with the new spec.
    The tag, client_state and frozen list carry over. OUT may not overlap PATH; an OUT already
    holding a training run needs ``--overwrite``. Everything is checked before writing.

    Example:
        >>> from zckpt.cli import main
        >>> main(["reshard", "/nonexistent", "/tmp/x", "--world-size", "2"])
        1
    """
    _positive("--world-size", args.world_size)
    _check_save_dir(args.path, args.out)
    found = find_deepspeed(args.path, args.tag)
    if found is not None:
        _check_run(args.out, found[1], args.overwrite)
        ck = open_deepspeed(args.path, args.tag)
        state, spec, frozen, client = deepspeed_training_state(ck)
        new = _new_spec(spec, args)
        try:
            zckpt.plan_shards(state, new)  # a spec the state cannot take fails here
        except SpecError as e:
            raise _spec_error(args, e) from None
        with _cli_wording(args.out, ck.tag):
            saved = zckpt.save_checkpoint(
                args.out,
                state,
                new,
                tag=ck.tag,
                client_state=client,
                frozen=frozen,
                codec=args.codec,
                overwrite=args.overwrite,
            )
    else:
        old = zckpt.open_checkpoint(args.path, args.tag)
        spec, skel = old.manifest.spec, old.manifest.skeleton
        new = _new_spec(spec, args)
        try:
            plan = zckpt.plan_shards(skel, new)
        except SpecError as e:
            raise _spec_error(args, e) from None
        _check_run(args.out, old.tag, args.overwrite)
        shards = ReshardedShards(index_sources(skel, old.sources()), plan)
        placeholder = zckpt.Shard(0, new, skel, (), ())  # gives prepare_save the spec only
        with _cli_wording(args.out, old.tag):
            prepared = prepare_save(
                args.out,
                placeholder,
                tag=old.tag,
                client_state=old.client_state(),
                frozen=old.manifest.frozen,
                codec=args.codec,
                overwrite=args.overwrite,
            )
        excluded = old.manifest.excluded_frozen
        saved = write_and_commit(
            dataclasses.replace(prepared, shards=shards, excluded_frozen=excluded)
        )
    print(
        f"wrote {saved.path}: world size {spec.world_size} -> {new.world_size}, "
        f"stage {spec.stage} -> {new.stage}, codec {args.codec}"
    )
    return 0


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

    OUT may not overlap PATH (that would write into DeepSpeed's own tag folder); an OUT already
    holding a training run (a committed tag or a ``latest`` file) needs ``--overwrite``.

    Example:
        >>> from zckpt.cli import main
        >>> main(["convert", "--from", "deepspeed", "/nonexistent", "/tmp/x"])
        1
    """
    _check_save_dir(args.path, args.out)
    found = find_deepspeed(args.path, args.tag)
    if found is None:
        raise DeepSpeedFormatError(f"{args.path}: not a DeepSpeed checkpoint directory")
    _check_run(args.out, found[1], args.overwrite)
    with _cli_wording(args.out, found[1]):
        saved = convert_deepspeed(
            args.path, args.out, args.tag, codec=args.codec, overwrite=args.overwrite
        )
    print(f"wrote {saved.path} (tag {saved.tag}); it loads at any world size and stage")
    return 0


def prune(args: argparse.Namespace) -> int:
    """``zckpt prune PATH --keep-last N``: prints each deleted tag.

    Example:
        >>> from zckpt.cli import main
        >>> main(["prune", "/nonexistent", "--keep-last", "1"])
        1
    """
    _positive("--keep-last", args.keep_last)
    if not isdir(args.path):
        raise zckpt.CheckpointNotFoundError(f"{args.path}: no such directory")
    deleted = zckpt.apply_retention(args.path, args.keep_last)
    for tag in deleted:
        print(f"deleted {tag}")
    kept = [c.tag for c in zckpt.list_tags(args.path)]
    print(f"kept {len(kept)}: {', '.join(kept) or '-'}")
    return 0


def clean(args: argparse.Namespace) -> int:
    """``zckpt clean PATH``: remove torn tags and unreferenced files (run when no save is running).

    Example:
        >>> from zckpt.cli import main
        >>> main(["clean", "/nonexistent"])
        1
    """
    if not isdir(args.path):
        raise zckpt.CheckpointNotFoundError(f"{args.path}: no such directory")
    removed = zckpt.clean(args.path)
    for name in removed:
        print(f"removed {name}")
    print(f"removed {len(removed)} item(s)")
    return 0
