"""DeepSpeed's ``zero_to_fp32`` against zckpt on checkpoints DeepSpeed itself wrote.

DeepSpeed is used only as an installed library, only from bench/ (zckpt never imports it).

* ``probe()``: is ``deepspeed`` importable? (in a subprocess: it is slow to import and sets up
  an accelerator.)
* ``checkpoints(cache, kinds, gib, version)``: bf16 checkpoints written by
  ``engine.save_checkpoint`` after one training step with ``torch.optim.AdamW`` in two gloo
  processes on CPU (``DS_ACCELERATOR=cpu``, ``deepspeed.init_distributed("gloo")``, as in
  /work/shared/fixtures/deepspeed/make_fixtures.py), of one of two ``KINDS``:

  - ``z2``: ZeRO-2, ``LAYERS`` ``Linear(d, d)`` layers (few big tensors: DeepSpeed's best case,
    one ``torch.cat`` per param group). About 14 bytes per parameter on disk (bf16 weights 2,
    fp32 master 4, Adam moments 8).
  - ``z3``: ZeRO-3, a transformer-shaped stack of ``BLOCKS`` blocks (LayerNorm, q/k/v/o
    ``Linear(d, d)`` with biases, LayerNorm, MLP ``d -> 4d -> d``) and a final LayerNorm:
    16 tensors per block, ``16 * BLOCKS + 2`` in all. About 12 bytes per parameter on disk
    (stage 3 saves no 16-bit weights). ``stage3_param_persistence_threshold`` is ``4d + 1``:
    vectors stay whole on every rank and matrices are partitioned, at every size (DeepSpeed's
    default of 1e5 does that for a model of width >= 317; make_fixtures.py sets 100 for its tiny
    model); ``zero.Init`` is not used (the model is built whole, then partitioned).

  Each is cached apart under a key of its kind, size and DeepSpeed's and torch's versions, so a
  second run reuses it; the missing ones are generated in one two-rank run (one engine per kind,
  in turn). DeepSpeed's copies of its scripts are removed from the directories (not checkpoint
  data).
* Run as ``python _deepspeed.py child MODE DIR``: one timed consolidation in a fresh process,
  ``MODE`` one of ``deepspeed`` (``deepspeed.utils.zero_to_fp32.
  get_fp32_state_dict_from_zero_checkpoint``, with its phases timed), ``zckpt`` (``zckpt.
  get_fp32_state_dict_from_zero_checkpoint``, eager) or ``lazy`` (zckpt with ``lazy_mode=True``,
  each tensor materialised and dropped in turn). After the timing it reads every output byte
  once (``first_read_s``, reported apart: zckpt's eager outputs are mapped from the files, so
  their pages are read on first use); with ``--hash`` it also hashes every output tensor
  (dtype, shape, xxh3 of the bytes), for the bitwise check.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import resource
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

LAYERS = 4  # z2: LAYERS x Linear(d, d)
BLOCKS = 24  # z3: BLOCKS transformer blocks and a final LayerNorm
HEAD_DIM = 64
SEQ = 16
KINDS = ("z2", "z3")
LABELS = {"z2": "z2 4xLinear", "z3": "z3 transformer"}
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


def width_for(kind: str, gib: float) -> int:
    """Model width d so that the ``kind`` checkpoint takes about ``gib`` GiB.

    z2: ``LAYERS * (d*d + d)`` params at 14 B/param (d rounded to 64). z3: ``BLOCKS * (12 d^2 +
    13 d) + 2 d`` params at 12 B/param (d rounded up to 64, so at least ``gib`` GiB).
    """
    if kind == "z2":
        params = gib * 2**30 / 14
        return max(64, round(math.sqrt(params / LAYERS) / 64) * 64)
    params = gib * 2**30 / 12
    return max(64, math.ceil(math.sqrt(params / (12 * BLOCKS)) / 64) * 64)


def n_params(kind: str, d: int) -> int:
    """Parameters of the ``kind`` model of width ``d``."""
    if kind == "z2":
        return LAYERS * (d * d + d)
    return BLOCKS * (12 * d * d + 13 * d) + 2 * d


def n_tensors(kind: str) -> int:
    """Parameter tensors of the ``kind`` model."""
    return 2 * LAYERS if kind == "z2" else 16 * BLOCKS + 2


def describe(kind: str, info: dict[str, Any]) -> str:
    """The model and ZeRO setup, in words, for the report."""
    d = info["width"]
    if kind == "z2":
        return f"ZeRO-2, bf16, {info['layers']} x Linear({d}, {d})"
    return (
        f"ZeRO-3, bf16, {info['blocks']} transformer blocks of width {d} (LayerNorm, q/k/v/o "
        f"Linear({d}, {d}) with biases, LayerNorm, MLP {d}->{4 * d}->{d}) and a final "
        f"LayerNorm, stage3_param_persistence_threshold {4 * d + 1} (vectors whole on every "
        "rank, matrices partitioned), no zero.Init"
    )


def dir_bytes(path: str) -> int:
    """Bytes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)


def shm_buffers() -> list[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (it never unlinks them)."""
    if not os.path.isdir("/dev/shm"):
        return []
    names = os.listdir("/dev/shm")
    return [os.path.join("/dev/shm", n) for n in names if n.startswith("deepspeed_allreduce")]


def cache_key(kind: str, gib: float, ds_version: str) -> str:
    """The cache directory name of the ``kind`` checkpoint of about ``gib`` GiB."""
    d = width_for(kind, gib)
    # z2's key is the one of the first version of this file (its checkpoints stay valid).
    model = "z2" if kind == "z2" else f"z3-transformer{BLOCKS}x{d}"
    return (
        f"deepspeed-{n_params(kind, d)}p-{model}-bf16-ws2-ds{ds_version}-torch{torch.__version__}"
    )


def checkpoints(
    cache: str, kinds: tuple[str, ...], gib: float, ds_version: str
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per kind: the cached checkpoint's directory and its generation record.

    The missing ones are generated, all in one two-rank DeepSpeed run (one import and one
    process group for all; one engine per kind, in turn), each then cached apart.
    """
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    missing = []
    for kind in kinds:
        final = os.path.join(cache, cache_key(kind, gib, ds_version))
        record = os.path.join(final, "generated.json")
        if os.path.exists(record):
            with open(record) as f:
                out[kind] = (final, {**json.load(f), "cached": True})
        else:
            missing.append((kind, final))
    if not missing:
        return out
    os.makedirs(cache, exist_ok=True)
    works = {kind: f"{final}.tmp-{os.getpid()}" for kind, final in missing}
    ext = os.path.join(cache, f"torch_extensions.tmp-{os.getpid()}")
    env = {**ds_env(), "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": ext}
    shm_before = set(shm_buffers())
    try:
        args = ["gen"]
        for kind, _ in missing:
            shutil.rmtree(works[kind], ignore_errors=True)
            ckpt = os.path.join(works[kind], "checkpoint")
            args += ["--job", f"{kind}:{width_for(kind, gib)}:{ckpt}"]
        t0 = time.perf_counter()
        res = spawn_ranks(os.path.abspath(__file__), args, 2, 1800, env)
        seconds = time.perf_counter() - t0
        for kind, final in missing:
            work = works[kind]
            for name in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's script copies
                with_script = os.path.join(work, "checkpoint", name)
                if os.path.exists(with_script):
                    os.remove(with_script)
            d = width_for(kind, gib)
            info = {
                "kind": kind,
                "stage": 2 if kind == "z2" else 3,
                "params": n_params(kind, d),
                "tensors": n_tensors(kind),
                "width": d,
                "layers": LAYERS,
                "blocks": BLOCKS,
                # The whole run's wall time (start-up included), shared by the kinds it made.
                "generation_s": seconds,
                "generated_with": [k for k, _ in missing],
                **{
                    f"{what}_s": max(r["jobs"][kind][what] for r in res)
                    for what in ("build", "step", "save")
                },
                "bytes": dir_bytes(os.path.join(work, "checkpoint")),
                "deepspeed": ds_version,
                "torch": torch.__version__,
            }
            with open(os.path.join(work, "generated.json"), "w") as f:
                json.dump(info, f)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(work, final)
            out[kind] = (final, {**info, "cached": False})
    finally:
        shutil.rmtree(ext, ignore_errors=True)
        for work in works.values():
            shutil.rmtree(work, ignore_errors=True)
        for leak in set(shm_buffers()) - shm_before:  # never expected: the op is not built
            with contextlib.suppress(FileNotFoundError):  # another process's, removed by it
                os.remove(leak)
    return {kind: out[kind] for kind in kinds}


def ckpt_path(final: str) -> str:
    """The save_dir DeepSpeed wrote (with ``latest`` and the tag directory)."""
    return os.path.join(final, "checkpoint")


# ---------------------------------------------------------------------------------------------
# Generation: one rank


class Block(torch.nn.Module):
    """A pre-norm transformer block: 16 parameter tensors."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.heads = max(1, d // HEAD_DIM)
        self.ln1 = torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (
            lin(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for lin in (self.q, self.k, self.v)
        )
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def build(kind: str, d: int) -> tuple[torch.nn.Module, dict[str, Any], tuple[int, ...]]:
    """The ``kind`` model, its ``zero_optimization`` config and its input shape."""
    if kind == "z2":
        model = torch.nn.Sequential(*(torch.nn.Linear(d, d) for _ in range(LAYERS)))
        return model, {"stage": 2}, (MICRO_BS, d)
    model = torch.nn.Sequential(*(Block(d) for _ in range(BLOCKS)), torch.nn.LayerNorm(d))
    zero = {"stage": 3, "stage3_param_persistence_threshold": 4 * d + 1}
    return model, zero, (MICRO_BS, SEQ, d)


def gen_rank(jobs: list[tuple[str, int, str]], rank: int, port: int) -> dict[str, Any]:
    """One rank of the two-rank DeepSpeed run: for each (kind, width, save_dir) in turn, build
    a model and its engine, one step, ``engine.save_checkpoint``."""
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
    done: dict[str, dict[str, float]] = {}
    for kind, width, out in jobs:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model, zero, shape = build(kind, width)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = {
            "train_micro_batch_size_per_gpu": MICRO_BS,
            "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": zero,
            "bf16": {"enabled": True},
            "steps_per_print": 10**9,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        t2 = time.perf_counter()
        engine.save_checkpoint(out, tag=TAG)
        t3 = time.perf_counter()
        torch.distributed.barrier()
        done[kind] = {"build": t1 - t0, "step": t2 - t1, "save": t3 - t2}
        engine.destroy()
        del engine, model, opt
    return {"rank": rank, "jobs": done}


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


def minflt() -> int:
    """Minor page faults of this process so far (a mapped file page touched: one fault)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def settle() -> None:
    """Pay, before the clock, the full garbage collection the imports have made due.

    Importing torch leaves enough long-lived objects that the next allocation-heavy code pays
    one generation-2 collection (0.06-0.07 s here, measured with ``gc.callbacks``). DeepSpeed's
    child pays it inside ``import deepspeed``; zckpt's child, which does not import DeepSpeed,
    paid it inside the timed call. Both children collect here, so each row times its own work.
    """
    gc.collect()


def child(mode: str, path: str, hash_out: bool) -> dict[str, Any]:
    """One consolidation of ``path`` in this (fresh) process: seconds and peak MiB."""
    res: dict[str, Any] = {"mode": mode}
    if mode == "deepspeed":
        zf = importlib.import_module("deepspeed.utils.zero_to_fp32")
        phases: dict[str, list[float]] = {}

        def timing(name: str, fn: Any) -> Any:
            def wrapped(*a: Any, **k: Any) -> Any:
                t0, f0 = time.perf_counter(), minflt()
                try:
                    return fn(*a, **k)
                finally:
                    acc = phases.setdefault(name, [0.0, 0.0])
                    acc[0] += time.perf_counter() - t0
                    acc[1] += minflt() - f0

            return wrapped

        # Where DeepSpeed's time goes, by wrapping its own module-level functions: reading its
        # model-state files (torch.load), mapping its optimizer-state files (torch.load(mmap=
        # True)), to_torch_tensor (stage 3: every GatheredTensor's torch.cat of its partitions,
        # read through the mapping; stage 2: a no-op on tensors already built) and the rest
        # (stage 2: concatenating each group's partitions and slicing them into params).
        for name in ("parse_model_states", "parse_optim_states", "to_torch_tensor"):
            setattr(zf, name, timing(name, getattr(zf, name)))
        settle()
        f0 = minflt()
        with RssSampler() as rss:
            seconds, peak, out = timed_peak(
                lambda: zf.get_fp32_state_dict_from_zero_checkpoint(path)
            )
        res["minflt"] = minflt() - f0
        res["phases"] = phases
        res["parse_s"] = sum(
            v[0] for k, v in phases.items() if k in ("parse_model_states", "parse_optim_states")
        )
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
        # ``import zckpt`` imports its modules on first use (issue 14 part 4): the ones this
        # call runs are imported here, before the clock, as DeepSpeed's child imports
        # deepspeed.utils.zero_to_fp32 (and with it everything it calls) before its own.
        # zckpt.interop._deepspeed itself imports no torch (zckpt consolidate reads DeepSpeed
        # checkpoints without it): what its torch path runs is listed too.
        for name in (
            "zckpt.store._fp32",
            "zckpt.interop._deepspeed",
            "zckpt.interop._stream",
            "zckpt.interop._fastload",
            "zckpt.interop._refs",
            "zckpt.interop._pages",
            "zckpt.interop._mapped",
            "zckpt.assemble._consolidate",
            "zckpt.assemble._overlap",
            "torch._weights_only_unpickler",
            "zipfile",
        ):
            importlib.import_module(name)
        assert callable(zckpt.get_fp32_state_dict_from_zero_checkpoint)
        settle()

        if mode == "zckpt":
            fn = lambda: zckpt.get_fp32_state_dict_from_zero_checkpoint(path)  # noqa: E731
            f0 = minflt()
            with RssSampler() as rss:
                seconds, peak, out = timed_peak(fn)
            res["minflt"] = minflt() - f0
        else:
            largest = [0]

            def lazy() -> None:
                d = zckpt.get_fp32_state_dict_from_zero_checkpoint(path, lazy_mode=True)
                for k in list(d):
                    t = d[k].contiguous()
                    largest[0] = max(largest[0], t.numel() * t.element_size())
                    del t

            f0 = minflt()
            with RssSampler() as rss:
                seconds, peak, out = timed_peak(lazy)
            res["minflt"] = minflt() - f0
            res["largest"] = largest[0]
        res["imported_deepspeed"] = "deepspeed" in sys.modules
    res["s"], res["peak_mib"] = seconds, peak
    res["anon_peak_mib"], res["file_peak_mib"] = rss.anon, rss.file
    if out is not None:
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        res["out_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        res["largest"] = max(t.numel() * t.element_size() for t in tensors.values())
        res["n"] = len(tensors)
        # Not in the row's time: reading every output byte once after the call (a sum), which
        # shows what an output mapped from the files (zckpt's eager default) defers to first
        # use: page-cache faults instead of DeepSpeed's fresh-memory copy inside the call.
        t0 = time.perf_counter()
        for t in tensors.values():
            t.sum()
        res["first_read_s"] = time.perf_counter() - t0
        if hash_out:
            res["hashes"] = {k: tensor_hash(v) for k, v in tensors.items()}
    return res


_compiled: list[bool] = []


def precompile() -> None:
    """Compile zckpt's modules to ``__pycache__`` once (untimed), as installing it does.

    The children run zckpt from this checkout, where ``PYTHONDONTWRITEBYTECODE`` (if set)
    would have every child compile every module it imports anew (0.2-0.4 s), while torch and
    DeepSpeed are installed packages with their bytecode written at install time.
    """
    if not _compiled:
        import compileall

        compileall.compile_dir(os.path.join(os.path.dirname(HERE), "zckpt"), quiet=1)
        _compiled.append(True)


def run_child(
    mode: str, path: str, hash_out: bool = False, timeout: float = 1800
) -> dict[str, Any]:
    """``child`` in a fresh process; its result."""
    precompile()
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
    g.add_argument("--job", action="append", required=True, help="KIND:WIDTH:SAVE_DIR")
    g.add_argument("--rank", type=int, required=True)
    g.add_argument("--port", type=int, required=True)
    c = sub.add_parser("child")
    c.add_argument("mode", choices=("deepspeed", "zckpt", "lazy"))
    c.add_argument("path")
    c.add_argument("--hash", action="store_true")
    a = ap.parse_args()
    if a.cmd == "gen":
        jobs = [(k, int(w), out) for k, w, out in (j.split(":", 2) for j in a.job)]
        res = gen_rank(jobs, a.rank, a.port)
    else:
        res = child(a.mode, a.path, a.hash)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
