"""Two real processes joined by gloo: PyTorch DCP against zckpt, the same bytes per rank.

Run as a script, this file is one rank (``spawn_ranks`` starts them). Every rank builds the
suite's training state itself (``_common.training_state``, seeded, so both ranks and the parent
hold the same tensors), then does every repetition of every operation in this one process, so
process start-up, ``import torch`` and building the state are never timed.

* zckpt: ``save_checkpoint(dir, state, ZeroSpec(2, 2), comm=TorchComm())``; each rank holds the
  full state and writes only its own shard. Loads: ``load_checkpoint(dir, spec, rank=r)``, what
  rank r holds under ZeRO-2 at world size 2: half of every partitioned tensor (fp32 masters, Adam
  moments) and the replicated bf16 weights whole.
* DCP: each rank saves a state dict of exactly the tensors of the zckpt shard it writes (the
  ``Shard.data`` of ``shard_state(state, plan, r)``, as contiguous copies made once, untimed, so
  DCP never clones views), under rank-distinct keys, with ``FileSystemWriter(sync_files=True)``
  (DCP's own fsync, as in the one-process row). Loads: each rank allocates its half (timed, DCP
  needs preallocated tensors) and ``dcp.load``s it.

One timed repetition is ``barrier -> operation -> barrier`` in every rank; the suite reports
the max over ranks, and the max over ranks of the VmHWM growth during the operation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from _common import drop_cache, reset_peak, status_mib, training_state  # bench/ is sys.path[0]

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zckpt
from zckpt.dist import TorchComm

PEERS = ("dcp", "zckpt")


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn_ranks(
    script: str, args: list[str], world_size: int, deadline_s: float, env: dict[str, str]
) -> list[dict[str, Any]]:
    """Run ``script`` as ``world_size`` ranks (``--rank r --port P`` appended) and return each
    rank's JSON result (the last stdout line). Every rank is killed after ``deadline_s`` or as
    soon as one fails, so a hung gloo rank never hangs the caller."""
    port = free_port()
    procs: list[subprocess.Popen[str]] = []
    try:
        for r in range(world_size):
            procs.append(
                subprocess.Popen(
                    [sys.executable, script, *args, "--rank", str(r), "--port", str(port)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        end = time.monotonic() + deadline_s
        outs: list[tuple[str, str] | None] = [None] * world_size
        while any(o is None for o in outs):
            for r, p in enumerate(procs):
                if outs[r] is not None:
                    continue
                try:
                    outs[r] = p.communicate(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                if p.returncode != 0:
                    err = outs[r][1][-3000:]  # type: ignore[index]
                    raise RuntimeError(f"rank {r} of {script} exited with {p.returncode}: {err}")
            if time.monotonic() > end:
                raise TimeoutError(f"{script} ranks still running after {deadline_s:.0f} s")
        results = []
        for r, o in enumerate(outs):
            assert o is not None
            lines = [ln for ln in o[0].splitlines() if ln.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"rank {r} of {script} printed no result: {o[1][-3000:]}")
            results.append(json.loads(lines[-1][len("RESULT ") :]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def run_two(peer: str, path: str, gib: float, reps: int, deadline_s: float) -> list[dict[str, Any]]:
    """Both ranks of one peer: save, warm load and cold load, ``reps`` times each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["--peer", peer, "--path", path, "--gib", repr(gib), "--reps", str(reps)]
    return spawn_ranks(os.path.abspath(__file__), args, 2, deadline_s, env)


# ---------------------------------------------------------------------------------------------
# One rank


def read_files(path: str) -> None:
    """Read every file under ``path`` once (page cache warm)."""
    for d, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(d, n), "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def nbytes_of(tensors: Any) -> int:
    """Bytes of the tensors in a (nested) dict, list or tuple."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(nbytes_of(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(nbytes_of(v) for v in tensors)
    return 0


def rank_main(args: argparse.Namespace) -> dict[str, Any]:
    """One rank: every repetition of save, warm load, cold load for ``args.peer``."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    torch.set_num_threads(1)
    rank, ws = args.rank, 2
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=rank,
        world_size=ws,
        timeout=datetime.timedelta(seconds=300),
    )
    state = training_state(args.gib)
    spec = zckpt.ZeroSpec(ws, 2)
    shard = zckpt.shard_state(state, zckpt.plan_shards(state, spec), rank)
    mine = {f"rank{rank}.{i}": t.clone() for i, t in enumerate(shard.data)}
    del shard
    comm = TorchComm(timeout=datetime.timedelta(seconds=300))
    path = args.path

    def save() -> None:
        if args.peer == "zckpt":
            zckpt.save_checkpoint(path, state, spec, tag="t", codec="raw", comm=comm)
        else:
            dcp_save(mine, storage_writer=FileSystemWriter(path, sync_files=True))

    def load() -> Any:
        if args.peer == "zckpt":
            return zckpt.load_checkpoint(path, spec, rank=rank).state
        target = {k: torch.empty_like(v) for k, v in mine.items()}
        dcp_load(target, checkpoint_id=path)
        return target

    def clear() -> None:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)

    res: dict[str, Any] = {"rank": rank, "written": nbytes_of(mine)}

    def timed(op: str, fn: Callable[[], Any], before: Callable[[], None] | None = None) -> None:
        times, peaks = [], []
        for _ in range(args.reps):
            if before is not None:
                before()
            dist.barrier()
            base = status_mib("VmRSS")
            reset_peak()
            dist.barrier()
            t0 = time.perf_counter()
            out = fn()
            dist.barrier()
            times.append(time.perf_counter() - t0)
            peaks.append(status_mib("VmHWM") - base)
            if op.endswith("load"):
                res["loaded"] = nbytes_of(out)
            del out
        res[op] = {"times": times, "peaks": peaks}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed("save", save, before=clear)
        dist.barrier()
        if rank == 0:
            read_files(path)
        timed("warm load", load)
        timed("cold load", load, before=lambda: drop_cache(path) if rank == 0 else None)
        dist.barrier()
        clear()
    dist.destroy_process_group()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description="one rank of the two-process DCP/zckpt benchmark")
    ap.add_argument("--peer", choices=PEERS, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--gib", type=float, required=True)
    ap.add_argument("--reps", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    print("RESULT " + json.dumps(rank_main(ap.parse_args())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
