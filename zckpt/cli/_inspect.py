"""``zckpt inspect`` and ``zckpt verify``: read-only looks at a checkpoint."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Any

import torch

import zckpt
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

__all__ = ["describe_value", "inspect", "verify"]

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
        "files": len(m.files),
        "bytes_on_disk": sum(r.size for r in m.files) + (m.client.size if m.client else 0),
        "frozen": list(m.frozen),
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


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


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
    skip = ("tensors", "params", "client_state")
    for k, v in info.items():
        if k not in skip:
            print(f"{k}: {v if not isinstance(v, list) else ', '.join(map(str, v)) or '-'}")
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
            print(f"{r.path}: {r.files} files, {r.nbytes} bytes: {status}")
        if len(reports) > 1:
            bad = sum(not r.ok for r in reports)
            print(f"{len(reports)} tags checked: {'all OK' if not bad else f'{bad} with problems'}")
    return 0 if not problems else 1
