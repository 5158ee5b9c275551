"""DeepSpeed's ``zero_to_fp32`` against zckpt on a checkpoint DeepSpeed itself wrote.

DeepSpeed is used only as an installed library, only from bench/ (zckpt never imports it).

* ``probe()``: is ``deepspeed`` importable? (in a subprocess: it is slow to import and sets up
  an accelerator.)
* ``checkpoint()``: a ZeRO-2 bf16 checkpoint of ``LAYERS`` ``Linear(d, d)`` layers written by
  ``engine.save_checkpoint`` after one training step with ``torch.optim.AdamW`` in two gloo
  processes on CPU (``DS_ACCELERATOR=cpu``, ``deepspeed.init_distributed("gloo")``, as in
  /work/shared/fixtures/deepspeed/make_fixtures.py). About 14 bytes per parameter on disk (bf16
  weights 2, fp32 master 4, Adam moments 8). Cached under a key of the size and of DeepSpeed's
  and torch's versions, so a second run reuses it; DeepSpeed's copy of its ``zero_to_fp32.py``
  script is removed from the directory (not checkpoint data).
* Run as ``python _deepspeed.py child MODE DIR``: one timed consolidation in a fresh process,
  ``MODE`` one of ``deepspeed`` (``deepspeed.utils.zero_to_fp32.
  get_fp32_state_dict_from_zero_checkpoint``), ``zckpt`` (``zckpt.
  get_fp32_state_dict_from_zero_checkpoint``, eager) or ``lazy`` (zckpt with ``lazy_mode=True``,
  each tensor materialised and dropped in turn). With ``--hash`` it also hashes every output
  tensor (dtype, shape, xxh3 of the bytes) after the timing, for the bitwise check.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import xxhash
from _common import status_mib, timed_peak  # bench/ is sys.path[0]
from _dcp2 import spawn_ranks

LAYERS = 4
TAG = "step1"
MICRO_BS = 8
HERE = os.path.dirname(os.path.abspath(__file__))


def ds_env() -> dict[str, str]:
    """The environment of every process that imports DeepSpeed."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}


def probe(timeout: float = 300) -> tuple[str | None, str]:
    """(DeepSpeed's version, "") when ``import deepspeed`` works, else (None, why not)."""
    code = "import deepspeed; print('VERSION', deepspeed.__version__)"
    try:
        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=ds_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"`import deepspeed` took over {timeout:.0f} s"
    for line in p.stdout.splitlines():
        if line.startswith("VERSION "):
            return line.split()[1], ""
    last = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"`import deepspeed` failed: {last}"


def width_for(gib: float) -> int:
    """Layer width d so that LAYERS * (d*d + d) params take about ``gib`` GiB at 14 B/param."""
    params = gib * 2**30 / 14
    return max(64, round(math.sqrt(params / LAYERS) / 64) * 64)


def n_params(d: int) -> int:
    """Parameters of the model of width ``d``."""
    return LAYERS * (d * d + d)


def dir_bytes(path: str) -> int:
    """Bytes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)


def shm_buffers() -> list[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (it never unlinks them)."""
    if not os.path.isdir("/dev/shm"):
        return []
    names = os.listdir("/dev/shm")
    return [os.path.join("/dev/shm", n) for n in names if n.startswith("deepspeed_allreduce")]


def checkpoint(cache: str, gib: float, ds_version: str) -> tuple[str, dict[str, Any]]:
    """The cached checkpoint's directory and its generation record, generating it if needed."""
    d = width_for(gib)
    key = f"deepspeed-{n_params(d)}p-z2-bf16-ws2-ds{ds_version}-torch{torch.__version__}"
    final = os.path.join(cache, key)
    record = os.path.join(final, "generated.json")
    if os.path.exists(record):
        with open(record) as f:
            info: dict[str, Any] = json.load(f)
        return final, {**info, "cached": True}
    os.makedirs(cache, exist_ok=True)
    work = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    env = {
        **ds_env(),
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.path.join(work, "torch_extensions"),
    }
    shm_before = set(shm_buffers())
    try:
        t0 = time.perf_counter()
        args = ["gen", os.path.join(work, "checkpoint"), "--width", str(d)]
        res = spawn_ranks(os.path.abspath(__file__), args, 2, 1800, env)
        seconds = time.perf_counter() - t0
        shutil.rmtree(env["TORCH_EXTENSIONS_DIR"], ignore_errors=True)
        for name in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's script copies
            with_script = os.path.join(work, "checkpoint", name)
            if os.path.exists(with_script):
                os.remove(with_script)
        info = {
            "params": n_params(d),
            "width": d,
            "layers": LAYERS,
            "generation_s": seconds,
            "step_s": max(r["step_s"] for r in res),
            "save_s": max(r["save_s"] for r in res),
            "bytes": dir_bytes(os.path.join(work, "checkpoint")),
            "deepspeed": ds_version,
            "torch": torch.__version__,
        }
        with open(os.path.join(work, "generated.json"), "w") as f:
            json.dump(info, f)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for leak in set(shm_buffers()) - shm_before:  # never expected: the op is not built
            os.remove(leak)
    return final, {**info, "cached": False}


def ckpt_path(final: str) -> str:
    """The save_dir DeepSpeed wrote (with ``latest`` and the tag directory)."""
    return os.path.join(final, "checkpoint")


# ---------------------------------------------------------------------------------------------
# Generation: one rank


def gen_rank(out: str, width: int, rank: int, port: int) -> dict[str, Any]:
    """One rank of the two-rank DeepSpeed run: build, one step, ``engine.save_checkpoint``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_SIZE="2",
        CROSS_RANK="0",
        CROSS_SIZE="1",
    )
    torch.set_num_threads(1)
    import deepspeed

    # DeepSpeed's TorchBackend JIT-builds a CPU shared-memory all-reduce op whose /dev/shm
    # buffers are never unlinked; it only serves inference_all_reduce, so it is not built
    # (deepspeed.comm re-exports the name `torch`, hence import_module).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # type: ignore[attr-defined]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(LAYERS)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BS,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(MICRO_BS, width, generator=g).to(torch.bfloat16)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    t1 = time.perf_counter()
    engine.save_checkpoint(out, tag=TAG)
    t2 = time.perf_counter()
    torch.distributed.barrier()
    return {"rank": rank, "step_s": t1 - t0, "save_s": t2 - t1}


# ---------------------------------------------------------------------------------------------
# Timed consolidation: one fresh process


def tensor_hash(t: torch.Tensor) -> str:
    """dtype, shape and xxh3-64 of the tensor's bytes."""
    c = t.detach().contiguous()
    h = xxhash.xxh3_64(c.reshape(-1).view(torch.uint8).numpy().data).hexdigest()
    return f"{c.dtype}{tuple(c.shape)}:{h}"


class RssSampler:
    """Highest RssAnon and RssFile growth (MiB) while running, sampled every 2 ms.

    VmHWM counts every resident page, including file pages mapped by ``torch.load(mmap=True)``
    (page cache, reclaimable); the split tells the two apart. Sampling can miss a short peak.
    """

    def __init__(self) -> None:
        self.base = (status_mib("RssAnon"), status_mib("RssFile"))
        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.anon = max(self.anon, status_mib("RssAnon") - self.base[0])
            self.file = max(self.file, status_mib("RssFile") - self.base[1])
            if self._stop.wait(0.002):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._run()  # one last sample (the loop returns at once: the event is set)


def child(mode: str, path: str, hash_out: bool) -> dict[str, Any]:
    """One consolidation of ``path`` in this (fresh) process: seconds and peak MiB."""
    res: dict[str, Any] = {"mode": mode}
    if mode == "deepspeed":
        zf = importlib.import_module("deepspeed.utils.zero_to_fp32")
        parse_s = [0.0]

        def timing(fn: Any) -> Any:
            def wrapped(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    parse_s[0] += time.perf_counter() - t0

            return wrapped

        # How DeepSpeed's time splits: reading its files (its own parse functions, timed by
        # wrapping them) against the rest (concatenating partitions, building the dict).
        zf.parse_optim_states = timing(zf.parse_optim_states)  # type: ignore[attr-defined]
        zf.parse_model_states = timing(zf.parse_model_states)  # type: ignore[attr-defined]
        with RssSampler() as rss:
            seconds, peak, out = timed_peak(
                lambda: zf.get_fp32_state_dict_from_zero_checkpoint(path)
            )
        res["parse_s"] = parse_s[0]
    else:
        sys.path.insert(1, os.path.dirname(HERE))
        import numpy as np

        import zckpt

        # zckpt imports Numba and loads its cached kernels on first use: done here, before the
        # baseline, as DeepSpeed's child imports deepspeed before its own.
        for dt in (np.uint8, np.uint16, np.uint32):
            zckpt.kernels.copy_ranges(np.zeros(4, dt), np.ones(4, dt), [[0, 0, 4]])
        for kind in ("bf16", "f16"):
            zckpt.kernels.upcast_ranges(
                np.zeros(4, np.float32), np.ones(4, np.uint16), [[0, 0, 4]], kind
            )

        if mode == "zckpt":
            fn = lambda: zckpt.get_fp32_state_dict_from_zero_checkpoint(path)  # noqa: E731
            with RssSampler() as rss:
                seconds, peak, out = timed_peak(fn)
        else:
            largest = [0]

            def lazy() -> None:
                d = zckpt.get_fp32_state_dict_from_zero_checkpoint(path, lazy_mode=True)
                for k in list(d):
                    t = d[k].contiguous()
                    largest[0] = max(largest[0], t.numel() * t.element_size())
                    del t

            with RssSampler() as rss:
                seconds, peak, out = timed_peak(lazy)
            res["largest"] = largest[0]
        res["imported_deepspeed"] = "deepspeed" in sys.modules
    res["s"], res["peak_mib"] = seconds, peak
    res["anon_peak_mib"], res["file_peak_mib"] = rss.anon, rss.file
    if out is not None:
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        res["out_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        res["largest"] = max(t.numel() * t.element_size() for t in tensors.values())
        res["n"] = len(tensors)
        if hash_out:
            res["hashes"] = {k: tensor_hash(v) for k, v in tensors.items()}
    return res


def run_child(
    mode: str, path: str, hash_out: bool = False, timeout: float = 1800
) -> dict[str, Any]:
    """``child`` in a fresh process; its result."""
    cmd = [sys.executable, os.path.abspath(__file__), "child", mode, path]
    p = subprocess.run(
        [*cmd, *(["--hash"] if hash_out else [])],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ds_env(),
        check=False,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} child failed ({p.returncode}): {p.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="DeepSpeed checkpoint generation and fp32 children")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("out")
    g.add_argument("--width", type=int, required=True)
    g.add_argument("--rank", type=int, required=True)
    g.add_argument("--port", type=int, required=True)
    c = sub.add_parser("child")
    c.add_argument("mode", choices=("deepspeed", "zckpt", "lazy"))
    c.add_argument("path")
    c.add_argument("--hash", action="store_true")
    a = ap.parse_args()
    if a.cmd == "gen":
        res = gen_rank(a.out, a.width, a.rank, a.port)
    else:
        res = child(a.mode, a.path, a.hash)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
