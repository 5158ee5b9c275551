"""``zckpt inspect`` and ``zckpt verify``: read-only looks at a checkpoint."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Any

import torch

import zckpt
from zckpt.cli._convert import source_codec
from zckpt.cli._main import progress
from zckpt.format import FORMAT_VERSION
from zckpt.interop import (
    ENGINE_KEYS,
    LATEST_UNIVERSAL,
    deepspeed_tags,
    is_deepspeed_checkpoint,
    open_deepspeed,
)
from zckpt.store._layout import LATEST, read_latest
from zckpt.store._resolve import storage_for
from zckpt.tree import format_path

__all__ = ["describe_value", "files_summary", "inspect", "verify"]

_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def _dtype(d: torch.dtype) -> str:
    return _DTYPES.get(d, str(d).removeprefix("torch."))


def describe_value(v: Any) -> Any:
    """A JSON-able rendering of a client_state value (tensors become a short description).

    Example:
        >>> describe_value({"epoch": 2, "w": torch.zeros(2, 3)})
        {'epoch': 2, 'w': 'tensor(fp32, [2, 3])'}
    """
    if isinstance(v, torch.Tensor):
        return f"tensor({_dtype(v.dtype)}, {list(v.shape)})"
    if isinstance(v, dict):
        return {str(k): describe_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [describe_value(x) for x in v]
    if isinstance(v, bytes):
        return f"bytes({len(v)})"
    return v


def _latest(path: str, name: str = LATEST) -> str | None:
    try:
        return read_latest(*storage_for(path), name)
    except (zckpt.ZckptError, OSError):
        return None


def _tags(path: str) -> list[str]:
    try:
        return [c.tag for c in zckpt.list_tags(path)]
    except OSError:
        return []


def _inspect_zckpt(args: argparse.Namespace) -> dict[str, Any]:
    ck = zckpt.open_checkpoint(args.path, args.tag)
    m = ck.manifest
    stored: Counter[int] = Counter()
    version = FORMAT_VERSION
    for rec in m.files:
        h = ck.header(rec)
        version = h.version
        for e in h.fragments:
            stored[e.fragment.leaf] += sum(c.length for c in e.chunks)
    skel = m.skeleton
    # A tied tensor is stored once, under its first path; its other paths name the same leaf.
    tied = {
        format_path(p): skel.name(leaf) for p, leaf in skel.tensor_paths() if p != skel.paths[leaf]
    }
    tensors = []
    for leaf, meta in enumerate(m.skeleton.tensors):
        raw = meta.nbytes
        tensors.append(
            {
                "path": m.skeleton.name(leaf),
                "dtype": _dtype(meta.dtype),
                "shape": list(meta.shape),
                "bytes": raw,
                "stored": stored[leaf],
                "ratio": round(raw / stored[leaf], 3) if stored[leaf] else None,
            }
        )
    return {
        "format": "zckpt",
        "path": ck.path,
        "tags": _tags(os.path.dirname(ck.path)),
        "latest": _latest(os.path.dirname(ck.path)),
        "tag": ck.tag,
        "blob_format_version": version,
        "zckpt_version": m.zckpt_version,
        "world_size": m.spec.world_size,
        "stage": m.spec.stage,
        "codec": source_codec(ck),
        # What verify counts: every file the manifest lists, the client state's included.
        "files": len(m.files) + (m.client is not None),
        "rank_blobs": sum(r.expert < 0 for r in m.files),
        "expert_blobs": sum(r.expert >= 0 for r in m.files),
        "client_state_blob": m.client is not None,
        "bytes_on_disk": sum(r.size for r in m.files) + (m.client.size if m.client else 0),
        "frozen": list(m.frozen),
        "tied": tied,
        "tensors": tensors,
        "client_state": describe_value(ck.client_state()),
    }


def _inspect_deepspeed(args: argparse.Namespace) -> dict[str, Any]:
    ck = open_deepspeed(args.path, args.tag)
    module = ck.model[0].get("module") or {}
    dtypes = Counter(
        _dtype(v.dtype)
        for v in module.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )
    bf16 = any(os.path.basename(f).startswith("bf16_") for f in ck.optim_files)
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(args.path, args.tag, lazy_mode=True)
    params = [{"path": k, "dtype": _dtype(v.dtype), "shape": list(v.shape)} for k, v in sd.items()]
    root = os.path.dirname(os.path.normpath(ck.path))
    universal = ck.universal is not None
    # DeepSpeed merges client_state into the model states' top level: the keys not its own.
    client = {str(k): v for k, v in ck.model[0].items() if k not in ENGINE_KEYS}
    return {
        "format": "deepspeed",
        "universal": universal,
        "path": ck.path,
        "tags": deepspeed_tags(root),
        # the pointer DeepSpeed's loader follows for this kind of checkpoint
        "latest": _latest(root, LATEST_UNIVERSAL if universal else LATEST),
        "tag": ck.tag,
        "world_size": ck.world_size,
        "stage": ck.stage,
        "dtype": "bf16" if bf16 else (dtypes.most_common(1)[0][0] if dtypes else None),
        "files": len(ck.files),
        "params": params,
        "client_state": describe_value(client),
    }


def files_summary(
    n: int, rank_blobs: int, expert_blobs: int, client: bool, *, noun: bool = True
) -> str:
    """How many files a zckpt tag holds, and what they are (inspect and verify say the same).

    Example:
        >>> files_summary(5, 4, 0, True)
        '5 files (4 rank blobs + client state)'
        >>> files_summary(3, 1, 2, False, noun=False)
        '3 (1 rank blob + 2 expert blobs)'
    """
    parts = [f"{rank_blobs} rank blob{'s' * (rank_blobs != 1)}"]
    if expert_blobs:
        parts.append(f"{expert_blobs} expert blob{'s' * (expert_blobs != 1)}")
    if client:
        parts.append("client state")
    count = f"{n} file{'s' * (n != 1)}" if noun else str(n)
    return f"{count} ({' + '.join(parts)})"


def _text(v: Any) -> str:
    """A value of ``inspect``'s text output: never ``None`` or ``[]`` printed as such."""
    if v is None or v == []:
        return "(none)"
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


_FILE_PARTS = ("rank_blobs", "expert_blobs", "client_state_blob")


def inspect(args: argparse.Namespace) -> int:
    """``zckpt inspect PATH [--tag T] [--json]``.

    Example:
        >>> from zckpt.cli import main
        >>> main(["inspect", "/nonexistent"])
        1
    """
    ds = is_deepspeed_checkpoint(args.path, args.tag)
    info = _inspect_deepspeed(args) if ds else _inspect_zckpt(args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    skip = ("tensors", "params", "client_state", "tied", *_FILE_PARTS)
    for k, v in info.items():
        if k == "files" and not ds:
            v = files_summary(*(info[p] for p in ("files", *_FILE_PARTS)), noun=False)
        if k not in skip:
            print(f"{k}: {_text(v)}")
    if ds:
        print(f"fp32 state dict ({len(info['params'])} entries):")
        rows = [["path", "dtype", "shape"]]
        rows += [[p["path"], p["dtype"], str(tuple(p["shape"]))] for p in info["params"]]
        _print_table(rows)
        print(f"client_state: {json.dumps(info['client_state'])}")
        return 0
    print(f"tensors ({len(info['tensors'])}):")
    rows = [["path", "dtype", "shape", "bytes", "on disk", "ratio"]]
    for t in info["tensors"]:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        rows.append(
            [
                t["path"],
                t["dtype"],
                str(tuple(t["shape"])),
                str(t["bytes"]),
                str(t["stored"]),
                ratio,
            ]
        )
    _print_table(rows)
    if info["tied"]:
        print(f"tied ({len(info['tied'])}, stored once):")
        _print_table([[alias, "->", t] for alias, t in info["tied"].items()])
    print(f"client_state: {json.dumps(info['client_state'])}")
    return 0


def _verify_deepspeed(args: argparse.Namespace) -> int:
    ck = open_deepspeed(args.path, args.tag)  # loads every file with the pickle allow-list
    n = len(ck.files)
    zckpt.get_fp32_state_dict_from_zero_checkpoint(args.path, args.tag, lazy_mode=True)
    kind = "DeepSpeed universal checkpoint" if ck.universal is not None else "DeepSpeed checkpoint"
    if args.json:
        print(json.dumps({"path": ck.path, "format": "deepspeed", "ok": True, "problems": []}))
    else:
        print(f"{ck.path}: {kind}, {n} files load with the allow-list; OK")
        print("(DeepSpeed records no checksums: only loadability and layout were checked)")
    return 0


def _verified_files(r: zckpt.TagReport) -> str:
    """``r.files``, with what they are when the tag's manifest reads (the count inspect shows)."""
    try:
        m = zckpt.open_checkpoint(r.path).manifest if r.files else None
    except (zckpt.ZckptError, OSError):
        m = None
    if m is None or len(m.files) + (m.client is not None) != r.files:
        return f"{r.files} files"
    experts = sum(f.expert >= 0 for f in m.files)
    return files_summary(r.files, len(m.files) - experts, experts, m.client is not None)


def verify(args: argparse.Namespace) -> int:
    """``zckpt verify PATH [--tag T] [--json]``: exit 1 when any problem is found.

    A save_dir: every committed tag and the ``latest`` pointers; a tag directory or ``--tag``:
    that tag.

    Example:
        >>> from zckpt.cli import main
        >>> main(["verify", "/nonexistent", "--json"])
        1
    """
    if is_deepspeed_checkpoint(args.path, args.tag):
        return _verify_deepspeed(args)
    with progress(args, None, "verify") as bar:
        reports = zckpt.verify_checkpoint(args.path, args.tag, on_bytes=bar.update)
    problems = [p for r in reports for p in r.problems]
    files = sum(r.files for r in reports)
    if args.json:
        doc: dict[str, Any] = {
            "path": args.path,
            "tags": [
                {
                    "path": r.path,
                    "tag": r.tag,
                    "files": r.files,
                    "bytes": r.nbytes,
                    "ok": r.ok,
                    "problems": list(r.problems),
                }
                for r in reports
            ],
            "files": files,
            "problems": problems,
            "ok": not problems,
        }
        if len(reports) == 1:
            doc["tag"] = reports[0].tag
        print(json.dumps(doc, indent=2))
    else:
        for r in reports:
            for p in r.problems:
                print(p)
            status = "OK" if r.ok else f"{len(r.problems)} problem(s)"
            print(f"{r.path}: {_verified_files(r)}, {r.nbytes} bytes: {status}")
        if len(reports) > 1:
            bad = sum(not r.ok for r in reports)
            print(f"{len(reports)} tags checked: {'all OK' if not bad else f'{bad} with problems'}")
    return 0 if not problems else 1
