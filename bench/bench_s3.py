"""Saves to an S3 server on loopback (moto's server mode, in its own process) against s3fs's own
best calls on the same bytes, in one run.

Rows (MiB/s of blob bytes): each the median of ``--repeat`` runs (default 3), with the fastest
and slowest beside it; the peers take turns, so the box's other load hits all alike. Ratios are
of medians (a best-of-2 let one lucky or unlucky DCP run move its ratio by 0.3).

zckpt's rows use the filesystem zckpt builds for an ``s3://`` URL (``default_options``: on this
http endpoint, botocore's CRC32 request checksum off); s3fs's and DCP's rows use s3fs's own
defaults, as their users get them.

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
* ``zckpt save, raw, ws 1`` against ``DCP FsspecWriter``: the same state in one process,
  ``torch.distributed.checkpoint.save(..., storage_writer=FsspecWriter("s3://...",
  endpoint_url=...), no_dist=True)`` with DCP's default ``thread_count=1`` and with
  ``--dcp-threads`` (DCP writes through s3fs file objects: buffered blocks uploaded one after
  another per file, then its ``.metadata``).
* ``obstore put`` (only when the optional ``obstore`` package is installed): the same blobs
  through obstore, the Rust ``object_store`` client, as the issue asks a faster client to be
  measured against s3fs on the same server: every rank's blob concurrently as one PUT each,
  and one rank's blob as a multipart upload in ``FsspecStorage``'s part size.
* ``peak memory``: a fresh child process builds the state, resets its high-water mark
  (``/proc/self/clear_refs``) and saves it to the store at world size 1, raw and zstd; the row
  is the growth of ``VmHWM`` over the resident set before the save (the state itself excluded).

Loopback measures the client's own overhead and moto's (a Python server on the same cores),
not a WAN: the ratios between rows are the point, not the MiB/s.

    .venv/bin/python bench/bench_s3.py --mib 256 --ranks 4
    .venv/bin/python bench/bench_s3.py --mib 1024 --only peak     # the 1 GiB memory rows
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import torch

import zckpt
from zckpt.format import encode_shard_parts
from zckpt.store._fsspec import PART_SIZE
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


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _obstore(endpoint: str) -> Any:
    """An obstore ``S3Store`` of the bench bucket on ``endpoint``; None without obstore."""
    try:
        from obstore.store import S3Store
    except ImportError:
        return None
    return S3Store(BUCKET, endpoint=endpoint, access_key_id=KEY, secret_access_key=SECRET,
                   region="us-east-1", client_options={"allow_http": True})  # fmt: skip


def _parts(part_mib: int) -> dict[str, int]:
    """``FsspecStorage``'s part size: ``part_mib`` MiB, or its default for 0."""
    return {"part_size": part_mib << 20} if part_mib else {}


def peak_child(endpoint: str, mib: int, codec: str, part_mib: int) -> dict[str, Any]:
    """In a fresh process: the VmHWM growth of one ws-1 save of a ``mib`` MiB state."""
    import s3fs

    from zckpt.store import FsspecStorage
    from zckpt.store._s3_options import default_options

    fs = s3fs.S3FileSystem(**default_options(dict(endpoint_url=endpoint, key=KEY, secret=SECRET)))
    storage = FsspecStorage(fs, **_parts(part_mib))
    state = state_of(mib)
    # A small save first: imports, the client's connections and thread pools are not counted.
    zckpt.save_checkpoint(f"s3://{BUCKET}/warm/{uuid.uuid4().hex}", state_of(8),
                          zckpt.ZeroSpec(1, 2), tag="t", codec=codec, storage=storage)  # fmt: skip
    gc.collect()
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    zckpt.save_checkpoint(f"s3://{BUCKET}/peak/{uuid.uuid4().hex}", state,
                          zckpt.ZeroSpec(1, 2), tag="t", codec=codec, storage=storage)  # fmt: skip
    seconds = time.perf_counter() - t
    return {"growth_mib": _status_mib("VmHWM") - base, "seconds": seconds}


def peak_rows(endpoint: str, mib: int, part_mib: int) -> list[tuple[str, float]]:
    out = []
    for codec in ("raw", "zstd"):
        args = ["--peak-child", endpoint, str(mib), codec, str(part_mib)]
        r = subprocess.run(
            [sys.executable, __file__, *args],
            capture_output=True,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        if r.returncode:
            # moto can answer 500 to a 1 GiB upload under load: report it, measure the rest
            print(f"peak memory, {mib} MiB save, ws 1, {codec:4s}   FAILED (rc {r.returncode}): "
                  f"{(r.stderr.strip().splitlines() or ['?'])[-1][:300]}", flush=True)  # fmt: skip
            continue
        got = json.loads(r.stdout.strip().splitlines()[-1])
        out.append((codec, float(got["growth_mib"])))
        print(f"peak memory, {mib} MiB save, ws 1, {codec:4s}   +{got['growth_mib']:7.1f} MiB "
              f"above the state ({got['seconds']:.1f} s)", flush=True)  # fmt: skip
    return out


class _PeerFailedError(Exception):
    """A peer's save failed (reported, not timed)."""


def dcp_save(url: str, state: dict[str, Any], endpoint: str, threads: int) -> None:
    """DCP's own object-store path: FsspecWriter on s3fs, one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    writer = FsspecWriter(url, thread_count=threads, endpoint_url=endpoint, key=KEY,
                          secret=SECRET)  # fmt: skip
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process, yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=writer, no_dist=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="state size in MiB")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (the median is shown)")
    ap.add_argument("--part-mib", type=int, default=0, help="0: FsspecStorage's default")
    ap.add_argument("--dcp-threads", type=int, default=8, help="DCP's thread_count, 2nd row")
    ap.add_argument("--only", choices=("all", "save", "dcp", "load", "peak"), default="all")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--peak-child"]:
        endpoint, mib, codec, part = argv[1:5]
        print(json.dumps(peak_child(endpoint, int(mib), codec, int(part))))
        return 0
    args = ap.parse_args(argv)
    parts = {"save", "dcp", "load", "peak"} if args.only == "all" else {args.only}

    import s3fs

    from zckpt.store import FsspecStorage
    from zckpt.store._s3_options import default_options

    proc, endpoint = start_moto()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET)
        fs.mkdir(BUCKET)
        # zckpt's filesystem: the one it builds for an s3:// URL with these storage_options
        zfs = s3fs.S3FileSystem(
            **default_options(dict(endpoint_url=endpoint, key=KEY, secret=SECRET)),
            skip_instance_cache=True,
        )
        storage = FsspecStorage(zfs, **_parts(args.part_mib))
        state = state_of(args.mib)
        spec = zckpt.ZeroSpec(args.ranks, 2)
        plan = zckpt.plan_shards(state, spec)
        blobs = [
            b"".join(encode_shard_parts(zckpt.shard_state(state, plan, r)).buffers)
            for r in range(args.ranks)
        ]
        total = sum(len(b) for b in blobs) / (1 << 20)
        rows: list[tuple[str, float, float]] = []

        def row(name: str, times: list[float], mib: float = total) -> None:
            seconds = statistics.median(times)
            rows.append((name, seconds, mib / seconds))
            spread = f"({min(times):.2f}-{max(times):.2f} s, {len(times)} runs)"
            print(f"{name:44s} {seconds:7.2f} s {mib / seconds:8.1f} MiB/s {spread}", flush=True)

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

        got: dict[Callable[[], Any], list[float]] = {}

        def interleaved(fns: list[Callable[[], Any]]) -> None:
            # Taking turns: the box's other load hits all alike.
            for _ in range(args.repeat):
                for fn in fns:
                    got.setdefault(fn, []).append(timed(fn))

        ratios: list[tuple[str, str, str]] = []
        if "save" in parts:
            interleaved([pipe, save, pipe_one, write_one])
            row("pipe, one object per rank", got[pipe])
            row("zckpt save, raw, ranks as threads", got[save])
            row("pipe_file, one blob", got[pipe_one], mib1)
            row("write_atomic, one blob", got[write_one], mib1)
            ratios += [
                ("save / pipe (all ranks)", "zckpt save, raw, ranks as threads",
                 "pipe, one object per rank"),
                ("write_atomic / pipe_file (one blob)", "write_atomic, one blob",
                 "pipe_file, one blob"),
            ]  # fmt: skip

            def save_zstd() -> None:
                url = f"s3://{BUCKET}/zstd/{uuid.uuid4().hex}"
                zckpt.save_checkpoint(
                    url, state, zckpt.ZeroSpec(1, 2), tag="t", codec="zstd", storage=storage
                )

            row("zckpt save, zstd, ws 1 (one process)", [timed(save_zstd)])

            client = _obstore(endpoint)
            if client is not None:
                import asyncio

                import obstore

                def obs_all() -> None:
                    async def all_ranks() -> None:
                        run = uuid.uuid4().hex
                        await asyncio.gather(*(
                            obstore.put_async(client, f"obs/{run}/r{r}.zck", b, use_multipart=False)
                            for r, b in enumerate(blobs)
                        ))  # fmt: skip

                    asyncio.run(all_ranks())

                def obs_parts() -> None:
                    whole = b"".join(blobs)
                    name = f"obs1/{uuid.uuid4().hex}"
                    obstore.put(client, name, whole, use_multipart=True, chunk_size=PART_SIZE)

                def pipe_all() -> None:
                    fs.pipe_file(f"{BUCKET}/pipe1/{uuid.uuid4().hex}", b"".join(blobs))

                interleaved([pipe, obs_all, pipe_all, obs_parts])
                row("obstore put, one object per rank", got[obs_all])
                row("s3fs pipe_file, all ranks' bytes as one object", got[pipe_all])
                row("obstore put, the same as one multipart object", got[obs_parts])
                ratios += [
                    ("obstore / s3fs pipe (one object per rank)",
                     "obstore put, one object per rank", "pipe, one object per rank"),
                    ("obstore / s3fs pipe_file (one multipart object)",
                     "obstore put, the same as one multipart object",
                     "s3fs pipe_file, all ranks' bytes as one object"),
                ]  # fmt: skip

        if "dcp" in parts:

            def save_ws1() -> None:
                url = f"s3://{BUCKET}/ws1/{uuid.uuid4().hex}"
                zckpt.save_checkpoint(url, state, zckpt.ZeroSpec(1, 2), tag="t", storage=storage)

            def dcp1() -> None:
                dcp_save(f"s3://{BUCKET}/dcp/{uuid.uuid4().hex}", state, endpoint, 1)

            def dcpn() -> None:
                dcp_save(f"s3://{BUCKET}/dcp/{uuid.uuid4().hex}", state, endpoint,
                         args.dcp_threads)  # fmt: skip

            def failing(fn: Callable[[], Any], name: str) -> Callable[[], Any]:
                def run() -> None:
                    try:
                        fn()
                    except Exception as e:  # a peer failing is a result too: say so, go on
                        print(f"{name} failed: {type(e).__name__}: {str(e)[-200:]}", flush=True)
                        raise _PeerFailedError from e

                return run

            d1 = failing(dcp1, "DCP FsspecWriter, thread_count=1")
            dn = failing(dcpn, f"DCP FsspecWriter, thread_count={args.dcp_threads}")
            for _ in range(args.repeat):
                for fn in (save_ws1, d1, dn):
                    with contextlib.suppress(_PeerFailedError):
                        got.setdefault(fn, []).append(timed(fn))
            row("zckpt save, raw, ws 1 (one process)", got[save_ws1])
            for fn, name in (
                (d1, "DCP FsspecWriter, thread_count=1 (default)"),
                (dn, f"DCP FsspecWriter, thread_count={args.dcp_threads}"),
            ):
                if fn in got:
                    row(name, got[fn])
            ratios += [
                ("save / DCP FsspecWriter (default)", "zckpt save, raw, ws 1 (one process)",
                 "DCP FsspecWriter, thread_count=1 (default)"),
                (f"save / DCP FsspecWriter (thread_count={args.dcp_threads})",
                 "zckpt save, raw, ws 1 (one process)",
                 f"DCP FsspecWriter, thread_count={args.dcp_threads}"),
            ]  # fmt: skip

        if "load" in parts:
            url = save()

            def load(ws: int) -> None:
                def rank(comm: Any) -> None:
                    zckpt.load_checkpoint(url, world_size=ws, rank=comm.rank, storage=storage)

                run_ranks(rank, ws, timeout=600)

            other = args.ranks + 1
            same_fn, other_fn = (lambda: load(args.ranks)), (lambda: load(other))
            interleaved([same_fn, other_fn])
            row(f"load, same world size ({args.ranks})", got[same_fn])
            row(f"load, other world size ({other})", got[other_fn])
            ratios.append(("other-size load / same-size load", f"load, other world size ({other})",
                           f"load, same world size ({args.ranks})"))  # fmt: skip

        peaks = peak_rows(endpoint, args.mib, args.part_mib) if "peak" in parts else []
        by = {name: rate for name, _, rate in rows}
        print()
        for label, a, b in ratios:
            if a in by and b in by:
                print(f"{label}: {by[a] / by[b]:.2f}")
        for codec, growth in peaks:
            print(f"peak above the state, {args.mib} MiB save, {codec}: {growth:.0f} MiB")
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
