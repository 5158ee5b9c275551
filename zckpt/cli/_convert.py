"""``zckpt consolidate | reshard | convert | prune | clean``: the commands that write."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import torch

import zckpt
from zckpt.assemble import ReshardedShards, index_sources
from zckpt.cli._main import progress
from zckpt.interop import (
    convert_deepspeed,
    deepspeed_training_state,
    export_safetensors,
    is_deepspeed_checkpoint,
    open_deepspeed,
)
from zckpt.store._commit import prepare_save, write_and_commit

__all__ = ["clean", "consolidate", "convert", "prune", "reshard"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _nbytes(v: Any) -> int:
    n = 1
    for d in v.shape:
        n *= int(d)
    return n * torch.empty((), dtype=v.dtype).element_size()


def _save_torch(sd: dict[str, Any], out: str, dtype: torch.dtype, args: argparse.Namespace) -> int:
    done: dict[int, torch.Tensor] = {}  # by id: tied values stay one tensor in the file
    full: dict[str, torch.Tensor] = {}
    with progress(args, sum(_nbytes(v) for v in sd.values()), "read") as bar:
        for k, v in sd.items():
            if id(v) not in done:
                t = v if isinstance(v, torch.Tensor) else v.contiguous()
                done[id(v)] = t.to(dtype) if t.is_floating_point() else t
                bar.update(_nbytes(v))
            full[k] = done[id(v)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(full, out)
    print(f"wrote {out}: {len(full)} tensors")
    return 0


def consolidate(args: argparse.Namespace) -> int:
    """``zckpt consolidate PATH OUT``: the fp32 state dict as safetensors or a torch.save file.

    Example:
        >>> from zckpt.cli import main
        >>> main(["consolidate", "/nonexistent", "out.safetensors", "--quiet"])
        1
    """
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(
        args.path, args.tag, args.exclude_frozen, lazy_mode=args.lazy
    )
    dtype = DTYPES[args.dtype]
    out: str = args.out
    if out.endswith((".pt", ".bin")):
        if args.max_shard_size:
            raise ValueError("--max-shard-size applies to safetensors output, not .pt/.bin")
        return _save_torch(sd, out, dtype, args)
    total = sum(_nbytes(v) for v in sd.values())
    with progress(args, total, "export") as bar:
        r = export_safetensors(
            sd,
            out,
            max_shard_size=args.max_shard_size,
            dtype=None if dtype == torch.float32 else dtype,
            on_tensor=lambda _name, n: bar.update(n),
        )
    where = r.index_path or (r.files[0] if len(r.files) == 1 else out)
    print(f"wrote {where}: {len(r.files)} file(s), {r.total_size} bytes, {len(sd)} tensors")
    for alias, name in sorted(r.tied.items()):
        print(f"tied: {alias} -> {name} (stored once)")
    return 0


def reshard(args: argparse.Namespace) -> int:
    """``zckpt reshard PATH OUT --world-size M [--stage S]``: the same state, another spec.

    A zckpt checkpoint is resharded one new rank at a time: each rank's shard is assembled from
    the chunks of the old files it overlaps, written, and dropped, so memory holds one shard,
    not the state. A DeepSpeed checkpoint is imported whole first, then saved with the new spec.
    The tag, client_state and frozen list carry over.

    Example:
        >>> from zckpt.cli import main
        >>> main(["reshard", "/nonexistent", "/tmp/x", "--world-size", "2"])
        1
    """
    if is_deepspeed_checkpoint(args.path, args.tag):
        ck = open_deepspeed(args.path, args.tag)
        state, spec, frozen, client = deepspeed_training_state(ck)
        new = _new_spec(spec, args)
        saved = zckpt.save_checkpoint(
            args.out, state, new, tag=ck.tag, client_state=client, frozen=frozen, codec=args.codec
        )
    else:
        old = zckpt.open_checkpoint(args.path, args.tag)
        spec, skel = old.manifest.spec, old.manifest.skeleton
        new = _new_spec(spec, args)
        shards = ReshardedShards(index_sources(skel, old.sources()), zckpt.plan_shards(skel, new))
        placeholder = zckpt.Shard(0, new, skel, (), ())  # gives prepare_save the spec only
        prepared = prepare_save(
            args.out,
            placeholder,
            tag=old.tag,
            client_state=old.client_state(),
            frozen=old.manifest.frozen,
            codec=args.codec,
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


def _new_spec(spec: zckpt.ZeroSpec, args: argparse.Namespace) -> zckpt.ZeroSpec:
    stage = spec.stage if args.stage is None else args.stage
    return dataclasses.replace(spec, world_size=args.world_size, stage=stage)


def convert(args: argparse.Namespace) -> int:
    """``zckpt convert --from deepspeed PATH OUT``: the whole DeepSpeed training state.

    Example:
        >>> from zckpt.cli import main
        >>> main(["convert", "--from", "deepspeed", "/nonexistent", "/tmp/x"])
        1
    """
    saved = convert_deepspeed(args.path, args.out, args.tag, codec=args.codec)
    print(f"wrote {saved.path} (tag {saved.tag}); it loads at any world size and stage")
    return 0


def prune(args: argparse.Namespace) -> int:
    """``zckpt prune PATH --keep-last N``: prints each deleted tag.

    Example:
        >>> from zckpt.cli import main
        >>> main(["prune", "/nonexistent", "--keep-last", "1"])
        1
    """
    if not os.path.isdir(args.path):
        raise FileNotFoundError(f"{args.path}: no such directory")
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
    if not os.path.isdir(args.path):
        raise FileNotFoundError(f"{args.path}: no such directory")
    removed = zckpt.clean(args.path)
    for name in removed:
        print(f"removed {name}")
    print(f"removed {len(removed)} item(s)")
    return 0
