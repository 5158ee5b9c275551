"""``zckpt prune | clean``: housekeeping of a zckpt save_dir (no tensors, so no torch import)."""

from __future__ import annotations

import argparse

import zckpt
from zckpt.cli._main import CommandLineError
from zckpt.interop import is_deepspeed_checkpoint
from zckpt.interop._detect import deepspeed_tags
from zckpt.store._resolve import isdir

__all__ = ["clean", "positive", "prune"]


def positive(flag: str, value: int) -> None:
    """Refuse a count below 1 for ``flag``.

    Example:
        >>> positive("--keep-last", 0)
        Traceback (most recent call last):
        ...
        zckpt.cli._main.CommandLineError: --keep-last must be at least 1, got 0
    """
    if value < 1:
        raise CommandLineError(f"{flag} must be at least 1, got {value}")


def _zckpt_save_dir(path: str, command: str) -> None:
    """``prune`` and ``clean`` manage zckpt save_dirs only: a DeepSpeed folder (a tag
    directory, or a save_dir holding DeepSpeed tags and no committed zckpt tag) is refused."""
    if not isdir(path):
        raise zckpt.CheckpointNotFoundError(f"{path}: no such directory")
    if zckpt.list_tags(path):
        return  # (asked first: on an object store the DeepSpeed check lists every tag)
    if is_deepspeed_checkpoint(path) or deepspeed_tags(path):
        raise CommandLineError(
            f"{path} is a DeepSpeed checkpoint: zckpt {command} only manages zckpt "
            "checkpoints and leaves DeepSpeed's files alone (nothing was changed)"
        )


def prune(args: argparse.Namespace) -> int:
    """``zckpt prune PATH --keep-last N``: prints each deleted tag.

    Example:
        >>> from zckpt.cli import main
        >>> main(["prune", "/nonexistent", "--keep-last", "1"])
        1
    """
    positive("--keep-last", args.keep_last)
    _zckpt_save_dir(args.path, "prune")
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
    _zckpt_save_dir(args.path, "clean")
    removed = zckpt.clean(args.path)
    for name in removed:
        print(f"removed {name}")
    print(f"removed {len(removed)} item(s)")
    return 0
