"""Helpers for the DCP tests: write DCP checkpoints the way torch 2.13's ``FileSystemWriter``
does (its own metadata dataclasses pickled, each item ``torch.save``'d and appended to its
rank's ``__<rank>_0.distcp``), with chunks chosen by the test; read them with torch's own
``dcp_to_torch_save``; spawn real ranks (``dcp_child.py``)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

#: ``(rank, offsets, sizes)``: one saved chunk and the rank whose file holds it.
Chunk = tuple[int, tuple[int, ...], tuple[int, ...]]


def box(t: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The chunk of ``t`` at ``offsets`` of ``sizes`` (a view)."""
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, s)
    return t


def write_dcp(
    root: str | os.PathLike[str],
    tensors: dict[str, tuple[torch.Tensor, list[Chunk]]],
    values: dict[str, Any] | None = None,
    *,
    store: Callable[[torch.Tensor], torch.Tensor] = lambda c: c.clone(),
    paths: dict[str, tuple[str | int, ...]] | None = None,
) -> Metadata:
    """A DCP checkpoint of ``tensors`` (each its full value and its chunks) and ``values``
    (non-tensor entries, written by rank 0) at ``root``; ``store`` makes the tensor each chunk
    is saved as (default: a compact copy, as DCP's writer clones views). Returns the metadata."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[int, io.BytesIO] = {}
    sdm: dict[str, Any] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}

    def put(rank: int, data: bytes) -> _StorageInfo:
        f = files.setdefault(rank, io.BytesIO())
        at = f.tell()
        f.write(data)
        return _StorageInfo(f"__{rank}_0.distcp", at, len(data))

    for name, v in (values or {}).items():
        buf = io.BytesIO()
        torch.save(v, buf)
        storage[MetadataIndex(name)] = put(0, buf.getvalue())
        sdm[name] = BytesStorageMetadata()
    for name, (full, chunks) in tensors.items():
        metas = []
        for rank, offsets, sizes in chunks:
            buf = io.BytesIO()
            torch.save(store(box(full, offsets, sizes)), buf)
            storage[MetadataIndex(name, offsets)] = put(rank, buf.getvalue())
            metas.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        sdm[name] = TensorStorageMetadata(TensorProperties(dtype=full.dtype), full.shape, metas)
    planner = paths if paths is not None else {n: (n,) for n in sdm}
    md = Metadata(sdm, planner_data=planner, storage_data=storage, version="1.0.0")
    for rank, f in files.items():
        (root / f"__{rank}_0.distcp").write_bytes(f.getvalue())
    with open(root / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return md


def torch_reads(root: str | os.PathLike[str]) -> Any:
    """What torch's own ``dcp_to_torch_save`` makes of the checkpoint, loaded back."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(root, os.path.join(d, "sd.pt"))
        return torch.load(os.path.join(d, "sd.pt"), weights_only=False)


def dcp_save(state: dict[str, Any], root: str | os.PathLike[str]) -> None:
    """``dcp.save`` in this process, without a process group (its warning silenced)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=os.fspath(root), no_dist=True)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal trees, tensors bit for bit (dtype, shape and bytes), types and order of keys."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (where, a.dtype, b.dtype, a.shape)
        assert torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        ), where
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


CHILD = Path(__file__).with_name("dcp_child.py")


def spawn_ranks(
    child: Path, work: Path, world_size: int, mode: str, deadline_s: float = 180.0
) -> None:
    """Run the script ``child`` as ``world_size`` real ranks (gloo), each given its rank, the
    world size, ``work`` and ``mode``; an error with the output of any rank that fails."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(child), str(r), str(world_size), str(work), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(world_size)
    ]
    end = time.monotonic() + deadline_s
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(0.1, end - time.monotonic()))
            outs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, text) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise AssertionError(f"{mode} rank {r} exited with {p.returncode}:\n{text[-4000:]}")


def spawn_dcp(work: Path, world_size: int, kind: str, deadline_s: float = 180.0) -> Path:
    """Run ``dcp_child.py`` as ``world_size`` real ranks (gloo); the checkpoint's directory."""
    spawn_ranks(CHILD, work, world_size, kind, deadline_s)
    return work / "ckpt"
