"""Tensor-parallel blocks: what a ``Shard(1)`` DTensor costs against a ``Shard(0)`` one.

A DTensor block is saved as its runs contiguous in the row-major tensor (``spec/_boxes.py``):
one run for a block of whole rows (``Shard(0)``, FSDP2), one per row for a block of columns
(``Shard(1)``, tensor parallelism's row-wise layers such as ``o_proj`` and ``down_proj``). Each
run is a fragment, so a ``Shard(1)`` block of R rows is R fragments in the blob index, the
manifest and every reader. This bench measures that cost on the same bytes, ranks as threads
in one process (``zckpt.testing.run_ranks``), local disk, page cache warm:

* **save**: every rank saves its blocks of ``--tensors`` bf16 ``[rows, rows]`` tensors;
* **load ws 1**: one rank loads the whole state (what consolidation reads);
* **load blocks**: every rank loads its own blocks back ``into=`` their local tensors;
* **manifest** and one blob's **header** (preamble and index) bytes, and fragments saved.

Usage: ``python bench/bench_boxes.py [--ranks 8] [--rows 1024,2048] [--tensors 4] [--json F]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

import zckpt
from zckpt.format import read_header_size
from zckpt.shard import LocalBox
from zckpt.spec import mesh_coordinate
from zckpt.testing import run_ranks

LAYOUTS = {
    "Shard(0)": ((0,), False),
    "Shard(1)": ((1,), False),
    "(Shard(0), Shard(1))": ((0, 1), True),
}


def _mesh(ranks: int, two_d: bool) -> tuple[int, ...]:
    return (2, ranks // 2) if two_d else (ranks,)


def _one(root: str, layout: str, ranks: int, rows: int, tensors: int) -> dict[str, Any]:
    dims, two_d = LAYOUTS[layout]
    mesh = _mesh(ranks, two_d)
    g = torch.Generator().manual_seed(0)
    state = {
        "model": {f"t{i}": torch.randn(rows, rows, generator=g).bfloat16() for i in range(tensors)}
    }
    skel, _ = zckpt.tree.flatten(state)
    plan = zckpt.plan_shards(skel, zckpt.ZeroSpec(ranks, 3))
    blocks = [
        {
            i: LocalBox.of(state["model"][f"t{i}"], mesh, mesh_coordinate(mesh, r), dims)
            for i in range(tensors)
        }
        for r in range(ranks)
    ]
    d = os.path.join(root, layout.replace(" ", "").replace(",", "-"))

    def save(comm: Any) -> None:
        shard = zckpt.shard_state(state, plan, comm.rank, blocks[comm.rank])
        zckpt.save_checkpoint(d, shard, comm=comm, tag="t")

    t = time.perf_counter()
    run_ranks(save, ranks, timeout=600)
    save_s = time.perf_counter() - t

    t = time.perf_counter()
    whole = zckpt.load_checkpoint(d, world_size=1).state
    load1_s = time.perf_counter() - t
    assert all(torch.equal(whole["model"][k], v) for k, v in state["model"].items())

    def load(comm: Any) -> None:
        into = {
            "model": {
                f"t{i}": LocalBox(b.shape, b.box, torch.empty_like(b.data), b.writes)
                for i, b in blocks[comm.rank].items()
            }
        }
        zckpt.load_checkpoint(d, into=into)
        for i, b in into["model"].items():
            assert torch.equal(b.data, blocks[comm.rank][int(i[1:])].data)

    t = time.perf_counter()
    run_ranks(load, ranks, timeout=600)
    load_blocks_s = time.perf_counter() - t

    files = sorted(os.listdir(os.path.join(d, "t")))
    blob = next(f for f in files if f.endswith(".zck"))
    with open(os.path.join(d, "t", blob), "rb") as f:
        header_bytes = read_header_size(f.read(64))
    fragments = sum(len(b.runs(0)) for r in blocks for b in r.values() if b.writes)
    return {
        "layout": layout,
        "mesh": list(mesh),
        "rows": rows,
        "save_s": round(save_s, 3),
        "load_ws1_s": round(load1_s, 3),
        "load_blocks_s": round(load_blocks_s, 3),
        "manifest_bytes": os.path.getsize(os.path.join(d, "t", "manifest.zckm")),
        "blob_index_bytes": header_bytes,
        "fragments": fragments,
        "data_mib": round(tensors * rows * rows * 2 / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--rows", default="1024,2048")
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="zckpt-bench-boxes-")
    rows_out = []
    try:
        print(
            f"{'layout':22} {'rows':>5} {'MiB':>6} {'save s':>7} {'load ws1 s':>10} "
            f"{'load blocks s':>13} {'manifest B':>11} {'blob header B':>13} {'fragments':>9}"
        )
        for rows in (int(x) for x in args.rows.split(",")):
            for layout in LAYOUTS:
                r = _one(root, layout, args.ranks, rows, args.tensors)
                rows_out.append(r)
                print(
                    f"{layout:22} {rows:5} {r['data_mib']:6} {r['save_s']:7.3f} "
                    f"{r['load_ws1_s']:10.3f} {r['load_blocks_s']:13.3f} "
                    f"{r['manifest_bytes']:11} {r['blob_index_bytes']:13} {r['fragments']:9}",
                    flush=True,
                )
                shutil.rmtree(os.path.join(root, os.listdir(root)[0]), ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        meta = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "ranks": args.ranks,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
