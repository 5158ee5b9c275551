"""Saves to an S3 server on loopback (moto's server mode, in its own process) against s3fs's own
best calls on the same bytes, in one run.

Rows (MiB/s of blob bytes; each the best of ``--repeat`` runs):

* ``pipe, one object per rank``: ``fs.pipe({path: bytes})`` of every rank's finished blob
  (s3fs uploads the objects concurrently, each as one PUT or a 50 MiB-part multipart upload).
* ``zckpt save, raw, ranks as threads``: ``save_checkpoint`` at world size ``--ranks`` with
  every rank a thread (``zckpt.testing.run_ranks``), so the ranks' uploads run side by side as
  they would in a job: blobs go up from tensor memory, counted once the ETags check out, then
  the manifest and ``latest``.
* ``write_atomic, one blob`` against ``pipe_file, one blob``: one rank's blob alone.
* ``zckpt save, zstd``: the streamed path (frames into parts, the head as part 1, sent last,
  the object read back once for its whole-file hash).
* ``load, same world size`` and ``load, other world size``: every rank's ranged GETs.

Loopback measures the client's own overhead and moto's (a Python server on the same cores),
not a WAN: the ratios between rows are the point, not the MiB/s.

    .venv/bin/python bench/bench_s3.py --mib 256 --ranks 4
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

import zckpt
from zckpt.format import encode_shard_parts
from zckpt.testing import run_ranks

BUCKET = "zckpt-bench"
KEY = SECRET = "bench"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's server did not start")


def state_of(mib: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    n = mib * (1 << 20) // 4 // 4
    return {"master": {f"w{i}": torch.randn(n, generator=g) * 0.02 for i in range(4)}}


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="state size in MiB")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--part-mib", type=int, default=50)
    args = ap.parse_args(argv)

    import s3fs

    from zckpt.store import FsspecStorage

    proc, endpoint = start_moto()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET)
        fs.mkdir(BUCKET)
        storage = FsspecStorage(fs, part_size=args.part_mib << 20)
        state = state_of(args.mib)
        spec = zckpt.ZeroSpec(args.ranks, 2)
        plan = zckpt.plan_shards(state, spec)
        blobs = [
            b"".join(encode_shard_parts(zckpt.shard_state(state, plan, r)).buffers)
            for r in range(args.ranks)
        ]
        total = sum(len(b) for b in blobs) / (1 << 20)
        rows: list[tuple[str, float, float]] = []

        def row(name: str, seconds: float, mib: float = total) -> None:
            rows.append((name, seconds, mib / seconds))
            print(f"{name:44s} {seconds:7.2f} s {mib / seconds:8.1f} MiB/s", flush=True)

        def pipe() -> None:
            run = uuid.uuid4().hex
            fs.pipe({f"{BUCKET}/pipe/{run}/r{r}.zck": b for r, b in enumerate(blobs)})

        def save() -> str:
            url = f"s3://{BUCKET}/save/{uuid.uuid4().hex}"

            def rank(comm: Any) -> None:
                zckpt.save_checkpoint(url, state, spec, tag="t", comm=comm, storage=storage)

            run_ranks(rank, args.ranks, timeout=600)
            return url

        one = blobs[0]
        buffers = encode_shard_parts(zckpt.shard_state(state, plan, 0)).buffers
        mib1 = len(one) / (1 << 20)

        def pipe_one() -> None:
            fs.pipe_file(f"{BUCKET}/one/{uuid.uuid4().hex}", one)

        def write_one() -> None:
            storage.write_atomic(f"s3://{BUCKET}/one/{uuid.uuid4().hex}", buffers)

        # Interleaved, best of each: the box's other load hits both alike.
        pairs = [(pipe, save), (pipe_one, write_one)]
        got: dict[Callable[[], Any], float] = {}
        for _ in range(args.repeat):
            for a, b in pairs:
                for fn in (a, b):
                    got[fn] = min(got.get(fn, float("inf")), best(fn, 1))
        row("pipe, one object per rank", got[pipe])
        row("zckpt save, raw, ranks as threads", got[save])
        row("pipe_file, one blob", got[pipe_one], mib1)
        row("write_atomic, one blob", got[write_one], mib1)

        def save_zstd() -> None:
            url = f"s3://{BUCKET}/zstd/{uuid.uuid4().hex}"
            zckpt.save_checkpoint(
                url, state, zckpt.ZeroSpec(1, 2), tag="t", codec="zstd", storage=storage
            )

        row("zckpt save, zstd, ws 1 (one process)", best(save_zstd, 1))
        url = save()

        def load(ws: int) -> None:
            def rank(comm: Any) -> None:
                zckpt.load_checkpoint(url, world_size=ws, rank=comm.rank, storage=storage)

            run_ranks(rank, ws, timeout=600)

        row(f"load, same world size ({args.ranks})", best(lambda: load(args.ranks), args.repeat))
        other = args.ranks + 1
        row(f"load, other world size ({other})", best(lambda: load(other), args.repeat))
        by = {name: rate for name, _, rate in rows}
        ratios = [
            (
                "save / pipe (all ranks)",
                "zckpt save, raw, ranks as threads",
                "pipe, one object per rank",
            ),
            (
                "write_atomic / pipe_file (one blob)",
                "write_atomic, one blob",
                "pipe_file, one blob",
            ),
            (
                "other-size load / same-size load",
                f"load, other world size ({other})",
                f"load, same world size ({args.ranks})",
            ),
        ]
        print()
        for label, a, b in ratios:
            print(f"{label}: {by[a] / by[b]:.2f}")
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
