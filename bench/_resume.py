"""Resume into live objects (issue 14, part 1): a model and its AdamW, restored where they live.

Run as a script, this file is one process (``run`` starts one, or two gloo ranks) that runs
every peer. Each process builds the same model and optimizer (seeded; ``LAYERS`` fp32
parameters and AdamW's ``exp_avg``/``exp_avg_sq``/``step``, created by one real ``opt.step()``:
12 bytes per parameter, about ``--gib`` GiB in all), saves it once per peer (untimed, durable),
then times repetitions of a resume into that same model and optimizer, round-robin (one of each
peer in turn, so the machine's load hits every peer alike), warm (files read once before) then
cold (``posix_fadvise(DONTNEED)`` on the peer's files before each repetition). Before each
repetition every live tensor is zeroed (untimed); after it, every value is checked against the
saved one (a mismatch fails the run), so a resume that does not write is caught.

Peers (``PEERS``):

* ``zckpt``: ``Checkpointer(model, opt).load_checkpoint(dir)``, what a training script calls;
* ``zckpt-into``: ``load_checkpoint(dir, into=training_state(model, opt))``: every tensor of the
  state (parameters and optimizer state) read into the live tensors, then the param groups set;
* ``dcp``: ``dcp.load({"model": model.state_dict(), "optim": opt.state_dict()})`` (DCP fills
  the given tensors in place), then ``model.load_state_dict`` and ``opt.load_state_dict`` as
  DCP's own recipe does;
* ``torch``: ``torch.load(weights_only=True)`` of one ``torch.save`` file, then
  ``model.load_state_dict`` and ``opt.load_state_dict`` (fresh tensors, then copies);
* ``raw``: the limit: one file of every tensor's bytes (``numpy.tofile`` + fsync), read with
  ``readinto`` straight into the live tensors' memory.

With two processes every rank resumes the whole state (data parallelism): zckpt's ranks each
wrote their ZeRO-2 shard (``comm=TorchComm()``) and each reads every shard; DCP's save
deduplicates the replicated tensors across ranks and each rank loads all of them; torch's and
raw's file is written by rank 0 and read by both. A repetition is ``barrier -> resume ->
barrier`` on every rank; the suite reports the max over ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from typing import Any

import torch
from _common import drop_cache, fsync_tree, reset_peak, status_mib  # bench/ is sys.path[0]
from _dcp2 import read_files, spawn_ranks

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zckpt

PEERS = ("raw", "zckpt", "zckpt-into", "dcp", "torch")
LAYERS = 8


class Model(torch.nn.Module):
    """``LAYERS`` fp32 parameters of equal size (the suite's training state, as a model)."""

    def __init__(self, per: int) -> None:
        super().__init__()
        self.layers = torch.nn.ParameterList(
            torch.nn.Parameter(torch.empty(per)) for _ in range(LAYERS)
        )


def build(gib: float) -> tuple[Model, torch.optim.AdamW]:
    """The model and its AdamW after one step (12 bytes per parameter, about ``gib`` GiB)."""
    per = int(gib * 2**30 / 12) // LAYERS
    g = torch.Generator().manual_seed(0)
    model = Model(per)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(per, generator=g) * 0.02)
            p.grad = torch.randn(per, generator=g) * 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def live_tensors(model: Model, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a resume must fill: parameters, then each parameter's optimizer state."""
    out = [p.data for p in model.parameters()]
    for p in model.parameters():
        out += [v for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


def rank_main(a: argparse.Namespace) -> dict[str, Any]:
    """One process (rank ``a.rank`` of ``a.world_size``): every peer of ``a.peers``, round-robin
    (one repetition of each peer in turn), warm then cold."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from zckpt.adapters import Checkpointer, load_optimizer_state, training_state

    torch.set_num_threads(1)
    ws, rank = a.world_size, a.rank
    comm = None
    if ws > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{a.port}",
            rank=rank,
            world_size=ws,
            timeout=datetime.timedelta(seconds=600),
        )
        from zckpt.dist import TorchComm

        comm = TorchComm(timeout=datetime.timedelta(seconds=600))

    def barrier() -> None:
        if ws > 1:
            torch.distributed.barrier()

    peers = a.peers.split(",")
    model, opt = build(a.gib)
    live = live_tensors(model, opt)
    expected = [t.clone() for t in live]  # what every resume must restore, bitwise
    nbytes = sum(t.numel() * t.element_size() for t in live)
    paths = {p: os.path.join(a.path, p) for p in peers}
    ckpt = Checkpointer(model, opt, comm=comm)
    # Each peer saves once, untimed and durable (zckpt: each rank writes its own shard).
    for peer in peers:
        path = paths[peer]
        if peer == "zckpt":
            ckpt.save_checkpoint(path, tag="t")
        elif peer == "zckpt-into":
            Checkpointer(model, opt, comm=comm).save_checkpoint(path, tag="t")
        elif peer == "dcp":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd = {"model": model.state_dict(), "optim": opt.state_dict()}
                dcp_save(sd, storage_writer=FileSystemWriter(path, sync_files=True))
        elif rank == 0:
            if peer == "torch":
                torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
            else:
                with open(path, "wb") as f:
                    for t in live:
                        t.reshape(-1).view(torch.uint8).numpy().tofile(f)
            fsync_tree(path)
        barrier()

    def resume(peer: str) -> None:
        path = paths[peer]
        if peer == "raw":
            # The optimizer's current tensors: a peer that loads fresh tensors replaces them.
            with open(path, "rb", buffering=0) as f:
                for t in live_tensors(model, opt):
                    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                    got = 0
                    while got < len(view):
                        k = f.readinto(view[got:])
                        if not k:
                            raise EOFError(path)
                        got += k
        elif peer == "zckpt":
            ckpt.load_checkpoint(path, tag="t")
        elif peer == "zckpt-into":
            got = zckpt.load_checkpoint(path, tag="t", into=training_state(model, opt))
            load_optimizer_state(model, opt, got.state["optimizer"])
        elif peer == "dcp":
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            dcp_load(sd, checkpoint_id=path)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optim"])
        else:
            sd = torch.load(path, weights_only=True, mmap=False)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optim"])

    res: dict[str, Any] = {"rank": rank, "bytes": nbytes, "files_bytes": {}}
    for op in ("warm", "cold"):
        if op == "warm" and rank == 0:
            for peer in peers:
                read_any(paths[peer])
        for _ in range(a.reps):
            for peer in peers:
                with torch.no_grad():
                    for t in live_tensors(model, opt):
                        t.zero_()
                if op == "cold" and rank == 0:
                    drop_any(paths[peer])
                barrier()
                base = status_mib("VmRSS")
                reset_peak()
                barrier()
                t0 = time.perf_counter()
                resume(peer)
                barrier()
                seconds = time.perf_counter() - t0
                mine = res.setdefault(peer, {}).setdefault(op, {"times": [], "peaks": []})
                mine["times"].append(seconds)
                mine["peaks"].append(status_mib("VmHWM") - base)
                got = live_tensors(model, opt)
                if len(got) != len(expected) or not all(map(torch.equal, got, expected)):
                    bad = [i for i, (x, y) in enumerate(zip(got, expected)) if not x.equal(y)]
                    raise RuntimeError(f"{peer} rank {rank}: {op} resume left tensors {bad} wrong")
    if rank == 0:
        for peer in peers:
            path = paths[peer]
            res["files_bytes"][peer] = (
                sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)
                if os.path.isdir(path)
                else os.path.getsize(path)
            )
    if ws > 1:
        torch.distributed.destroy_process_group()
    return res


def read_any(path: str) -> None:
    """Read a file, or every file under a directory, once (page cache warm)."""
    if os.path.isdir(path):
        read_files(path)
    else:
        read_files_one(path)


def drop_any(path: str) -> None:
    """posix_fadvise(DONTNEED) a file, or every file under a directory."""
    if os.path.isdir(path):
        drop_cache(path)
    else:
        drop_one(path)


def read_files_one(path: str) -> None:
    """Read one file once (page cache warm)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def drop_one(path: str) -> None:
    """posix_fadvise(DONTNEED) one file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(
    peers: tuple[str, ...], path: str, gib: float, reps: int, ws: int, deadline_s: float
) -> Any:
    """Every peer in ``ws`` fresh processes (one gloo rank each when ``ws > 1``), checkpoints
    under the directory ``path``: each rank's result."""
    # LOCAL_WORLD_SIZE as torchrun sets it: zckpt's readers share the cores among the ranks.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["LOCAL_WORLD_SIZE"] = str(ws)
    os.makedirs(path, exist_ok=True)
    args = ["--peers", ",".join(peers), "--path", path, "--gib", repr(gib), "--reps", str(reps)]
    args += ["--world-size", str(ws)]
    return spawn_ranks(os.path.abspath(__file__), args, ws, deadline_s, env)


def main() -> int:
    ap = argparse.ArgumentParser(description="one process of the resume-in-place benchmark")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated, of: %(default)s")
    ap.add_argument("--path", required=True)
    ap.add_argument("--gib", type=float, required=True)
    ap.add_argument("--reps", type=int, required=True)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    print("RESULT " + json.dumps(rank_main(ap.parse_args())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
