"""The benchmark suite of issue 6: zckpt against its peers, in one run, on one training state.

Every operation runs on the same tensors (``_common.training_state``), in the same run, so the
ratios against peers survive a noisy machine better than the absolute speeds; the one-process
groups run in this process, the two-process, fp32 and DeepSpeed groups in child processes.
For each row: the median time of ``--reps`` runs with min-max, GB/s of tensor bytes, the growth
of the resident set's high-water mark (VmHWM reset through ``/proc/self/clear_refs``), the
page-cache state, and the ratio against the row's peer (> 1 means faster than the peer).

Groups (all checkpoints go to one temporary directory on the filesystem under test, removed at
the end; each peer's files are removed as soon as its loads are done):

* durable save (fsync included): raw ``numpy.tofile`` + fsync (the physical limit), ``torch.save``
  + fsync, ``safetensors.torch.save_file`` + fsync, PyTorch DCP in one process (no process group;
  its own ``sync_files``), zckpt ``save_checkpoint`` raw and byteplane at world size 1 and N (one
  process writing every rank);
* warm load into new tensors (files just written, page cache warm), and cold load after
  ``posix_fadvise(DONTNEED)`` on every file of the checkpoint (this drops clean pages only; every
  writer fsynced its files, so all of its pages are clean);
* load at another world size: every rank of world size N+1 in turn (sum) against every rank of
  world size N (sum), both from the world-size-N checkpoint;
* fp32 consolidation (``get_fp32_state_dict_from_zero_checkpoint``), eager and lazy;
* async save: how long ``save_checkpoint(async_=saver)`` blocks, against a synchronous save;
* compression per dtype: ratio and GB/s per core (``threads=1``) of zstd and byteplane on a
  one-tensor shard, encode and decode;
* two real processes (``bench/_dcp2.py``): PyTorch DCP and zckpt, each with two gloo ranks
  started once per peer (start-up, ``import torch`` and building the state are not timed).
  zckpt: ``save_checkpoint(comm=TorchComm(), spec=ZeroSpec(2, 2))``, each rank holding the full
  state and writing its own shard; ``load_checkpoint(spec, rank=r)`` reads what rank r holds.
  DCP: each rank saves exactly the tensors of the zckpt shard it writes (rank-distinct keys,
  ``sync_files=True``) and loads them back. Time = max over ranks of barrier -> op -> barrier;
  peak RSS = max over ranks;
* DeepSpeed (``bench/_deepspeed.py``, when ``import deepspeed`` works): two bf16 checkpoints
  of about ``--gib`` GiB each written by DeepSpeed itself (2 gloo processes, one training step;
  each cached apart under ``--ds-cache``, its generation time reported apart): ZeRO-2 of 4
  ``Linear(d, d)`` (few big tensors: DeepSpeed's best case) and ZeRO-3 of a transformer-shaped
  stack (386 parameter tensors). For each, in a fresh process per repetition: DeepSpeed's
  ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (its phases timed apart), zckpt's
  eager one and zckpt's lazy one (peak RSS = VmHWM growth over the process's baseline after its
  imports). zckpt's and DeepSpeed's outputs are checked bitwise equal, once per checkpoint.

* command line start-up (``bench/bench_cli.py``, issue 14 part 4): new processes of ``zckpt
  --help``, ``--version``, ``inspect``, ``verify`` and ``prune`` of a small checkpoint, with
  ``python -c pass``, ``import zckpt`` and ``import torch`` for reference (medians of at least 5
  processes; CPU time as an extra), and whether each command imported torch or Numba.

``--only io,reshard,fp32,async,compress,dcp2,deepspeed`` runs a subset (``io`` is the durable
save and the warm/cold loads of the one-process peers); ``--no-deepspeed`` skips DeepSpeed.

    /work/venv/bin/python bench/suite.py                      # 1 GiB, 3 repetitions
    /work/venv/bin/python bench/suite.py --smoke              # tiny sizes, 1 repetition (CI)
    /work/venv/bin/python bench/suite.py --only dcp2,deepspeed --out F.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import _dcp2  # bench/ is sys.path[0]
import _deepspeed
import _export
import _resume
import bench_cli
import numpy as np
import safetensors.torch
import torch
from _common import drop_cache, timed_peak, training_state
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load_into
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save_state

# Runs from a checkout without installing zckpt: the repository root goes on the path.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zckpt

# (name, path relative to the run's directory, save(path), load(path) or None)
Peer = tuple[str, str, Callable[[str], None], Callable[[str], Any] | None]

GROUPS = (
    "io",
    "reshard",
    "fp32",
    "async",
    "compress",
    "dcp2",
    "deepspeed",
    "resume",
    "tmpfs",
    "export",
    "cli",
)
DCP2, ZCKPT2 = "DCP, 2 processes", "zckpt raw, ws 2, 2 processes"
DS_ROW, DS_EAGER, DS_LAZY = "DeepSpeed zero_to_fp32", "zckpt eager", "zckpt lazy (one at a time)"
# The table group of each DeepSpeed checkpoint ("fp32 DS z2 4xLinear", "fp32 DS z3 transformer").
DS_GROUPS = {k: f"fp32 DS {label}" for k, label in _deepspeed.LABELS.items()}


@dataclass
class Row:
    """One measured operation."""

    group: str
    name: str
    cache: str
    times: list[float]
    peak_mib: float
    nbytes: int
    peer: str | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Suite:
    """Runs operations and collects their rows."""

    reps: int
    rows: list[Row] = field(default_factory=list)
    # Per DeepSpeed checkpoint kind: zckpt's fp32 of it == zero_to_fp32's.
    ds_bitwise: dict[str, bool] = field(default_factory=dict)
    # Per (DeepSpeed checkpoint kind, zckpt export command): its output equals zero_to_fp32.py's.
    export_equal: dict[tuple[str, str], bool] = field(default_factory=dict)

    def measure(
        self,
        group: str,
        name: str,
        fn: Callable[[], Any],
        nbytes: int,
        *,
        cache: str,
        peer: str | None = None,
        note: str = "",
        before: Callable[[], None] | None = None,
        reps: int | None = None,
    ) -> Row:
        """Time ``fn`` ``reps`` times (``before`` runs untimed before each) and record a row."""
        times: list[float] = []
        peak = 0.0
        for _ in range(self.reps if reps is None else reps):
            if before is not None:
                before()
            seconds, added, out = timed_peak(fn)
            times.append(seconds)
            peak = max(peak, added)
            del out
        for row in self.rows:
            if row.group == group and row.name == name:  # a further round of the same operation
                row.times += times
                row.peak_mib = max(row.peak_mib, peak)
                break
        else:
            row = Row(group, name, cache, times, peak, nbytes, peer, note)
            self.rows.append(row)
        print(f"  {group:>10s} | {name:<44s} {times[-1]:8.3f} s", file=sys.stderr, flush=True)
        return row

    def find(self, group: str, name: str) -> Row:
        """The row of ``group`` called ``name``."""
        for r in self.rows:
            if r.group == group and r.name == name:
                return r
        raise KeyError((group, name))


# ---------------------------------------------------------------------------------------------
# Helpers


def leaves(state: Any) -> list[torch.Tensor]:
    """The state's tensors in tree order."""
    return list(zckpt.tree.flatten(state)[1])


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Sum of the tensors' byte sizes."""
    return sum(t.numel() * t.element_size() for t in tensors)


def u8(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 NumPy array (no copy; works for bf16)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def flat_dict(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Leaves of nested dicts with dotted keys."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from flat_dict(v, key + ".")
        else:
            yield key, v


def fsync_path(path: str) -> None:
    """fsync one file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Remove a file or directory tree."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def settle(path: str) -> None:
    """Before a timed save: remove the peer's previous files, then ``sync`` so that no earlier
    write-back or deletion is still in flight when the clock starts (the disk is quiet for every
    peer alike)."""
    remove(path)
    os.sync()


def machine(root: str) -> list[str]:
    """Lines describing the machine: cores, memory, CPU, the disk under ``root`` (``df``)."""
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    df = subprocess.run(
        ["df", "-hT", root], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    disk = " ".join(df[-1].split()) if df else "?"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return [
        f"cores: {len(os.sched_getaffinity(0))} usable of {os.cpu_count()} ({cpu}); "
        f"memory: {mem_kib / 2**20:.1f} GiB; load average at start: {load}",
        f"disk (df -hT of the checkpoint dir): {disk}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}, numpy {np.__version__}, "
        f"zckpt {zckpt.__version__}; torch threads {torch.get_num_threads()}",
    ]


# ---------------------------------------------------------------------------------------------
# Peers: save and load functions


def raw_save(tensors: list[torch.Tensor], path: str) -> None:
    """Every tensor's bytes with numpy.tofile into one file, then fsync."""
    with open(path, "wb") as f:
        for t in tensors:
            u8(t).tofile(f)
        f.flush()
        os.fsync(f.fileno())


def raw_load(like: list[torch.Tensor], path: str) -> list[torch.Tensor]:
    """readinto fresh tensors shaped like ``like``."""
    out = []
    with open(path, "rb", buffering=0) as f:
        for t in like:
            n = torch.empty_like(t, memory_format=torch.contiguous_format)
            view = u8(n).data
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise EOFError(path)
                got += k
            out.append(n)
    return out


def raw_read_into(tensors: list[torch.Tensor], path: str) -> list[torch.Tensor]:
    """readinto existing tensors (their memory touched already): the limit of a load in place."""
    with open(path, "rb", buffering=0) as f:
        for t in tensors:
            view = u8(t).data
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise EOFError(path)
                got += k
    return tensors


def torch_save(state: Any, path: str) -> None:
    """torch.save then fsync."""
    torch.save(state, path)
    fsync_path(path)


def st_save(state: Any, path: str) -> None:
    """safetensors save_file of the flattened tensors (non-tensors in the metadata), fsync."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for k, v in flat_dict(state):
        if isinstance(v, torch.Tensor):
            tensors[k] = v
        else:
            meta[k] = repr(v)
    safetensors.torch.save_file(tensors, path, metadata=meta)
    fsync_path(path)


def dcp_save(state: Any, path: str) -> None:
    """torch.distributed.checkpoint.save in one process (sync_files: DCP's own fsync)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_save_state(state, storage_writer=FileSystemWriter(path, sync_files=True))


def empty_like_tree(tree: Any) -> Any:
    """Fresh uninitialised tensors shaped like ``tree``'s (what DCP loads into)."""
    if isinstance(tree, dict):
        return {k: empty_like_tree(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree)
    return tree


def dcp_load(state: Any, path: str) -> Any:
    """Allocate the state (timed: DCP needs it preallocated), then DCP load into it."""
    target = empty_like_tree(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_load_into(target, checkpoint_id=path)
    return target


def zckpt_save(state: Any, path: str, ws: int, codec: str) -> None:
    """save_checkpoint of every rank of world size ``ws`` from this process (durable)."""
    zckpt.save_checkpoint(path, state, zckpt.ZeroSpec(ws, 2), tag="t", codec=codec)


# ---------------------------------------------------------------------------------------------
# Groups


RAW, DCP_NAME = "raw tofile/readinto", "DCP, 1 process"


def save_once(s: Suite, name: str, path: str, save: Callable[[str], None], nb: int) -> None:
    """One durable save of one peer; its previous files are removed and the disk synced first,
    untimed (:func:`settle`)."""
    note = "fsync of the file"
    if name == DCP_NAME:
        note = "DCP sync_files=True"
    elif name.startswith("zckpt"):
        note = "save_checkpoint (fsync + rename), new tag"
    s.measure(
        "save",
        name,
        lambda: save(path),
        nb,
        cache="write+fsync",
        peer=None if name == RAW else RAW,
        note=note,
        before=lambda: settle(path),
        reps=1,
    )


def read_files(path: str) -> None:
    """Read every file under ``path`` once (page cache warm)."""
    for d, _, names in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for n in names:
            with open(os.path.join(d, n), "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def loads(s: Suite, name: str, path: str, load: Callable[[str], Any], nb: int) -> None:
    """Warm loads (after one untimed read of the files), then cold loads, of one peer."""
    lnote = "fresh tensors"
    if name == DCP_NAME:
        lnote += ", preallocation timed"
    elif name == "safetensors":
        lnote += ", load_file backend=pread (the default mmap backend reads nothing until use)"
    read_files(path)
    s.measure(
        "warm load",
        name,
        lambda: load(path),
        nb,
        cache="warm (files read just before)",
        peer=None if name == RAW else (DCP_NAME if name.startswith("zckpt") else RAW),
        note=lnote,
    )
    s.measure(
        "cold load",
        name,
        lambda: load(path),
        nb,
        cache="cold (fadvise DONTNEED)",
        peer=None if name == RAW else RAW,
        note=lnote,
        before=lambda: drop_cache(path),
    )


def save_and_load(s: Suite, state: Any, root: str, ws: int) -> dict[str, str]:
    """Durable saves, warm and cold loads of every peer; returns zckpt's kept checkpoints."""
    tensors = leaves(state)
    nb = tensor_bytes(tensors)
    peers: list[Peer] = [
        (
            "raw tofile/readinto",
            "raw.bin",
            lambda p: raw_save(tensors, p),
            lambda p: raw_load(tensors, p),
        ),
        (
            "torch.save/load",
            "torch.pt",
            lambda p: torch_save(state, p),
            lambda p: torch.load(p, weights_only=True, mmap=False),
        ),
        (
            "safetensors",
            "st.safetensors",
            lambda p: st_save(state, p),
            lambda p: safetensors.torch.load_file(p, backend="pread"),
        ),
        ("DCP, 1 process", "dcp", lambda p: dcp_save(state, p), lambda p: dcp_load(state, p)),
    ]
    kept: dict[str, str] = {}
    loaded = {("raw", 1), ("byteplane", 1), ("raw", ws)}  # whole-state loads measured
    for codec in ("raw", "byteplane"):
        for w in sorted({1, ws}):
            name = f"zckpt {codec}, ws {w}"
            rel = f"zckpt-{codec}-ws{w}"

            def save(p: str, w: int = w, c: str = codec) -> None:
                zckpt_save(state, p, w, c)

            def load(p: str) -> Any:
                return zckpt.load_checkpoint(p).state

            peers.append((name, rel, save, load if (codec, w) in loaded else None))
            kept[name] = rel
    # Saves go round-robin (one save of each peer per round), so that the disk's slow spells
    # hit every peer alike; every peer's previous files are removed (untimed) before its save.
    for _ in range(s.reps):
        for name, rel, save_fn, _load in peers:
            save_once(s, name, os.path.join(root, rel), save_fn, nb)
    for name, rel, _save, load_fn in peers:
        path = os.path.join(root, rel)
        if load_fn is not None:
            loads(s, name, path, load_fn, nb)
        if not name.startswith("zckpt"):
            remove(path)
    return {k: os.path.join(root, v) for k, v in kept.items()}


def reshard(s: Suite, state: Any, path: str, ws: int) -> None:
    """Every rank of ws+1 in turn against every rank of ws, from the ws checkpoint (warm)."""
    nb = tensor_bytes(leaves(state))

    def load_all(w: int) -> Callable[[], None]:
        def run() -> None:
            for r in range(w):
                zckpt.load_checkpoint(path, world_size=w, rank=r)

        return run

    zckpt.load_checkpoint(path)  # page cache warm
    same = f"ws {ws} -> {ws}, sum over ranks"
    s.measure("reshard", same, load_all(ws), nb, cache="warm", note="zckpt raw")
    s.measure(
        "reshard",
        f"ws {ws} -> {ws + 1}, sum over ranks",
        load_all(ws + 1),
        nb,
        cache="warm",
        peer=same,
        note="zckpt raw",
    )


def fp32_child(path: str) -> dict[str, float]:
    """In a fresh process: lazy then eager consolidation of ``path``, times and peaks (MiB).

    A fresh process per repetition, because a long-running process reuses memory freed by
    earlier operations, which hides the page faults and the resident growth of new output.
    """
    res: dict[str, float] = {}

    def run(mode: str, fn: Callable[[], Any]) -> Any:
        res[f"{mode}_s"], res[f"{mode}_peak_mib"], out = timed_peak(fn)
        return out

    def lazy() -> None:
        d = zckpt.get_fp32_state_dict_from_zero_checkpoint(path, lazy_mode=True)
        for k in list(d):
            t = d[k].contiguous()
            del t

    run("lazy", lazy)
    out = run("eager", lambda: zckpt.get_fp32_state_dict_from_zero_checkpoint(path))
    tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
    res["out_bytes"] = tensor_bytes(tensors)
    res["largest"] = max(t.numel() * t.element_size() for t in tensors)
    return res


def fp32(s: Suite, path: str) -> None:
    """fp32 consolidation, eager and lazy (one tensor at a time), one fresh process per rep."""
    runs = []
    for _ in range(s.reps):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--fp32-child", path],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out_bytes = int(runs[0]["out_bytes"])
    largest = runs[0]["largest"] / 2**20
    note = "fresh process per rep; zckpt ckpt, ws N raw"
    for mode, name in (("eager", "eager"), ("lazy", "lazy (one at a time)")):
        peak = max(r[f"{mode}_peak_mib"] for r in runs)
        row = Row("fp32", name, "warm", [r[f"{mode}_s"] for r in runs], peak, out_bytes, None, note)
        row.extra = {"peak/output": peak * 2**20 / out_bytes}
        if mode == "lazy":
            row.extra["peak MiB - largest"] = peak - largest
        s.rows.append(row)
        print(f"  {'fp32':>10s} | {name:<44s} {row.median:8.3f} s", file=sys.stderr, flush=True)


def two_processes(s: Suite, root: str, gib: float) -> None:
    """DCP and zckpt with two real gloo processes: durable save, warm and cold load.

    Each peer's two ranks are started once (``bench/_dcp2.py``) and do every repetition
    themselves; a repetition is ``barrier -> op -> barrier`` on every rank, reported as the max
    over ranks, and its peak as the max over ranks of the VmHWM growth.
    """
    deadline = 600 + 120 * gib * s.reps
    note = "2 gloo processes (1 torch thread each), time = max over ranks of barrier-op-barrier"
    per_peer: dict[str, list[dict[str, Any]]] = {}
    for peer, name in (("dcp", DCP2), ("zckpt", ZCKPT2)):
        path = os.path.join(root, f"two-{peer}")
        try:
            per_peer[name] = _dcp2.run_two(peer, path, gib, s.reps, deadline)
        finally:
            remove(path)
    for name, ranks in per_peer.items():
        written = sum(r["written"] for r in ranks)
        loaded = sum(r["loaded"] for r in ranks)
        for op, cache in (
            ("save", "write+fsync"),
            ("warm load", "warm (files just written, read once)"),
            ("cold load", "cold (fadvise DONTNEED)"),
        ):
            times = [max(t) for t in zip(*(r[op]["times"] for r in ranks))]
            peak = max(max(r[op]["peaks"]) for r in ranks)
            if op == "save":
                what = (
                    "save_checkpoint(comm=TorchComm), ZeroSpec(2, 2), each rank its own shard"
                    if name == ZCKPT2
                    else "each rank the tensors of its zckpt shard, rank-distinct keys, "
                    "sync_files=True"
                )
            elif name == ZCKPT2:
                what = (
                    "load_checkpoint(spec, rank=r): the rank's ZeRO-2 holdings (its half of "
                    f"masters and moments, bf16 weights whole): {loaded / written:.2f}x the "
                    "state's bytes over both ranks"
                )
            else:
                what = "each rank its own tensors into fresh ones (allocation timed)"
            s.rows.append(
                Row(
                    op,
                    name,
                    cache,
                    times,
                    peak,
                    written if op == "save" else loaded,
                    DCP2 if name == ZCKPT2 else None,
                    f"{what}; {note}; peak RSS = max over ranks and repetitions (long-lived "
                    "ranks reuse memory freed by earlier operations, so later rows may show less)",
                )
            )
            print(f"  {op:>10s} | {name:<44s} {statistics.median(times):8.3f} s", file=sys.stderr)


def deepspeed_fp32(s: Suite, gib: float, cache: str, skip: str | None) -> list[str]:
    """fp32 consolidation of checkpoints DeepSpeed wrote: its zero_to_fp32 against zckpt.

    Returns the report's lines about the DeepSpeed checkpoints (or why the rows were skipped).
    """
    version, why = (None, skip) if skip else _deepspeed.probe()
    if version is None:
        return [f"DeepSpeed rows skipped: {why}."]
    lines: list[str] = []
    made = _deepspeed.checkpoints(cache, _deepspeed.KINDS, gib, version)
    for kind, (final, info) in made.items():
        lines += deepspeed_checkpoint_fp32(s, kind, final, info, version)
    lines.append(
        "fp32 DS peak RSS: VmHWM growth, which includes the checkpoint's file pages that "
        "torch.load(mmap=True) maps and touches (both readers use it); 'sampled anon' and "
        "'sampled file-mapped' are the highest RssAnon / RssFile growth seen every 2 ms; "
        "'minor faults' counts the page faults of the timed call (a mapped file page touched "
        "costs one)."
    )
    return lines


def deepspeed_checkpoint_fp32(
    s: Suite, kind: str, final: str, info: dict[str, Any], version: str
) -> list[str]:
    """The rows of the DeepSpeed checkpoint ``kind`` in ``final``; the report's lines on it."""
    group, label = DS_GROUPS[kind], _deepspeed.LABELS[kind]
    path = _deepspeed.ckpt_path(final)
    nfiles = sum(len(ns) for _, _, ns in os.walk(path))
    together = info.get("generated_with", [kind])
    run = (
        f"{info['generation_s']:.1f} s"
        if len(together) < 2
        else f"{info['generation_s']:.1f} s (one DeepSpeed run for {' and '.join(together)})"
    )
    gen = (
        f"generated by this run in {run}"
        if not info["cached"]
        else f"reused from the cache (its generation took {run})"
    )
    lines = [
        f"DeepSpeed checkpoint {label}: written by DeepSpeed {version} itself "
        f"(engine.save_checkpoint; {_deepspeed.describe(kind, info)}; torch AdamW, 2 gloo "
        f"processes on CPU, one training step): {info['params']:,} params in "
        f"{_deepspeed.n_tensors(kind)} tensors, {info['bytes'] / 1e9:.3f} GB "
        f"({info['bytes'] / 2**30:.3f} GiB) in {nfiles} files; {gen}, not part of any ratio; "
        f"{final}.",
    ]
    read_files(path)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in ("deepspeed", "zckpt", "lazy")}
    hashes: dict[str, dict[str, str]] = {}
    for rep in range(s.reps):
        for mode in runs:  # round-robin, so that the page cache and the disk treat all alike
            r = _deepspeed.run_child(mode, path, hash_out=rep == 0 and mode != "lazy")
            if "hashes" in r:
                hashes[mode] = r.pop("hashes")
            runs[mode].append(r)
            print(f"  {group:>10s} | {mode:<44s} {r['s']:8.3f} s", file=sys.stderr, flush=True)
    ds, zk = hashes["deepspeed"], hashes["zckpt"]
    bad = sorted(k for k in ds.keys() | zk.keys() if ds.get(k) != zk.get(k))
    s.ds_bitwise[kind] = not bad
    if bad:
        lines.append(
            f"Bitwise check of {label} FAILED: zckpt and zero_to_fp32 differ on {len(bad)} keys: "
            f"{bad[:5]}"
        )
    else:
        lines.append(
            f"Bitwise check of {label} passed: zckpt's eager output equals zero_to_fp32's for "
            f"all {len(ds)} keys (dtype, shape, xxh3 of the bytes; first repetition, after the "
            "timing)."
        )
    if any(r["imported_deepspeed"] for r in runs["zckpt"] + runs["lazy"]):
        lines.append("WARNING: zckpt's child imported deepspeed.")
    out_bytes = int(runs["deepspeed"][0]["out_bytes"])
    largest = runs["zckpt"][0]["largest"] / 2**20
    base = "fresh process per rep (imports before the baseline); warm (files read before)"
    phases, short = ds_phases(runs["deepspeed"], 3 if kind == "z3" else 2)
    lines.append(f"Where zero_to_fp32's time goes on {label} (medians): {phases}.")
    for mode, name, peer, note in (
        (
            "deepspeed",
            DS_ROW,
            None,
            "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint; " + short,
        ),
        ("zckpt", DS_EAGER, DS_ROW, "zckpt.get_fp32_state_dict_from_zero_checkpoint"),
        ("lazy", DS_LAZY, DS_ROW, "lazy_mode=True, each tensor materialised then dropped"),
    ):
        rs = runs[mode]
        peak = max(r["peak_mib"] for r in rs)
        row = Row(group, name, "warm", [r["s"] for r in rs], peak, out_bytes, peer, note)
        row.note += f"; {base}; minor faults {statistics.median(r['minflt'] for r in rs):.0f}"
        row.extra = {"peak/output": peak * 2**20 / out_bytes}
        if mode == "lazy":
            row.extra["peak MiB - largest"] = peak - largest
        # VmHWM counts the checkpoint's file pages that torch.load(mmap=True) maps and touches
        # (page cache, reclaimable); sampled RssAnon / RssFile growth tells them apart.
        row.extra["sampled anon MiB"] = max(r["anon_peak_mib"] for r in rs)
        row.extra["sampled file-mapped MiB"] = max(r["file_peak_mib"] for r in rs)
        s.rows.append(row)
    return lines


def ds_phases(runs: list[dict[str, Any]], stage: int) -> tuple[str, str]:
    """zero_to_fp32's time split into its phases (medians over repetitions): in words, and
    in short for the row's note."""
    if stage == 3:
        tensors = "a torch.cat of each tensor's partitions, read through the mapping"
        rest = "building the dict of lazy GatheredTensors"
    else:
        tensors = "a no-op: the tensors are built already"
        rest = "concatenating each group's partitions, slicing them into params"
    what = {
        "parse_model_states": "model-state files (torch.load)",
        "parse_optim_states": "optimizer-state files (torch.load mmap=True)",
        "to_torch_tensor": f"to_torch_tensor ({tensors})",
    }
    parts, short = [], []
    for key, words in what.items():
        sec = statistics.median(r["phases"].get(key, [0.0, 0])[0] for r in runs)
        flt = statistics.median(r["phases"].get(key, [0.0, 0])[1] for r in runs)
        parts.append(f"{words} {sec:.3f} s, {flt:.0f} minor faults")
        short.append(f"{key} {sec:.3f} s")
    left = statistics.median(r["s"] - sum(v[0] for v in r["phases"].values()) for r in runs)
    parts.append(f"the rest ({rest}) {left:.3f} s")
    short.append(f"rest {left:.3f} s")
    return "; ".join(parts), "of which " + ", ".join(short)


def async_save(s: Suite, state: Any, root: str) -> None:
    """Training blocked by an async save (staging memory warm) vs a synchronous save."""
    path = os.path.join(root, "async")
    nb = tensor_bytes(leaves(state))
    spec = zckpt.ZeroSpec(1, 2)
    saver = zckpt.AsyncSaver()
    try:
        zckpt.save_checkpoint(path, state, spec, tag="first", async_=saver, keep_last=1).wait()
        n = [0]

        def tag() -> str:
            n[0] += 1
            return f"t{n[0]}"

        sync = s.measure(
            "async",
            "sync save",
            lambda: zckpt.save_checkpoint(path, state, spec, tag=tag(), keep_last=1),
            nb,
            cache="write+fsync",
            note="raw, ws 1",
        )
        pending: list[Any] = []

        def blocked() -> None:
            pending.append(
                zckpt.save_checkpoint(path, state, spec, tag=tag(), async_=saver, keep_last=1)
            )

        def settle() -> None:
            while pending:
                pending.pop().wait()

        s.measure(
            "async",
            "async save, blocked",
            blocked,
            nb,
            cache="write+fsync",
            peer=sync.name,
            note="staging memory reused",
            before=settle,
        )
        settle()
    finally:
        saver.close()
        remove(path)


def compression(s: Suite, state: Any) -> None:
    """Ratio and GB/s per core (threads=1) of zstd and byteplane per dtype, encode and decode."""
    first = next(iter(state["master"]))
    samples = {
        "fp32 master": state["master"][first],
        "bf16 weight": state["module"][first],
        "fp32 exp_avg": state["optimizer"]["state"][first]["exp_avg"],
        "fp32 exp_avg_sq": state["optimizer"]["state"][first]["exp_avg_sq"],
    }
    for label, t in samples.items():
        one = {"w": t}
        shard = zckpt.shard_state(one, zckpt.plan_shards(one, zckpt.ZeroSpec(1, 1)), 0)
        nb = t.numel() * t.element_size()
        for codec in ("zstd", "byteplane"):
            parts: list[Any] = []

            def encode(sh: Any = shard, c: str = codec, out: list[Any] = parts) -> None:
                out.append(zckpt.encode_shard_parts(sh, codec=c, threads=1))

            enc = s.measure(
                "compress",
                f"{label}, {codec} encode",
                encode,
                nb,
                cache="memory",
                note="threads=1",
                before=parts.clear,
            )
            blob = b"".join(bytes(b) for b in parts[-1].buffers)
            enc.extra = {"ratio": nb / len(blob)}

            def decode(b: bytes = blob) -> Any:
                return zckpt.decode_shard(b, threads=1)

            dec = s.measure(
                "compress",
                f"{label}, {codec} decode",
                decode,
                nb,
                cache="memory",
                note="threads=1",
            )
            dec.extra = {"ratio": nb / len(blob)}


RESUME_LABELS = {
    "raw": "raw readinto into the live tensors (the limit)",
    "zckpt": "zckpt Checkpointer.load_checkpoint",
    "zckpt-into": "zckpt load_checkpoint(into=training_state)",
    "dcp": "DCP dcp.load in place + load_state_dict",
    "torch": "torch.load + load_state_dict",
}


def resume_name(peer: str, ws: int) -> str:
    """The row name of a resume peer at ``ws`` processes."""
    return f"{RESUME_LABELS[peer]}, {ws} process{'es' if ws > 1 else ''}"


def resume(s: Suite, root: str, gib: float) -> None:
    """Resume into a live model and AdamW (``bench/_resume.py``): one process, then two gloo
    processes, warm and cold; the processes run every peer, round-robin."""
    deadline = 900 + 300 * gib * s.reps
    for ws in (1, 2):
        path = os.path.join(root, f"resume-ws{ws}")
        try:
            ranks = _resume.run(_resume.PEERS, path, gib, s.reps, ws, deadline)
        finally:
            remove(path)
        for peer in _resume.PEERS:
            what = {
                "raw": "one file of every tensor's bytes, readinto each live tensor",
                "zckpt": "Checkpointer(model, AdamW).load_checkpoint(dir)",
                "zckpt-into": "load_checkpoint(dir, into=training_state(model, opt)) + "
                "load_optimizer_state (param groups)",
                "dcp": "dcp.load({model: model.state_dict(), optim: opt.state_dict()}), then "
                "model/opt.load_state_dict",
                "torch": "torch.load(weights_only=True), then model/opt.load_state_dict",
            }[peer]
            files = ranks[0]["files_bytes"][peer]
            note = (
                f"{what}; fp32 model + AdamW state; {files / 2**30:.3f} GiB on disk; peers "
                "round-robin in one process; every live tensor zeroed before each rep and "
                "checked after"
            )
            if ws > 1:
                note += (
                    "; 2 gloo processes, each resumes the whole state (data parallel), time = "
                    "max over ranks of barrier-op-barrier, peak = max over ranks"
                )
            for op, cache in (
                ("warm", "warm (files read before)"),
                ("cold", "cold (fadvise DONTNEED)"),
            ):
                times = [max(t) for t in zip(*(r[peer][op]["times"] for r in ranks))]
                peak = max(max(r[peer][op]["peaks"]) for r in ranks)
                name = resume_name(peer, ws)
                s.rows.append(
                    Row(
                        f"resume {op}",
                        name,
                        cache,
                        times,
                        peak,
                        ranks[0]["bytes"],
                        None if peer == "raw" else resume_name("raw", ws),
                        note,
                    )
                )
                print(
                    f"  {'resume ' + op:>10s} | {name:<44s} {statistics.median(times):8.3f} s",
                    file=sys.stderr,
                    flush=True,
                )


def find_tmpfs(wanted: str) -> tuple[str | None, str, Callable[[], None]]:
    """A memory-backed directory: ``wanted`` when it is a tmpfs/ramfs mount point or inside
    one, else a tmpfs this process mounts (as root). Returns (directory or None, how it was
    found or why none, cleanup)."""
    best, kind = "", ""
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1]
            inside = wanted == mnt or wanted.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    if best and kind in ("tmpfs", "ramfs") and os.path.isdir(wanted):
        return wanted, f"{wanted} ({kind})", lambda: None
    if os.geteuid() == 0:
        mnt = tempfile.mkdtemp(prefix="zckpt-suite-tmpfs-")
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8g", "tmpfs", mnt],
            capture_output=True,
            text=True,
            check=False,
        )
        if p.returncode == 0:

            def cleanup() -> None:
                subprocess.run(["umount", mnt], check=False)
                os.rmdir(mnt)

            return mnt, f"{mnt} (a tmpfs mounted by the suite)", cleanup
        os.rmdir(mnt)
        return None, f"{wanted} is {kind or 'not a mount'}, mount -t tmpfs failed", lambda: None
    return None, f"{wanted} is {kind or 'not a mount'}, and not root to mount one", lambda: None


TMPFS_RAW, TMPFS_RAW_INTO = "raw tofile", "raw readinto into existing tensors"


def tmpfs(s: Suite, state: Any, where: str) -> list[str]:
    """Save and load on a memory-backed filesystem: zckpt's own overhead without the disk."""
    found, how, cleanup = find_tmpfs(where)
    if found is None:
        return [f"tmpfs rows skipped: {how}."]
    root = tempfile.mkdtemp(prefix="zckpt-suite-tmpfs-", dir=found)
    try:
        tensors = leaves(state)
        nb = tensor_bytes(tensors)
        raw_p, zk_p = os.path.join(root, "raw.bin"), os.path.join(root, "zckpt")
        for _ in range(s.reps):  # round-robin
            s.measure(
                "tmpfs save",
                TMPFS_RAW,
                lambda: raw_save(tensors, raw_p),
                nb,
                cache="tmpfs",
                note="numpy.tofile + fsync",
                before=lambda: remove(raw_p),
                reps=1,
            )
            s.measure(
                "tmpfs save",
                "zckpt raw, ws 1",
                lambda: zckpt_save(state, zk_p, 1, "raw"),
                nb,
                cache="tmpfs",
                peer=TMPFS_RAW,
                note="save_checkpoint (fsync + rename), new tag",
                before=lambda: remove(zk_p),
                reps=1,
            )
        dest = empty_like_tree(state)
        live = leaves(dest)
        for t in live:
            t.zero_()  # touched: existing memory, as a resume has
        for _ in range(s.reps):
            s.measure(
                "tmpfs load",
                TMPFS_RAW_INTO,
                lambda: raw_read_into(live, raw_p),
                nb,
                cache="tmpfs",
                note="readinto each tensor",
                reps=1,
            )
            s.measure(
                "tmpfs load",
                "zckpt load_checkpoint(into=)",
                lambda: zckpt.load_checkpoint(zk_p, into=dest),
                nb,
                cache="tmpfs",
                peer=TMPFS_RAW_INTO,
                note="into= the same existing tensors",
                reps=1,
            )
        same = all(torch.equal(a, b) for a, b in zip(live, tensors))
        if not same:
            raise RuntimeError("tmpfs: load_checkpoint(into=) did not restore the state")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        cleanup()
    return [f"tmpfs rows: on {how}; round-robin, one save or load of each peer per round."]


EXPORT_DS, EXPORT_ZK, EXPORT_LAZY = _export.PEERS
EXPORT_GROUPS = {k: f"export DS {label}" for k, label in _deepspeed.LABELS.items()}


def export(s: Suite, gib: float, cache: str, root: str, skip: str | None) -> list[str]:
    """zckpt consolidate against DeepSpeed's zero_to_fp32.py, as new processes, end to end
    (``bench/_export.py``), on both DeepSpeed-written checkpoints."""
    version, why = (None, skip) if skip else _deepspeed.probe()
    if version is None:
        return [f"Export rows skipped: {why}."]
    made = _deepspeed.checkpoints(cache, _deepspeed.KINDS, gib, version)
    base = _export.import_torch_rss()
    lines = [
        "Export: each command a new process, timed from start to a durable output (zero_to_fp32"
        ".py's files and directory are fsynced after it exits, inside its time; zckpt fsyncs "
        "its own); peak RSS = the process's VmHWM polled every 5 ms, imports included (a "
        f"process that only imports torch peaks at {base:.0f} MiB here)."
    ]
    for kind, (final, _info) in made.items():
        group, label = EXPORT_GROUPS[kind], _deepspeed.LABELS[kind]
        path = _deepspeed.ckpt_path(final)
        read_files(path)
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in _export.PEERS}
        outs = {p: os.path.join(root, f"export-{kind}-{i}") for i, p in enumerate(_export.PEERS)}
        try:
            for _ in range(s.reps):
                for peer in _export.PEERS:  # round-robin
                    r = _export.run_once(peer, path, outs[peer])
                    runs[peer].append(r)
                    print(f"  {group:>10s} | {peer:<44s} {r['s']:8.3f} s", file=sys.stderr)
            hashes = {p: _export.output_hashes(outs[p]) for p in _export.PEERS}
        finally:
            for o in outs.values():
                remove(o)
        ds = hashes[EXPORT_DS]
        for peer in (EXPORT_ZK, EXPORT_LAZY):
            got = hashes[peer]
            bad = sorted(k for k in ds.keys() | got.keys() if ds.get(k) != got.get(k))
            s.export_equal[(kind, peer)] = not bad and bool(ds)
            lines.append(
                f"Export check of {label}, {peer}: "
                + (
                    f"loads with safetensors.torch.load_file and equals zero_to_fp32.py's output "
                    f"for all {len(ds)} tensors (dtype, shape, xxh3)."
                    if not bad and ds
                    else f"FAILED on {len(bad)} tensors: {bad[:5]}"
                )
            )
        for peer in _export.PEERS:
            rs = runs[peer]
            rss = max(r["rss_mib"] for r in rs)
            row = Row(
                group,
                peer,
                "warm (checkpoint files read before)",
                [r["s"] for r in rs],
                rss,
                rs[0]["bytes"],
                None if peer == EXPORT_DS else EXPORT_DS,
                f"new process, end to end to a durable output; files {', '.join(rs[0]['files'])}; "
                "peak RSS = the process's VmHWM, polled (imports included)",
            )
            row.extra = {"peak RSS MiB": rss}
            s.rows.append(row)
    return lines


# ---------------------------------------------------------------------------------------------
# Report


def gbs(nbytes: int, t: float) -> float:
    """GB/s (1e9 bytes per second)."""
    return nbytes / t / 1e9


def table(s: Suite) -> list[str]:
    """The markdown table of every row."""
    lines = [
        "| group | operation | page cache | s median (min-max) | GB/s median | peak RSS MiB | "
        "vs peer | peer | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order: dict[str, int] = {}
    for r in s.rows:
        order.setdefault(r.group, len(order))
    names = {(r.group, r.name) for r in s.rows}
    # Rows of a group together, in the order they were measured.
    for r in sorted(s.rows, key=lambda r: order[r.group]):
        ratio, peer = "", ""
        if r.peer and (r.group, r.peer) in names:
            p = s.find(r.group, r.peer)
            # Ratio of speeds: > 1 means faster than the peer (same bytes in both rows).
            ratio = f"{(p.median / p.nbytes) / (r.median / r.nbytes):.2f}x"
            peer = r.peer
        extra = "; ".join(f"{k} {v:.3f}" for k, v in r.extra.items())
        notes = "; ".join(x for x in (r.note, extra) if x)
        lines.append(
            f"| {r.group} | {r.name} | {r.cache} | {r.median:.3f} ({min(r.times):.3f}-"
            f"{max(r.times):.3f}) | {gbs(r.nbytes, r.median):.2f} | {r.peak_mib:.0f} | {ratio} | "
            f"{peer} | {notes} |"
        )
    return lines


def targets(s: Suite, ws: int, ds_skipped: str | None) -> list[str]:
    """Issue 6's targets, as measured in this run ("not run" for groups left out)."""

    def speed_ratio(g1: str, n1: str, g2: str, n2: str) -> float:
        a, b = s.find(g1, n1), s.find(g2, n2)
        return (b.median / b.nbytes) / (a.median / a.nbytes)

    def extra(group: str, name: str, key: str) -> float:
        return s.find(group, name).extra[key]

    def at_least(goal: float) -> Callable[[float], bool]:
        return lambda v: v >= goal

    def at_most(goal: float) -> Callable[[float], bool]:
        return lambda v: v <= goal

    def bf16_encode() -> float:
        return s.find("compress", "bf16 weight, byteplane encode").extra["ratio"]

    def bf16_gbs() -> float:
        r = s.find("compress", "bf16 weight, byteplane encode")
        return gbs(r.nbytes, r.median)

    raw, dcp_ = "raw tofile/readinto", "DCP, 1 process"
    same, other = f"ws {ws} -> {ws}, sum over ranks", f"ws {ws} -> {ws + 1}, sum over ranks"
    # (target, how to measure it, its goal in words, whether a value meets it, format)
    rows: list[tuple[str, Callable[[], float], str, Callable[[float], bool], str]] = [
        (
            "durable save raw ws 1 / raw tofile+fsync",
            lambda: speed_ratio("save", "zckpt raw, ws 1", "save", raw),
            ">= 0.9",
            at_least(0.9),
            ".2f",
        ),
        (
            f"durable save raw ws {ws} / raw tofile+fsync",
            lambda: speed_ratio("save", f"zckpt raw, ws {ws}", "save", raw),
            ">= 0.9",
            at_least(0.9),
            ".2f",
        ),
        (
            "durable save raw ws 1 / DCP",
            lambda: speed_ratio("save", "zckpt raw, ws 1", "save", dcp_),
            ">= 1.15",
            at_least(1.15),
            ".2f",
        ),
        (
            "warm load raw ws 1 / DCP",
            lambda: speed_ratio("warm load", "zckpt raw, ws 1", "warm load", dcp_),
            ">= 2.0",
            at_least(2.0),
            ".2f",
        ),
        (
            "durable save, 2 processes: zckpt / DCP (the 1-process goal)",
            lambda: speed_ratio("save", ZCKPT2, "save", DCP2),
            ">= 1.15",
            at_least(1.15),
            ".2f",
        ),
        (
            "warm load, 2 processes: zckpt / DCP, per byte (the 1-process goal)",
            lambda: speed_ratio("warm load", ZCKPT2, "warm load", DCP2),
            ">= 2.0",
            at_least(2.0),
            ".2f",
        ),
        (
            "cold load raw ws 1 / raw readinto",
            lambda: speed_ratio("cold load", "zckpt raw, ws 1", "cold load", raw),
            ">= 0.9",
            at_least(0.9),
            ".2f",
        ),
        (
            "cold load byteplane ws 1 / raw readinto",
            lambda: speed_ratio("cold load", "zckpt byteplane, ws 1", "cold load", raw),
            ">= 0.9",
            at_least(0.9),
            ".2f",
        ),
        (
            f"load ws {ws}->{ws + 1} / same-size",
            lambda: speed_ratio("reshard", other, "reshard", same),
            ">= 0.8",
            at_least(0.8),
            ".2f",
        ),
        (
            "fp32 eager peak RSS / output",
            lambda: s.find("fp32", "eager").extra["peak/output"],
            "<= 1.1",
            at_most(1.1),
            ".2f",
        ),
        (
            "fp32 lazy peak - largest tensor (MiB)",
            lambda: s.find("fp32", "lazy (one at a time)").extra["peak MiB - largest"],
            "<= 256",
            at_most(256),
            ".0f",
        ),
        (
            "bf16 weight byteplane ratio",
            bf16_encode,
            ">= 1.45",
            at_least(1.45),
            ".3f",
        ),
        ("bf16 weight byteplane encode GB/s per core", bf16_gbs, ">= 1", at_least(1.0), ".2f"),
        (
            "fp32 master byteplane ratio",
            lambda: s.find("compress", "fp32 master, byteplane encode").extra["ratio"],
            ">= 1.18",
            at_least(1.18),
            ".3f",
        ),
        (
            "async blocked / sync save",
            lambda: (
                s.find("async", "async save, blocked").median / s.find("async", "sync save").median
            ),
            "<= 0.15",
            at_most(0.15),
            ".3f",
        ),
    ]
    for kind, group in DS_GROUPS.items():
        label = _deepspeed.LABELS[kind]
        rows += [
            (
                f"fp32 consolidation of DeepSpeed {label}: zckpt / zero_to_fp32 speed",
                functools.partial(speed_ratio, group, DS_EAGER, group, DS_ROW),
                ">= 2 (issue 14; was 5)",
                at_least(2.0),
                ".2f",
            ),
            (
                f"DeepSpeed {label}: zckpt eager peak RSS / output size",
                functools.partial(extra, group, DS_EAGER, "peak/output"),
                "<= 1.1",
                at_most(1.1),
                ".2f",
            ),
            (
                f"DeepSpeed {label}: zckpt lazy peak - largest tensor (MiB)",
                functools.partial(extra, group, DS_LAZY, "peak MiB - largest"),
                "<= 256",
                at_most(256),
                ".0f",
            ),
        ]
    lines = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    for name, measure, goal, ok, fmt in rows:
        try:
            v = measure()
        except KeyError:
            why = ds_skipped if "DeepSpeed" in name and ds_skipped else "group not run"
            lines.append(f"| {name} | not measured | {goal} | skipped: {why} |")
            continue
        lines.append(f"| {name} | {v:{fmt}} | {goal} | {'met' if ok(v) else 'missed'} |")
    for kind, label in _deepspeed.LABELS.items():
        name = f"DeepSpeed {label}: zckpt fp32 bitwise equal to zero_to_fp32"
        if kind in s.ds_bitwise:
            same = s.ds_bitwise[kind]
            lines.append(
                f"| {name} | {'yes' if same else 'NO'} | yes | {'met' if same else 'missed'} |"
            )
        else:
            why = ds_skipped or "group not run"
            lines.append(f"| {name} | not measured | yes | skipped: {why} |")
    return lines


def cli(s: Suite, root: str) -> None:
    """Command line start-up: one row per command, new processes (``bench_cli.measure``)."""
    # At least 5 processes per row for a median, except when one repetition is asked for (the
    # smoke run: it checks that every row is measured, and 5 rounds of torch imports cost a minute).
    for m in bench_cli.measure(1 if s.reps == 1 else max(5, s.reps), root):
        heavy = "" if m.imported is None else f"imports {', '.join(m.imported) or 'no torch/Numba'}"
        row = Row("cli", m.name, "warm", m.times, 0.0, 0, note=heavy)
        row.extra["CPU s"] = statistics.median(m.cpu)
        s.rows.append(row)
        print(f"  {'cli':>10s} | {m.name:<44s} {m.median:8.3f} s", file=sys.stderr, flush=True)


def targets14(s: Suite, skipped: dict[str, str]) -> list[str]:
    """Issue 14's targets, as measured in this run ("not measured" for groups left out;
    ``skipped`` says why per group)."""

    def ratio(g1: str, n1: str, g2: str, n2: str) -> float:
        a, b = s.find(g1, n1), s.find(g2, n2)
        return (b.median / b.nbytes) / (a.median / a.nbytes)

    rows: list[tuple[str, str, Callable[[], float], str, Callable[[float], bool], str]] = []
    for ws in (1, 2):
        procs = f"{ws} process{'es' if ws > 1 else ''}"
        limit = resume_name("raw", ws)
        for peer in ("zckpt", "zckpt-into"):
            me = resume_name(peer, ws)
            who = RESUME_LABELS[peer].removeprefix("zckpt ")
            rows += [
                (
                    "resume",
                    f"resume warm, {procs}: {who} / readinto into live tensors",
                    functools.partial(ratio, "resume warm", me, "resume warm", limit),
                    ">= 0.8",
                    lambda v: v >= 0.8,
                    ".2f",
                ),
                (
                    "resume",
                    f"resume warm, {procs}: {who} / DCP in place",
                    functools.partial(
                        ratio, "resume warm", me, "resume warm", resume_name("dcp", ws)
                    ),
                    ">= 3",
                    lambda v: v >= 3.0,
                    ".2f",
                ),
                (
                    "resume",
                    f"resume cold, {procs}: {who} / raw cold reads",
                    functools.partial(ratio, "resume cold", me, "resume cold", limit),
                    ">= 0.9",
                    lambda v: v >= 0.9,
                    ".2f",
                ),
            ]
    for kind, group in EXPORT_GROUPS.items():
        label = _deepspeed.LABELS[kind]
        for peer in (EXPORT_ZK, EXPORT_LAZY):

            def rss(g: str = group, p: str = peer) -> float:
                return s.find(g, p).peak_mib / s.find(g, EXPORT_DS).peak_mib

            rows += [
                (
                    "export",
                    f"export DeepSpeed {label}: {peer} / zero_to_fp32.py, end to end speed",
                    functools.partial(ratio, group, peer, group, EXPORT_DS),
                    ">= 2",
                    lambda v: v >= 2.0,
                    ".2f",
                ),
                (
                    "export",
                    f"export DeepSpeed {label}: {peer} peak RSS / zero_to_fp32.py's",
                    rss,
                    "<= 0.3",
                    lambda v: v <= 0.3,
                    ".2f",
                ),
            ]
    rows += [
        (
            "tmpfs",
            "tmpfs: durable save raw ws 1 / raw tofile",
            lambda: ratio("tmpfs save", "zckpt raw, ws 1", "tmpfs save", TMPFS_RAW),
            ">= 0.9",
            lambda v: v >= 0.9,
            ".2f",
        ),
        (
            "tmpfs",
            "tmpfs: load into existing tensors / readinto",
            lambda: ratio(
                "tmpfs load", "zckpt load_checkpoint(into=)", "tmpfs load", TMPFS_RAW_INTO
            ),
            ">= 0.9",
            lambda v: v >= 0.9,
            ".2f",
        ),
    ]

    def median(name: str) -> float:
        return s.find("cli", name).median

    def within(seconds: float, v: float) -> bool:
        return v <= seconds

    for command, seconds in bench_cli.ROWS:
        if seconds is not None:
            rows.append(
                (
                    "cli",
                    f"{command}: new process, median s",
                    functools.partial(median, command),
                    f"<= {seconds}",
                    functools.partial(within, seconds),
                    ".3f",
                )
            )

    lines = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    commands = [r for r in s.rows if r.group == "cli" and r.note]  # the zckpt commands
    if commands:
        light = all(r.note.endswith("no torch/Numba") for r in commands)
        lines.append(
            "| zckpt --help, --version, inspect, verify, prune: torch and Numba never imported | "
            f"{'yes' if light else 'NO'} | yes | {'met' if light else 'missed'} |"
        )
    for group, name, measure, goal, ok, fmt in rows:
        try:
            v = measure()
        except KeyError:
            lines.append(f"| {name} | not measured | {goal} | skipped: {skipped[group]} |")
            continue
        lines.append(f"| {name} | {v:{fmt}} | {goal} | {'met' if ok(v) else 'missed'} |")
    for kind, label in _deepspeed.LABELS.items():
        for peer in (EXPORT_ZK, EXPORT_LAZY):
            name = f"export DeepSpeed {label}: {peer} output loadable, equal to zero_to_fp32.py's"
            if (kind, peer) in s.export_equal:
                ok = s.export_equal[(kind, peer)]
                lines.append(
                    f"| {name} | {'yes' if ok else 'NO'} | yes | {'met' if ok else 'missed'} |"
                )
            else:
                lines.append(f"| {name} | not measured | yes | skipped: {skipped['export']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse options, run every group, print (and optionally write) the report."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gib", type=float, default=1.0, help="state size in GiB (default 1.0)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per operation (default 3)")
    ap.add_argument("--world-size", type=int, default=2, help="sharded world size N (default 2)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--dir", default=None, help="parent of the temporary checkpoint directory")
    ap.add_argument("--smoke", action="store_true", help="tiny state (8 MiB), 1 repetition")
    ap.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated groups to run, of: {','.join(GROUPS)} (default: all)",
    )
    ap.add_argument(
        "--no-deepspeed", action="store_true", help="skip the DeepSpeed group (it is slow)"
    )
    ap.add_argument(
        "--ds-cache",
        default=os.path.join(os.path.expanduser("~"), ".cache", "zckpt-bench"),
        help="where generated DeepSpeed checkpoints are kept between runs "
        "(default ~/.cache/zckpt-bench)",
    )
    ap.add_argument(
        "--tmpfs-dir",
        default="/dev/shm",
        help="memory-backed directory of the tmpfs group (default /dev/shm; when it is not a "
        "tmpfs and this is root, the suite mounts one)",
    )
    ap.add_argument("--fp32-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    if groups - set(GROUPS):
        ap.error(f"unknown groups {sorted(groups - set(GROUPS))}; known: {', '.join(GROUPS)}")
    if args.fp32_child:
        print(json.dumps(fp32_child(args.fp32_child)))
        return 0
    # SIGTERM unwinds like an exception, so the temporary checkpoints are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.smoke:
        args.gib, args.reps = 1 / 128, 1
    cmd = "python bench/suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()

    state = training_state(args.gib)
    tensors = leaves(state)
    nb = tensor_bytes(tensors)
    # Compile or load the cached Numba kernels, outside every timing.
    warm_shard = zckpt.shard_state(state, zckpt.plan_shards(state, zckpt.ZeroSpec(1, 1)), 0)
    del warm_shard
    one = {"w": tensors[0][:4096]}
    zckpt.decode_shard(
        zckpt.encode_shard(
            zckpt.shard_state(one, zckpt.plan_shards(one, zckpt.ZeroSpec(1, 1)), 0),
            codec="byteplane",
        )
    )

    ds_skipped = None
    if "deepspeed" not in groups:
        ds_skipped = "not in --only"
    elif args.no_deepspeed:
        ds_skipped = "--no-deepspeed"
    root = tempfile.mkdtemp(prefix="zckpt-suite-", dir=args.dir)
    s = Suite(args.reps)
    try:
        head = machine(root)
        ws_name = f"zckpt raw, ws {args.world_size}"
        kept: dict[str, str] = {}
        if "io" in groups:
            kept = save_and_load(s, state, root, args.world_size)
        elif groups & {"reshard", "fp32"}:  # their input, saved untimed
            kept = {ws_name: os.path.join(root, "zckpt-raw-ws")}
            zckpt_save(state, kept[ws_name], args.world_size, "raw")
        if "dcp2" in groups:
            two_processes(s, root, args.gib)
        if "reshard" in groups:
            reshard(s, state, kept[ws_name], args.world_size)
        if "fp32" in groups:
            fp32(s, kept[ws_name])
        for p in kept.values():
            remove(p)
        if "deepspeed" in groups:
            ds_lines = deepspeed_fp32(s, args.gib, args.ds_cache, ds_skipped)
        else:
            ds_lines = [f"DeepSpeed rows skipped: {ds_skipped}."]
        if ds_lines[0].startswith("DeepSpeed rows skipped"):
            ds_skipped = ds_lines[0].removeprefix("DeepSpeed rows skipped: ").rstrip(".")
            print(ds_lines[0], file=sys.stderr, flush=True)
        if "async" in groups:
            async_save(s, state, root)
        if "compress" in groups:
            compression(s, state)
        skipped14 = {g: "group not run" for g in ("resume", "tmpfs", "export", "cli")}
        if "resume" in groups:
            resume(s, root, args.gib)
        if "tmpfs" in groups:
            more = tmpfs(s, state, args.tmpfs_dir)
            ds_lines += more
            if more[0].startswith("tmpfs rows skipped"):
                skipped14["tmpfs"] = more[0].removeprefix("tmpfs rows skipped: ").rstrip(".")
        if "export" in groups:
            why = "--no-deepspeed" if args.no_deepspeed else None
            more = export(s, args.gib, args.ds_cache, root, why)
            ds_lines += more
            if more[0].startswith("Export rows skipped"):
                skipped14["export"] = more[0].removeprefix("Export rows skipped: ").rstrip(".")
                print(more[0], file=sys.stderr, flush=True)
        if "cli" in groups:
            cli(s, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lines = [
        f"Command: `{cmd.strip()}`",
        f"Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"suite wall time {time.perf_counter() - started:.0f} s",
        *head,
        f"State: {nb / 2**30:.3f} GiB of tensor bytes, {len(tensors)} tensors (bf16 weights, fp32 "
        f"masters, Adam moments); world size N = {args.world_size}; {args.reps} repetitions; "
        "medians (min-max).",
        "GB/s = tensor bytes / time (1e9); peak RSS = VmHWM growth during the operation; "
        "vs peer = speed / peer's speed (> 1 is faster).",
        "Page cache: 'warm' = the files were just written or read; 'cold' = "
        "posix_fadvise(DONTNEED) on every file of the checkpoint before each repetition (drops "
        "clean pages only; every writer fsynced, so all its pages were clean). On a VM the host "
        "may still cache the disk.",
        "Saves: the one-process peers take turns, one save each per round; before each timed "
        "save the peer's previous files are removed and os.sync() runs (untimed), so no earlier "
        "write-back or deletion is in flight when the clock starts.",
        f"Groups run: {', '.join(g for g in GROUPS if g in groups)}.",
        *ds_lines,
        "",
        *table(s),
        "",
        "Targets (issue 6):",
        "",
        *targets(s, args.world_size, ds_skipped),
        "",
        "Targets (issue 14):",
        "",
        *targets14(s, skipped14),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
