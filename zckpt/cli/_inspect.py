"""``zckpt inspect`` and ``zckpt verify``: read-only looks at a checkpoint.

A zckpt checkpoint is described from its manifest and blob headers alone, and verified from its
bytes: neither imports torch (nor Numba), so both start in a fraction of a second. DeepSpeed's
``torch.save`` files need torch to be read; their modules are imported only for them.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import zckpt
from zckpt.cli._main import progress
from zckpt.format._dtypes import dtype_name, is_floating
from zckpt.format._header import FORMAT_VERSION
from zckpt.interop import is_deepspeed_checkpoint
from zckpt.interop._detect import find_dcp
from zckpt.store._fp32 import fp32_keys_of
from zckpt.store._layout import LATEST, read_latest
from zckpt.store._resolve import storage_for
from zckpt.tree import format_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "INSPECT_SCHEMA",
    "describe_value",
    "files_summary",
    "inspect",
    "source_codec",
    "verify",
]

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _dtype(d: torch.dtype | str) -> str:
    name = dtype_name(d)
    return _DTYPES.get(name, name)


def _is_tensor(v: Any) -> bool:
    # A tensor exists only once torch is imported: no need to import it to ask.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def describe_value(v: Any) -> Any:
    """A JSON-able rendering of a client_state value (tensors become a short description).

    Example:
        >>> import torch
        >>> describe_value({"epoch": 2, "w": torch.zeros(2, 3)})
        {'epoch': 2, 'w': 'tensor(fp32, [2, 3])'}
    """
    if _is_tensor(v):
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


#: ``zckpt inspect --json``'s keys, in order, for zckpt and DeepSpeed input alike (docs/cli.md:
#: a key is only ever added, at the end, never renamed or removed), with the JSON types each
#: may take (``None``: null, where the checkpoint's format has no such value).
INSPECT_SCHEMA: dict[str, tuple[type | None, ...]] = {
    "format": (str,),
    "path": (str,),
    "tags": (list,),
    "latest": (str, None),
    "tag": (str,),
    "blob_format_version": (int, None),
    "zckpt_version": (str, None),
    "world_size": (int,),
    "stage": (int,),
    "codec": (str,),
    "files": (int,),
    "rank_blobs": (int,),
    "expert_blobs": (int,),
    "client_state_blob": (bool,),
    "bytes_on_disk": (int,),
    "frozen": (list,),
    "tied": (dict,),
    "tensors": (list,),
    "client_state": (dict,),
    "universal": (bool,),
    "deepspeed_version": (str, None),
    "dtype": (str, None),
    "shared_files": (int,),
    "fp32_state_dict": (list,),
    "dcp_version": (str, None),
}
#: The keys of each object of ``tensors`` and of ``fp32_state_dict``.
TENSOR_KEYS = ("path", "dtype", "shape", "bytes", "stored", "ratio")
FP32_KEYS = ("path", "dtype", "shape")


def _document(**values: Any) -> dict[str, Any]:
    """``values`` in :data:`INSPECT_SCHEMA`'s order; every key, and no other."""
    if set(values) != set(INSPECT_SCHEMA):
        missing, extra = set(INSPECT_SCHEMA) - set(values), set(values) - set(INSPECT_SCHEMA)
        raise AssertionError(f"inspect document: missing {sorted(missing)}, extra {sorted(extra)}")
    return {k: values[k] for k in INSPECT_SCHEMA}


def _tensor_row(path: str, dtype: torch.dtype | str, shape: Any, nbytes: int, stored: int) -> Any:
    return {
        "path": path,
        "dtype": _dtype(dtype),
        "shape": list(shape),
        "bytes": nbytes,
        "stored": stored,
        "ratio": round(nbytes / stored, 3) if stored else None,
    }


def _fp32_rows(sd: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"path": k, "dtype": _dtype(v.dtype), "shape": list(v.shape)} for k, v in sd.items()]


def _training_dtype(dtypes: Counter[str]) -> str | None:
    return dtypes.most_common(1)[0][0] if dtypes else None


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
    tensors = [
        _tensor_row(skel.name(leaf), meta.dtype_name, meta.shape, meta.nbytes, stored[leaf])
        for leaf, meta in enumerate(skel.tensors)
    ]
    # The training dtype: that of the module's floating weights (what DeepSpeed's is, below).
    module = [skel.tensors[leaf] for leaf, p in enumerate(skel.paths) if p and p[0] == "module"]
    dtypes = Counter(_dtype(t.dtype_name) for t in module if is_floating(t.dtype_name))
    # What get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True) holds, from the manifest.
    fp32 = [
        {"path": k.name, "dtype": _dtype(k.dtype_name), "shape": list(skel.tensors[k.source].shape)}
        for k in (fp32_keys_of(ck) if module else [])
    ]
    experts = sum(r.expert >= 0 for r in m.files)
    return _document(
        format="zckpt",
        path=ck.path,
        tags=_tags(os.path.dirname(ck.path)),
        latest=_latest(os.path.dirname(ck.path)),
        tag=ck.tag,
        blob_format_version=version,
        zckpt_version=m.zckpt_version,
        world_size=m.spec.world_size,
        stage=m.spec.stage,
        codec=source_codec(ck),
        # What verify counts: every file the manifest lists, the client state's included.
        files=len(m.files) + (m.client is not None),
        rank_blobs=len(m.files) - experts,
        expert_blobs=experts,
        client_state_blob=m.client is not None,
        bytes_on_disk=sum(r.size for r in m.files) + (m.client.size if m.client else 0),
        frozen=list(m.frozen),
        tied=tied,
        tensors=tensors,
        client_state=describe_value(ck.client_state()),
        universal=False,
        deepspeed_version=None,
        dcp_version=None,
        dtype=_training_dtype(dtypes),
        shared_files=0,
        fp32_state_dict=fp32,
    )


def _inspect_deepspeed(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from zckpt.cli._describe import _nbytes, deepspeed_files, deepspeed_tensors
    from zckpt.interop import ENGINE_KEYS, LATEST_UNIVERSAL, deepspeed_tags, open_deepspeed

    ck = open_deepspeed(args.path, args.tag)
    m0 = ck.model[0]
    module = m0.get("module") or {}
    dtypes = Counter(
        _dtype(v.dtype)
        for v in module.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )
    bf16 = any(os.path.basename(f).startswith("bf16_") for f in ck.optim_files)
    if ck.universal is not None:  # its optimizer file is zero/optimizer_state.pt: no prefix
        bf16 = bool((m0.get("ds_config") or {}).get("bf16", {}).get("enabled"))
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(args.path, args.tag, lazy_mode=True)
    staged = getattr(args, "staged_root", None)  # the tag directory at its URL, when copied
    root = posixpath.dirname(staged) if staged else os.path.dirname(os.path.normpath(ck.path))
    universal = ck.universal is not None
    files = deepspeed_files(ck)
    held = deepspeed_tensors(ck)
    version = m0.get("ds_version")
    # DeepSpeed merges client_state into the model states' top level: the keys not its own.
    client = {str(k): v for k, v in m0.items() if k not in ENGINE_KEYS}
    return _document(
        format="deepspeed",
        path=ck.path,
        tags=deepspeed_tags(root),
        # the pointer DeepSpeed's loader follows for this kind of checkpoint
        latest=_latest(root, LATEST_UNIVERSAL if universal else LATEST),
        tag=ck.tag,
        blob_format_version=None,
        zckpt_version=None,
        world_size=ck.world_size,
        stage=ck.stage,
        codec="raw",  # torch.save's tensors are their bytes (what convert and reshard keep)
        files=files.files,
        rank_blobs=files.rank,
        expert_blobs=files.expert,
        client_state_blob=False,  # DeepSpeed merges it into the model states
        bytes_on_disk=files.nbytes,
        frozen=held.frozen,
        tied=held.tied,
        tensors=[_tensor_row(p, d, s, _nbytes(d, s), st) for p, d, s, st in held.tensors],
        client_state=describe_value(client),
        universal=universal,
        deepspeed_version=str(version) if version is not None else None,
        dcp_version=None,
        dtype="bf16" if bf16 else _training_dtype(dtypes),
        shared_files=files.shared,
        fp32_state_dict=_fp32_rows(sd),
    )


def source_codec(ck: zckpt.Checkpoint) -> str:
    """The codec a zckpt checkpoint was written with, read from its blobs' headers.

    Each chunk records the codec it is stored with, and every codec falls back to raw where
    compression does not pay (byteplane also to zstd, on dtypes it does not split into planes):
    any byteplane chunk means byteplane, else any zstd chunk zstd, else raw.

    Example:
        >>> import tempfile, torch, zckpt
        >>> d = tempfile.mkdtemp()
        >>> _ = zckpt.save_checkpoint(d, {"w": torch.zeros(64)}, zckpt.ZeroSpec(2, 1), tag="t",
        ...                           codec="byteplane")
        >>> source_codec(zckpt.open_checkpoint(d))
        'byteplane'
    """
    from zckpt.format import _codecs

    names = {code: name for name, code in _codecs.CODECS.items()}
    seen: set[int] = set()
    for rec in ck.manifest.files:
        for entry in ck.header(rec).fragments:
            seen.update(c.codec for c in entry.chunks)
    for code in (_codecs.BYTEPLANE, _codecs.ZSTD):
        if code in seen:
            return names[code]
    return "raw"


def files_summary(
    n: int,
    rank_blobs: int,
    expert_blobs: int,
    client: bool,
    *,
    noun: bool = True,
    shared: int = 0,
    unit: str = "blob",
) -> str:
    """How many files a checkpoint holds, and what they are (inspect and verify say the same).

    ``unit`` names a rank's or an expert's file (``"blob"`` for zckpt, ``"file"`` for
    DeepSpeed); ``shared`` counts the files every rank reads (DeepSpeed's model states).

    Example:
        >>> files_summary(5, 4, 0, True)
        '5 files (4 rank blobs + client state)'
        >>> files_summary(3, 1, 2, False, noun=False)
        '3 (1 rank blob + 2 expert blobs)'
        >>> files_summary(3, 2, 0, False, shared=1, unit="file")
        '3 files (2 rank files + 1 shared file)'
    """

    def count(k: int, what: str) -> str:
        return f"{k} {what}{'s' * (k != 1)}"

    parts = [count(rank_blobs, f"rank {unit}")] if rank_blobs or not shared else []
    if expert_blobs:
        parts.append(count(expert_blobs, f"expert {unit}"))
    if shared:
        parts.append(count(shared, "shared file"))
    if client:
        parts.append("client state")
    total = count(n, "file") if noun else str(n)
    return f"{total} ({' + '.join(parts)})"


def _text(v: Any) -> str:
    """A value of ``inspect``'s text output: never ``None`` or ``[]`` printed as such."""
    if v is None or v == []:
        return "(none)"
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


#: Keys the text output shows otherwise (tables, the files line) or not at all for a format.
_NOT_A_LINE = (
    "rank_blobs", "expert_blobs", "client_state_blob", "shared_files",
    "tied", "tensors", "client_state", "fp32_state_dict",
)  # fmt: skip
_ONLY = {"zckpt": ("blob_format_version", "zckpt_version"),
         "deepspeed": ("universal", "deepspeed_version"),
         "dcp": ("dcp_version",)}  # fmt: skip


def _files_line(info: dict[str, Any], noun: bool = False) -> str:
    return files_summary(
        info["files"],
        info["rank_blobs"],
        info["expert_blobs"],
        info["client_state_blob"],
        noun=noun,
        shared=info["shared_files"],
        unit="blob" if info["format"] == "zckpt" else "file",
    )


def inspect(args: argparse.Namespace) -> int:
    """``zckpt inspect PATH [--tag T] [--json]``.

    zckpt, DeepSpeed (regular and universal) and DCP checkpoints give the same keys
    (:data:`INSPECT_SCHEMA`), and the text output the same lines.

    Example:
        >>> from zckpt.cli import main
        >>> main(["inspect", "/nonexistent"])
        1
    """
    if find_dcp(args.path) is not None:
        from zckpt.cli._dcp import inspect_dcp

        info = inspect_dcp(args)
    elif is_deepspeed_checkpoint(args.path, args.tag):
        info = _inspect_deepspeed(args)
    else:
        info = _inspect_zckpt(args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    hidden = {k for f, keys in _ONLY.items() if f != info["format"] for k in keys}
    for k, v in info.items():
        if k == "files":
            v = _files_line(info)
        if k not in _NOT_A_LINE and k not in hidden:
            print(f"{k}: {_text(v)}")
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
    fp32 = info["fp32_state_dict"]
    print(f"fp32 state dict ({len(fp32)} entries, what consolidate writes):")
    if fp32:
        rows = [["path", "dtype", "shape"]]
        rows += [[p["path"], p["dtype"], str(tuple(p["shape"]))] for p in fp32]
        _print_table(rows)
    print(f"client_state: {json.dumps(info['client_state'])}")
    return 0


def _verify_deepspeed(args: argparse.Namespace) -> int:
    """A DeepSpeed checkpoint: every file loads with the pickle allow-list, its layout is
    consistent (the fp32 state dict plans), and every zip record matches its CRC-32 (the only
    checksum DeepSpeed's files carry; torch's loads never check it)."""
    from zckpt.cli._describe import deepspeed_files
    from zckpt.interop import open_deepspeed
    from zckpt.interop._zipcheck import records_problems

    ck = open_deepspeed(args.path, args.tag)  # loads every file with the pickle allow-list
    zckpt.get_fp32_state_dict_from_zero_checkpoint(args.path, args.tag, lazy_mode=True)
    kind = "DeepSpeed universal checkpoint" if ck.universal is not None else "DeepSpeed checkpoint"
    counted = deepspeed_files(ck)
    with progress(args, counted.nbytes, "verify") as bar:
        problems = records_problems(ck.files, on_bytes=bar.update)
    if args.json:
        # verify's layout for a zckpt tag, with the same meaning: one tag, its files, problems
        report = {"path": ck.path, "tag": ck.tag, "files": counted.files,
                  "bytes": counted.nbytes, "ok": not problems, "problems": problems}  # fmt: skip
        doc = {"path": args.path, "tags": [report], "files": counted.files,
               "problems": problems, "ok": not problems, "tag": ck.tag,
               "format": "deepspeed"}  # fmt: skip
        print(json.dumps(doc, indent=2))
    else:
        for p in problems:
            print(p)
        said = files_summary(counted.files, counted.rank, counted.expert, False,
                             shared=counted.shared, unit="file")  # fmt: skip
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"{ck.path}: {kind}, {said} load with the allow-list, {counted.nbytes} bytes, "
              f"every zip record against its CRC-32: {status}")  # fmt: skip
    return 0 if not problems else 1


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
    if find_dcp(args.path) is not None:
        from zckpt.cli._dcp import verify_dcp

        return verify_dcp(args)
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
        doc["format"] = "zckpt"
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
