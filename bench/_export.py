"""Offline export end to end (issue 14, part 3): the commands users run, as new processes.

On each DeepSpeed-written checkpoint of ``_deepspeed`` (ZeRO-2 and ZeRO-3), one repetition of
each peer, round-robin, each a fresh process started by this one and timed from ``Popen`` to the
output being durable:

* ``zero_to_fp32.py``: DeepSpeed 0.19.8's own script, ``python -m deepspeed.utils.zero_to_fp32
  DS_CKPT OUT --safe_serialization --max_shard_size 5GB`` (``DS_ACCELERATOR=cpu``; the installed
  file as ``__main__``: run by its path, its directory's ``torch.py`` shadows torch). It does not
  fsync its output, so every file it wrote, then the directory, is fsynced after it exits
  (inside the timing);
* ``zckpt consolidate``: ``python -m zckpt consolidate DS_CKPT OUT --max-shard-size 5GB`` (zckpt
  fsyncs each shard and the directory and renames the finished directory into place itself);
* ``zckpt consolidate --lazy``: the same with ``--lazy`` (one tensor in memory at a time).

Peak RSS is the child's own VmHWM (``/proc/PID/status``, polled every 5 ms until it exits;
``wait4``'s ``ru_maxrss`` would include this process's resident set at the fork), imports
included; the report also
shows the peak of a process that only imports torch, for scale. Before each repetition the output
is removed and ``os.sync()`` runs (untimed); the checkpoint's files are read once before the
first repetition (warm page cache). After the timings, every output is loaded with
``safetensors.torch.load_file`` (every ``*.safetensors`` file of the directory) and compared,
tensor by tensor (dtype, shape, xxh3 of the bytes), against DeepSpeed's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any

import xxhash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ("zero_to_fp32.py", "zckpt consolidate", "zckpt consolidate --lazy")


def command(peer: str, ckpt: str, out: str) -> list[str]:
    """The command line of ``peer`` writing ``ckpt``'s fp32 weights into ``out``."""
    if peer == "zero_to_fp32.py":
        # ``python -m``: the installed file run as __main__. Run by its path, its own directory
        # (deepspeed/utils, which holds torch.py and logging.py) would shadow torch.
        return [
            sys.executable,
            "-m",
            "deepspeed.utils.zero_to_fp32",
            ckpt,
            out,
            "--safe_serialization",
            "--max_shard_size",
            "5GB",
        ]
    cmd = [sys.executable, "-m", "zckpt", "consolidate", ckpt, out, "--max-shard-size", "5GB"]
    return [*cmd, "--lazy"] if peer.endswith("--lazy") else cmd


_compiled: list[bool] = []


def precompile() -> None:
    """Compile zckpt's modules to ``__pycache__`` once (untimed), as installing it does.

    zckpt runs from this checkout, where ``PYTHONDONTWRITEBYTECODE`` (if set) would have every
    run compile every module it imports anew (0.2-0.4 s), while torch and DeepSpeed are
    installed packages whose bytecode was written at install time.
    """
    if not _compiled:
        import compileall

        compileall.compile_dir(os.path.join(REPO, "zckpt"), quiet=1)
        _compiled.append(True)


def env_for(peer: str) -> dict[str, str]:
    """The child's environment (zckpt from this checkout; DeepSpeed on the CPU)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}
    if peer.startswith("zckpt"):
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def fsync_dir_files(path: str) -> None:
    """fsync every file in ``path``, then ``path`` itself."""
    for name in sorted(os.listdir(path)):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_once(peer: str, ckpt: str, out: str, timeout: float = 1800) -> dict[str, Any]:
    """One timed run of ``peer``: seconds to a durable output, and the child's peak RSS."""
    precompile()
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command(peer, ckpt, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env_for(peer),
        cwd=os.path.dirname(out),
    )
    end = time.monotonic() + timeout
    hwm = 0.0
    while True:
        hwm = max(hwm, vm_hwm_mib(proc.pid))
        pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > end:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"{peer} still running after {timeout:.0f} s")
        time.sleep(0.005)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{peer} exited with {proc.returncode}: {err[-3000:]}")
    if peer == "zero_to_fp32.py":
        fsync_dir_files(out)
    seconds = time.perf_counter() - t0
    files = sorted(os.listdir(out))
    nbytes = sum(os.path.getsize(os.path.join(out, n)) for n in files)
    return {"s": seconds, "rss_mib": hwm, "files": files, "bytes": nbytes}


def vm_hwm_mib(pid: int) -> float:
    """The process's peak resident set so far (VmHWM of its current program; 0 once it exited).

    Not ``ru_maxrss`` from ``wait4``: on Linux that keeps the high-water mark of the memory the
    child was forked with, i.e. this (large) process's resident set at the fork."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def output_hashes(out: str) -> dict[str, str]:
    """Every tensor of every ``*.safetensors`` file in ``out``: dtype, shape, xxh3 of bytes."""
    import safetensors.torch
    import torch

    hashes: dict[str, str] = {}
    for name in sorted(os.listdir(out)):
        if not name.endswith(".safetensors"):
            continue
        for k, t in safetensors.torch.load_file(os.path.join(out, name)).items():
            c = t.contiguous()
            h = xxhash.xxh3_64(c.reshape(-1).view(torch.uint8).numpy().data)
            hashes[k] = f"{c.dtype}{tuple(c.shape)}:{h.hexdigest()}"
    return hashes


def import_torch_rss() -> float:
    """Peak RSS (MiB) of a fresh process that imports torch (read by itself, before exiting)."""
    code = (
        "import torch\n"
        "print([int(x.split()[1]) / 1024 for x in open('/proc/self/status') "
        "if x.startswith('VmHWM:')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])
