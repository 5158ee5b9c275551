"""``zckpt inspect | verify | consolidate | convert`` of a DCP checkpoint directory.

The commands detect a directory ``torch.distributed.checkpoint`` wrote (``.metadata``) and come
here; each is the zckpt or DeepSpeed command's counterpart, with the same output layout
(``inspect --json`` has :data:`~zckpt.cli._inspect.INSPECT_SCHEMA`'s keys, ``format: "dcp"``).
Nothing runs a pickle's code: ``zckpt/interop/_dcp*.py`` read the files through allow-lists.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Any

from zckpt.cli._main import progress
from zckpt.errors import ZckptError

__all__ = ["consolidate_dcp", "convert_dcp_command", "inspect_dcp", "verify_dcp"]


def inspect_dcp(args: argparse.Namespace) -> dict[str, Any]:
    """``zckpt inspect``'s document of the DCP checkpoint at ``args.path``.

    Example:
        >>> import tempfile, torch
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(2, 3), "step": 5}, d + "/sd.pt")
        >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
        >>> info = inspect_dcp(argparse.Namespace(path=d + "/ck"))
        >>> info["format"], info["world_size"], info["client_state"], info["tensors"][0]["path"]
        ('dcp', 1, {'step': 5}, 'w')
    """
    from zckpt.cli._inspect import _document, _dtype, _tensor_row, _training_dtype, describe_value
    from zckpt.format._dtypes import ITEMSIZE_OF_NAME, is_floating
    from zckpt.interop._dcp import open_dcp

    ck = open_dcp(args.path)
    md = ck.metadata
    stored: Counter[str] = Counter()
    for (name, _), item in md.items.items():
        stored[name] += item.length
    tensors = [
        _tensor_row(n, t.dtype, t.shape, t.numel * ITEMSIZE_OF_NAME[t.dtype], stored[n])
        for n, t in md.tensors.items()
    ]
    dtypes = Counter(_dtype(t.dtype) for t in md.tensors.values() if is_floating(t.dtype))
    meta_bytes = os.path.getsize(ck.files[0])
    return _document(
        format="dcp",
        path=ck.path,
        tags=[],
        latest=None,
        tag=os.path.basename(os.path.normpath(ck.path)),
        blob_format_version=None,
        zckpt_version=None,
        world_size=ck.ranks or 1,
        stage=0,  # not a ZeRO layout: each tensor saved as boxes of its DTensor shards
        codec="raw",
        files=len(ck.files),
        rank_blobs=len(ck.file_names),
        expert_blobs=0,
        client_state_blob=False,
        bytes_on_disk=meta_bytes + sum(ck.sizes.values()),
        frozen=[],
        tied={},
        tensors=tensors,
        client_state=describe_value({n: ck.value(n) for n in md.values}),
        universal=False,
        deepspeed_version=None,
        dtype=_training_dtype(dtypes),
        shared_files=1,  # .metadata
        fp32_state_dict=[  # consolidate's default --dtype fp32 upcasts 16-bit floats
            {"path": n, "dtype": _fp32(t.dtype), "shape": list(t.shape)}
            for n, t in md.tensors.items()
        ],
        dcp_version=md.version,
    )


def _fp32(dtype: str) -> str:
    from zckpt.cli._inspect import _dtype
    from zckpt.format._dtypes import is_floating

    return "fp32" if is_floating(dtype) else _dtype(dtype)


def verify_dcp(args: argparse.Namespace) -> int:
    """``zckpt verify`` of a DCP checkpoint: the metadata reads through the allow-list, every
    file it names is there and every item's byte range lies inside its file, every chunk is a
    tensor of its dtype and sizes, the chunks cover every tensor exactly, every non-tensor value
    reads through the allow-list, and every item's zip records match their CRC-32 (the only
    checksum DCP writes; torch's loads never check it). Exit 1 on any problem.

    Example:
        >>> import tempfile, torch
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> d = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(2, 3)}, d + "/sd.pt")
        >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
        >>> verify_dcp(argparse.Namespace(path=d + "/ck", json=False, quiet=True))
        /...ck: DCP checkpoint, 2 files (1 rank file + 1 shared file), ... bytes, ... OK
        0
    """
    from zckpt.cli._inspect import files_summary
    from zckpt.interop._dcp import open_dcp
    from zckpt.interop._dcp_state import dcp_layout, item_problems

    problems: list[str] = []
    files, nbytes, path = 0, 0, os.fspath(args.path)
    try:
        ck = open_dcp(path)
        files, path = len(ck.files), ck.path
        nbytes = os.path.getsize(ck.files[0]) + sum(ck.sizes.values())
        with progress(args, None, "verify"):
            problems += item_problems(ck)
            if not problems:
                dcp_layout(ck)
                for name in ck.metadata.values:
                    ck.value(name)
    except (ZckptError, OSError) as e:
        problems.append(str(e))
    if args.json:
        report = {"path": path, "tag": os.path.basename(os.path.normpath(path)), "files": files,
                  "bytes": nbytes, "ok": not problems, "problems": problems}  # fmt: skip
        doc = {"path": args.path, "tags": [report], "files": files, "problems": problems,
               "ok": not problems, "tag": report["tag"], "format": "dcp"}  # fmt: skip
        print(json.dumps(doc, indent=2))
    else:
        for p in problems:
            print(p)
        said = files_summary(files, max(0, files - 1), 0, False, shared=min(files, 1),
                             unit="file")  # fmt: skip
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"{path}: DCP checkpoint, {said}, {nbytes} bytes, every item against its "
              f"CRC-32, dtype, sizes and the chunks' coverage: {status}")  # fmt: skip
    return 0 if not problems else 1


def consolidate_dcp(args: argparse.Namespace, kind: str) -> int:
    """``zckpt consolidate DCP_DIR OUT`` (OUT already checked): the module's tensors (those
    under the state dict's ``model`` key, by their names in it, or every tensor when there is
    no such key: ``interop/_dcp_fp32.py``), or with ``--all-tensors`` every tensor by its DCP
    name (optimizer state included), as safetensors, streamed file to file
    (``interop/_dcp_state.py: export_values``), or, for a
    ``.pt``/``.bin`` OUT, the whole state dict as ``dcp_to_torch_save`` writes it (non-tensor
    values included). ``--dtype`` casts floating tensors (fp32, the default, upcasts 16-bit
    ones). Every item is checked against its CRC-32 first.

    Example:
        >>> from zckpt.cli import main
        >>> main(["consolidate", "/nonexistent", "out.safetensors", "--quiet"])
        1
    """
    from zckpt.cli._consolidate import DTYPE_NAMES, end_process, export_to
    from zckpt.interop._dcp_state import export_values

    if kind == "torch":
        return _save_whole(args)
    from zckpt.interop._dcp_fp32 import module_scope

    scope = None if getattr(args, "all_tensors", False) else module_scope
    sd, left_out = export_values(args.path, check_records=True, keys=scope)
    want = DTYPE_NAMES[args.dtype]
    if want == "float32":  # export_to keeps dtypes for fp32: upcast 16-bit values here
        sd = {k: _as(v, want) for k, v in sd.items()}
    if left_out:
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5
                                           else "")  # fmt: skip
        print(f"left out {len(left_out)} non-tensor value(s), which safetensors cannot hold: "
              f"{shown}")  # fmt: skip
    code = export_to(sd, args, kind, None)
    end_process(args)
    return code


def _as(v: Any, dtype: str) -> Any:
    """``v`` as a lazy ``dtype`` tensor when it is a floating one of another dtype."""
    from zckpt.format._dtypes import dtype_name, is_floating, torch_dtype
    from zckpt.store._fp32 import LazyTensor

    src = dtype_name(v.dtype)
    if src == dtype or not is_floating(src):
        return v
    to = torch_dtype(dtype)
    return LazyTensor(tuple(v.shape), to, lambda: v.contiguous().to(to))


def _save_whole(args: argparse.Namespace) -> int:
    import torch

    from zckpt.cli._consolidate import DTYPE_NAMES, FLAG, end_process
    from zckpt.interop._dcp import open_dcp
    from zckpt.interop._dcp_state import checkpoint_state, require_intact
    from zckpt.interop._output import building_file

    ck = open_dcp(args.path)
    require_intact(ck)
    state = checkpoint_state(ck)
    to = getattr(torch, DTYPE_NAMES[args.dtype])
    count = [0]

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            count[0] += 1
            return x.to(to) if x.is_floating_point() and x.dtype != to else x
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        if isinstance(x, list):
            return [cast(v) for v in x]
        return x

    state = cast(state)
    with building_file(args.out, overwrite=args.overwrite, flag=FLAG) as tmp, open(tmp, "xb") as f:
        torch.save(state, f)
    print(f"wrote {args.out}: {count[0]} tensors, {len(ck.metadata.values)} other values")
    end_process(args)
    return 0


def convert_dcp_command(args: argparse.Namespace) -> int:
    """``zckpt convert --from dcp DCP_DIR OUT``: the whole state as a zckpt checkpoint that
    loads at any world size (:func:`zckpt.interop.convert_dcp`).

    Example:
        >>> from zckpt.cli import main
        >>> main(["convert", "--from", "dcp", "/nonexistent", "/tmp/x"])
        1
    """
    from zckpt.interop._dcp_convert import convert_dcp

    saved = convert_dcp(
        args.path, args.out, args.tag, codec=args.codec or "raw", overwrite=args.overwrite
    )
    print(f"wrote {saved.path} (tag {saved.tag}); it loads at any world size and stage")
    return 0
