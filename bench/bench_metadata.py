"""Metadata at cluster scale (issue 13): planning, commit and manifest costs without tensor bytes.

For each model (Llama-3 405B, a DeepSeek-V3-like MoE with 256 routed experts per layer; shapes
in ``bench/_models.py``), world size and ZeRO stage, this simulates what one save and one
resharded load cost in metadata, with no tensor allocated:

* **save plan**: one rank (``ws // 2``) plans the skeleton and lists what it writes, and checks
  its files' fragments against the plan (``file_report``), as ``save_checkpoint`` does;
* **commit**: rank 0 turns every rank's report into the manifest and encodes it;
* **manifest**: its bytes (the version zckpt writes; and, where it can be built in memory,
  the version 1 form for comparison);
* **blob index**: one rank's blob index bytes as the writer writes it (fragments with one chunk
  each; version 2, the skeleton's digest and the blob's own leaf columns, where the manifest is
  version 2, else version 1 with the whole skeleton);
* **load plan**: a rank at the new world size decodes the manifest, plans, and finds every
  saved fragment its holdings overlap (``Checkpoint.source_index``, no file opened).

Times are wall seconds on this machine (and CPU seconds, since a shared VM's wall time
varies); memory is tracemalloc's peak of Python and NumPy allocations during the step (a
separate run). DCP's ``.metadata`` for the same tensors chunked over every rank (each tensor
cut along dim 0, as FSDP does) is pickled and unpickled where it has at most
``--dcp-max-chunks`` chunks.

Usage: ``python bench/bench_metadata.py [--smoke] [--json out.json] [--models llama,moe]``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import pickle
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _models

import zckpt
from zckpt.format._header import ChunkEntry
from zckpt.format._index import index_object, index_object_v2, pack_index
from zckpt.format._skeleton import U64, skeleton_to_wire
from zckpt.spec import ShardPlan, ZeroSpec, plan_shards
from zckpt.store._layout import blob_name, expert_name
from zckpt.store._manifest import (
    FileRecord,
    Manifest,
    decode_manifest,
    derived_fragments,
    encode_manifest,
    file_report,
    writes_v2,
)
from zckpt.store._read import Checkpoint
from zckpt.tree import Skeleton

GEN = "0123456789abcdef"


def measure(fn: Callable[[], Any], memory: bool = True) -> tuple[float, float, float, Any]:
    """(wall s, cpu s, traced peak MiB, result): timed once untraced, then traced once."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = float("nan")
    if memory:
        del out
        gc.collect()
        tracemalloc.start()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return wall, cpu, peak, out


def spec_for(experts: int, ws: int, stage: int) -> ZeroSpec:
    """The spec of a save at ``ws``: MoE states at expert-parallel size gcd(ws, experts, 64)."""
    if experts:
        ep = math.gcd(ws, experts, 64)
        return ZeroSpec(ws, stage, experts=_models.EXPERTS, expert_parallel_size=ep)
    return ZeroSpec(ws, stage)


def rank_files(plan: ShardPlan, rank: int) -> list[FileRecord]:
    """The files one rank writes, with their real fragments (sizes and hashes made up)."""
    ws = plan.world_size
    own = plan.writes_of(rank)
    out = [FileRecord(blob_name(GEN, rank, ws), rank, 4096, rank, derived_fragments(plan, rank))]
    experts = sorted({plan.placements[f.leaf].expert for f in own} - {-1})
    for e in experts:
        frags = derived_fragments(plan, rank, e)
        out.append(FileRecord(expert_name(GEN, e), rank, 4096, e, frags, e, e + 1))
    return [FileRecord(f.name, f.rank, f.size, f.xxh3, f.fragments, f.expert, 7) for f in out]


def save_plan(skel: Skeleton, spec: ZeroSpec) -> list[dict[str, Any]]:
    """One rank's save planning, from a skeleton as fresh as a save's own ``flatten`` gives
    (a copy: nothing cached on ``skel`` by an earlier plan is reused)."""
    rank = spec.world_size // 2
    plan = plan_shards(Skeleton(skel.node, skel.tensors, skel.paths), spec)
    return [file_report(rec, plan) for rec in rank_files(plan, rank)]


def all_reports(skel: Skeleton, spec: ZeroSpec) -> list[dict[str, Any]]:
    """What rank 0 receives: every rank's compact reports (all derived in a plain save)."""
    plan = plan_shards(skel, spec)
    out = []
    for r in range(spec.world_size):
        out.append(
            {
                "name": blob_name(GEN, r, spec.world_size),
                "rank": r,
                "size": (1 << 60) + r,
                "xxh3": r,
                "expert": -1,
                "derived": True,
                "index_xxh3": r + 1,
            }
        )
    for e in range(plan.num_experts):
        leaves = plan.expert_leaves(e)
        if leaves:
            owner = plan.placements[leaves[0]].owner
            out.append(
                {
                    "name": expert_name(GEN, e),
                    "rank": owner,
                    "size": 1 << 60,
                    "xxh3": e,
                    "expert": e,
                    "derived": True,
                    "index_xxh3": e + 1,
                }
            )
    return out


def commit(skel: Skeleton, spec: ZeroSpec, reports: list[dict[str, Any]]) -> bytes:
    """Rank 0's manifest building, as store/_commit.py::_commit does it."""
    files = sorted(
        (FileRecord.from_obj(r, allow_derived=True) for r in reports), key=lambda f: f.rank
    )
    m = Manifest("t", GEN, 1.0, spec, skel, tuple(files), None, (), False, zckpt.__version__)
    return encode_manifest(m)


def blob_index_bytes(plan: ShardPlan, rank: int, skeleton_bytes: int) -> int:
    """One rank blob's index: its fragments, one chunk each, in the version the writer uses
    (``writes_v2``); a version 1 index also carries the skeleton (``skeleton_bytes``)."""
    frags = derived_fragments(plan, rank)
    tensors = plan.skeleton.tensors
    entries = []
    off = 1 << 20
    for f in frags:
        n = f.numel * tensors[f.leaf].itemsize
        entries.append((f, [ChunkEntry(0, f.numel, 0, off, n, n, 0xFFFF_FFFF_FFFF)]))
        off += n
    if writes_v2(plan.spec, plan.skeleton):  # a stand-in digest of the same packed size
        tensors = plan.skeleton.tensors
        return len(pack_index(index_object_v2(rank, plan.spec, tensors, U64, entries, {}, off)))
    obj = index_object(rank, plan.spec, Skeleton((4, None), (), ()), entries, {}, off)
    obj.pop("tensors", None)
    obj.pop("skeleton", None)
    return len(pack_index(obj)) + skeleton_bytes


def load_plan(data: bytes, new: ZeroSpec, rank: int) -> int:
    """A loading rank: decode the manifest, plan, find every overlapping saved fragment."""
    m = decode_manifest(data)
    plan = plan_shards(m.skeleton, new)
    index = Checkpoint("/nowhere", m, None).source_index()  # type: ignore[arg-type]
    n = 0
    for want in plan.holds(rank):
        for _ in index.overlapping(want):
            n += 1
    return n


def _dcp_chunks(meta_shape: tuple[int, ...], ws: int) -> list[tuple[int, int]]:
    """(row offset, rows) of each chunk of a tensor cut along dim 0 over ``ws`` ranks."""
    shape = meta_shape or (1,)
    rows = shape[0]
    per = -(-rows // ws) if rows else 1
    return [(r * per, min(per, rows - r * per)) for r in range(min(ws, max(1, -(-rows // per))))]


def dcp_chunk_count(skel: Skeleton, ws: int) -> int:
    """How many chunks DCP's ``.metadata`` lists for this layout (arithmetic, nothing built)."""
    n = 0
    for meta in skel.tensors:
        rows = (meta.shape or (1,))[0]
        per = -(-rows // ws) if rows else 1
        n += min(ws, max(1, -(-rows // per)))
    return n


def dcp_metadata(skel: Skeleton, ws: int) -> tuple[int, float, int]:
    """(pickled bytes, unpickle seconds, chunks) of DCP's .metadata for this layout, built
    from torch.distributed.checkpoint.metadata objects (no process group)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    sd: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    chunks = 0
    for i, meta in enumerate(skel.tensors):
        fqn = skel.name(i)
        shape = meta.shape or (1,)
        cs = []
        for r, (a, rows) in enumerate(_dcp_chunks(meta.shape, ws)):
            off = (a,) + (0,) * (len(shape) - 1)
            cs.append(ChunkStorageMetadata(torch.Size(off), torch.Size((rows, *shape[1:]))))
            storage[MetadataIndex(fqn, off)] = _StorageInfo(f"__{r}_0.distcp", a, 1)
        chunks += len(cs)
        sd[fqn] = TensorStorageMetadata(TensorProperties(meta.dtype), torch.Size(shape), cs)
    md = Metadata(sd, storage_data=storage)
    buf = io.BytesIO()
    pickle.dump(md, buf)
    raw = buf.getvalue()
    del md, sd, storage
    gc.collect()
    t0 = time.perf_counter()
    pickle.loads(raw)
    return len(raw), time.perf_counter() - t0, chunks


def models(smoke: bool, which: list[str]) -> dict[str, Skeleton]:
    out = {}
    if smoke:
        small = {
            k: v for k, v in _models.llama3_405b().items() if "layers.0." in k or "." not in k[6:]
        }
        out["llama-smoke"] = _models.training_skeleton(small)
        moe = _models.deepseek_v3_like(experts=8, layers=5)
        out["moe-smoke"] = _models.training_skeleton(moe)
        return out
    if "llama" in which:
        out["Llama-3 405B"] = _models.training_skeleton(_models.llama3_405b())
    if "moe" in which:
        out["moe DeepSeek-V3-like"] = _models.training_skeleton(_models.deepseek_v3_like())
    return out


def run_case(
    name: str, skel: Skeleton, skel_bytes: int, ws: int, stage: int, new_ws: int, args: Any
) -> dict[str, Any]:
    experts = 1 + max((e for e in ZeroSpec(1, 1, experts=_models.EXPERTS).experts_of(skel.paths)
                       if e is not None), default=-1)  # fmt: skip
    spec = spec_for(experts, ws, stage)
    row: dict[str, Any] = {"model": name, "tensors": len(skel.tensors), "ws": ws, "stage": stage}
    mem = not args.no_memory
    w, c, p, _ = measure(lambda: save_plan(skel, spec), mem)
    row.update(save_plan_s=w, save_plan_cpu_s=c, save_plan_mib=p)
    reports = all_reports(skel, spec)
    w, c, p, data = measure(lambda: commit(skel, spec, reports), mem)
    row.update(commit_s=w, commit_cpu_s=c, commit_mib=p, manifest_bytes=len(data))
    row["manifest_version"] = int.from_bytes(data[8:12], "little")
    plan = plan_shards(skel, spec)
    row["blob_index_bytes"] = blob_index_bytes(plan, ws // 2, skel_bytes)
    new = spec_for(experts, new_ws, stage)
    w, c, p, n = measure(lambda: load_plan(data, new, new_ws // 2), mem)
    row.update(new_ws=new_ws, load_plan_s=w, load_plan_cpu_s=c, load_plan_mib=p, sources=n)
    row["dcp_chunks"] = dcp_chunk_count(skel, ws)
    if row["dcp_chunks"] <= args.dcp_max_chunks:
        size, secs, _ = dcp_metadata(skel, ws)
        row.update(dcp_bytes=size, dcp_load_s=secs)
    return row


def extrapolate_dcp(rows: list[dict[str, Any]], refs: dict[str, dict[str, Any]]) -> None:
    """Where DCP's .metadata was too big to build here, estimate its size and unpickle time
    from its exact chunk count at the bytes and seconds per chunk of the largest case built
    for the same model (a row, or ``refs[model]``, built at world size 1); marked
    ``dcp_estimated``."""
    for r in rows:
        if "dcp_bytes" in r:
            continue
        built = [m for m in rows if "dcp_bytes" in m and m["model"] == r["model"]]
        built += [refs[r["model"]]] if r["model"] in refs else []
        if not built:
            continue
        ref = max(built, key=lambda m: m["dcp_chunks"])
        scale = r["dcp_chunks"] / ref["dcp_chunks"]
        r.update(
            dcp_bytes=ref["dcp_bytes"] * scale,
            dcp_load_s=ref["dcp_load_s"] * scale,
            dcp_estimated=True,
        )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model (tensors) | ws | stage | save plan s (cpu) / MiB | commit s (cpu) / MiB | "
        "manifest (v) | blob index | load at ws | load plan s (cpu) / MiB | "
        "DCP .metadata / load s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        dcp = f"{fmt_bytes(r['dcp_bytes'])} / {r['dcp_load_s']:.2f}" if "dcp_bytes" in r else "-"
        if r.get("dcp_estimated"):
            dcp = f"est. {dcp}"
        if "dcp_chunks" in r:
            dcp += f" ({r['dcp_chunks']} chunks)"
        lines.append(
            f"| {r['model']} ({r['tensors']}) | {r['ws']} | {r['stage']} | "
            f"{r['save_plan_s']:.2f} ({r['save_plan_cpu_s']:.2f}) / {r['save_plan_mib']:.0f} | "
            f"{r['commit_s']:.2f} ({r['commit_cpu_s']:.2f}) / {r['commit_mib']:.0f} | "
            f"{fmt_bytes(r['manifest_bytes'])} (v{r['manifest_version']}) | "
            f"{fmt_bytes(r['blob_index_bytes'])} | {r['new_ws']} | "
            f"{r['load_plan_s']:.2f} ({r['load_plan_cpu_s']:.2f}) / {r['load_plan_mib']:.0f} | "
            f"{dcp} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, ws 8 and 64 (seconds)")
    ap.add_argument("--models", default="llama,moe", help="comma-separated: llama, moe")
    ap.add_argument("--world-sizes", default="8,512,4096,16384")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--no-memory", action="store_true", help="skip the traced (slower) runs")
    ap.add_argument(
        "--dcp-max-chunks",
        type=int,
        default=400_000,
        help="build DCP's .metadata only up to this many chunks (~3 KB of memory each)",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.dcp_max_chunks = min(args.dcp_max_chunks, 4000)
    sizes = [8, 64] if args.smoke else [int(x) for x in args.world_sizes.split(",")]
    stages = [1, 3] if args.smoke else [int(x) for x in args.stages.split(",")]
    print(f"# bench_metadata on {platform.node()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; zckpt {zckpt.__version__}", flush=True)  # fmt: skip
    rows = []
    skels = models(args.smoke, args.models.split(","))
    for name, skel in skels.items():
        skel_bytes = len(msgpack.packb(skeleton_to_wire(skel), use_bin_type=True))
        for ws in sizes:
            for stage in stages:
                targets = [ws * 3 // 4 or 1]
                if ws == 4096:
                    targets.append(8192)
                for new_ws in targets:
                    row = run_case(name, skel, skel_bytes, ws, stage, new_ws, args)
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
    refs = {}
    for name, skel in skels.items():
        built = any("dcp_bytes" in r for r in rows if r["model"] == name)
        if not built and dcp_chunk_count(skel, 1) <= args.dcp_max_chunks:  # to scale from
            size, secs, chunks = dcp_metadata(skel, 1)
            refs[name] = {"dcp_bytes": size, "dcp_load_s": secs, "dcp_chunks": chunks}
            print(f"# DCP .metadata of {name} at ws 1: {fmt_bytes(size)}, unpickled in "
                  f"{secs:.2f} s, {chunks} chunks", flush=True)  # fmt: skip
    extrapolate_dcp(rows, refs)
    print()
    print(table(rows))
    print()
    print(growth(rows))
    print()
    print(growth_tensors(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def growth(rows: list[dict[str, Any]]) -> str:
    """Log-log slope of each figure against world size (smallest to largest, same model and
    stage): 0 means flat, 1 linear in ranks."""
    import math

    out = ["| model | stage | metric | ws range | slope vs ranks |", "|---|---|---|---|---|"]
    keys = ("save_plan_cpu_s", "commit_cpu_s", "manifest_bytes", "blob_index_bytes",
            "load_plan_cpu_s", "save_plan_mib", "commit_mib", "load_plan_mib")  # fmt: skip
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["new_ws"] == r["ws"] * 3 // 4 or r["ws"] * 3 // 4 == 0:
            groups.setdefault((r["model"], r["stage"]), []).append(r)
    for (model, stage), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["ws"])
        if len(rs) < 2:
            continue
        lo, hi = rs[1] if len(rs) > 2 else rs[0], rs[-1]
        for k in keys:
            if not (lo[k] == lo[k] and hi[k] == hi[k]):  # nan: memory not traced
                continue
            a, b = max(lo[k], 1e-6), max(hi[k], 1e-6)
            slope = math.log(b / a) / math.log(hi["ws"] / lo["ws"])
            out.append(f"| {model} | {stage} | {k} | {lo['ws']}-{hi['ws']} | {slope:.2f} |")
    return "\n".join(out)


def growth_tensors(rows: list[dict[str, Any]]) -> str:
    """Log-log slope of each figure against tensors: between the two models (same world size,
    stage and new world size); 0 means flat, 1 linear in tensors."""
    keys = ("save_plan_cpu_s", "commit_cpu_s", "manifest_bytes", "blob_index_bytes",
            "load_plan_cpu_s", "save_plan_mib", "commit_mib", "load_plan_mib")  # fmt: skip
    out = ["| ws | stage | new ws | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    by: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["ws"], r["stage"], r["new_ws"]), []).append(r)
    for (ws, stage, new_ws), rs in sorted(by.items()):
        models = {r["tensors"]: r for r in rs}
        if len(models) < 2:
            continue
        lo, hi = models[min(models)], models[max(models)]
        span = math.log(hi["tensors"] / lo["tensors"])
        slopes = []
        for k in keys:
            a, b = lo[k], hi[k]
            ok = a == a and b == b and a > 0 and b > 0  # nan (not traced) or 0: no slope
            slopes.append(f"{math.log(max(b, 1e-6) / max(a, 1e-6)) / span:.2f}" if ok else "-")
        out.append(f"| {ws} | {stage} | {new_ws} | " + " | ".join(slopes) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
