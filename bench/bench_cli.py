"""Start-up time of the ``zckpt`` command (issue 14 part 4): each command is a new process.

For every row: the median (min-max) wall time of ``--reps`` new processes, from ``fork`` to exit,
stdout discarded; the median CPU time (user + system, from the children's rusage: what the
process itself costs, less sensitive than wall time to other load on the machine); and whether
torch, Numba or NumPy was imported (a separate run of the same command through
``zckpt.cli.main`` that then looks at ``sys.modules``).

The zckpt rows run the installed ``zckpt`` console script when it is next to this Python (what a
user types), else its body (``from zckpt.cli import main; main()``) with ``python -c``. The
checkpoint is small: a model's bf16 weights, fp32 masters and Adam moments of about 1 MiB, world
size 2, two committed tags, a plain client_state. Reference rows: ``python -c pass`` (the
interpreter and ``site``, here including the editable install's finder), ``import zckpt`` and
``import torch``.

Bytecode: an installed package runs from compiled bytecode (pip writes ``__pycache__`` when it
installs; an editable install's first run does). The children get a bytecode cache of their
own (``PYTHONPYCACHEPREFIX`` in the temporary directory, ``PYTHONDONTWRITEBYTECODE`` unset),
which the untimed first round fills, so the rows time what a user's shell waits for.
``--no-bytecode`` times the other case, ``PYTHONDONTWRITEBYTECODE=1`` (what the environment of
this project's VM sets): every module without a ``__pycache__`` (zckpt's own, in a checkout that
has none) is compiled from source on each start.

    OMP_NUM_THREADS=1 python bench/bench_cli.py --reps 11 [--no-bytecode] [--out F.md]

bench/suite.py runs the same rows as its ``cli`` group (:func:`measure`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: (row name, target seconds or None) in report order; the command of each is in _commands.
ROWS: tuple[tuple[str, float | None], ...] = (
    ("python -c pass", None),
    ('python -c "import zckpt"', None),
    ('python -c "import torch"', None),
    ("zckpt --help", 0.3),
    ("zckpt --version", 0.3),
    ("zckpt inspect CKPT", 0.6),
    ("zckpt verify CKPT", 0.6),
    ("zckpt prune CKPT --keep-last 2", 0.6),
)
HEAVY = ("torch", "numba")
#: Also reported, not part of the suite's torch/Numba verdict: a small checkpoint needs no NumPy.
ALSO = ("numpy",)


class Measured(NamedTuple):
    """One row: wall times of new processes, and the heavy modules the command imported."""

    name: str
    times: list[float]
    cpu: list[float]
    imported: list[str] | None  # None: not a zckpt command (nothing checked)
    goal: float | None
    also: list[str] | None = None  # which of ALSO it imported (None: not checked)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def small_checkpoint(path: str) -> None:
    """Two committed tags of a small training state (needs torch: run in this process)."""
    import torch

    import zckpt

    g = torch.Generator().manual_seed(0)
    master = {f"layer{i}.weight": torch.randn(256, 64, generator=g) for i in range(4)}
    state = {
        "module": {k: v.bfloat16() for k, v in master.items()},
        "master": master,
        "optimizer": {
            "state": {k: {"exp_avg": v * 0, "exp_avg_sq": v * 0} for k, v in master.items()}
        },
        "global_steps": 10,
    }
    for tag in ("global_step10", "global_step20"):
        zckpt.save_checkpoint(path, state, zckpt.ZeroSpec(2, 2), tag=tag, client_state={"epoch": 1})


def _zckpt_argv() -> tuple[list[str], str]:
    script = os.path.join(os.path.dirname(sys.executable), "zckpt")
    if os.path.exists(script):
        return [script], f"the console script {script}"
    body = "import sys; from zckpt.cli import main; sys.exit(main())"
    return [sys.executable, "-c", body], "python -c 'from zckpt.cli import main; main()'"


def _commands(ckpt: str) -> dict[str, tuple[list[str], list[str] | None]]:
    """Row name -> (argv of the new process, argv for zckpt.cli.main or None)."""
    z, _ = _zckpt_argv()
    py = sys.executable
    out: dict[str, tuple[list[str], list[str] | None]] = {
        "python -c pass": ([py, "-c", "pass"], None),
        'python -c "import zckpt"': ([py, "-c", "import zckpt"], None),
        'python -c "import torch"': ([py, "-c", "import torch"], None),
    }
    for name, _goal in ROWS[3:]:
        args = name.removeprefix("zckpt ").replace("CKPT", ckpt).split()
        out[name] = ([*z, *args], args)
    return out


_CHECK = (
    "import json, sys; from zckpt.cli import main; rc = main(sys.argv[1:]); "
    f"print(json.dumps([m for m in {HEAVY + ALSO!r} if m in sys.modules])); sys.exit(rc)"
)


def _env(tmp: str, bytecode: bool) -> dict[str, str]:
    """The children's environment: their own bytecode cache under ``tmp``, or none at all."""
    env = dict(os.environ)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def _imported(args: list[str], env: dict[str, str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, *args], capture_output=True, text=True, check=True, env=env
    )
    found: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


def _time(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of one new process running ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def measure(reps: int, root: str | None = None, *, bytecode: bool = True) -> list[Measured]:
    """Every row of :data:`ROWS`, ``reps`` new processes each (interleaved: one process per row
    per round, so a burst of load on the machine spreads over all rows). ``bytecode``: the
    children run from a bytecode cache (module docstring), else compile every module."""
    tmp = tempfile.mkdtemp(prefix="zckpt-cli-", dir=root)
    try:
        ckpt = os.path.join(tmp, "ckpt")
        small_checkpoint(ckpt)
        cmds = _commands(ckpt)
        env = _env(tmp, bytecode)
        for argv, _ in cmds.values():  # once untimed: the page cache holds every file (and
            _time(argv, env)  # the bytecode cache every module)
        times: dict[str, list[float]] = {name: [] for name, _ in ROWS}
        cpu: dict[str, list[float]] = {name: [] for name, _ in ROWS}
        for _ in range(reps):
            for name, _goal in ROWS:
                wall, used = _time(cmds[name][0], env)
                times[name].append(wall)
                cpu[name].append(used)
        out = []
        for name, goal in ROWS:
            args = cmds[name][1]
            found = None if args is None else _imported(args, env)
            heavy = None if found is None else [m for m in found if m in HEAVY]
            also = None if found is None else [m for m in found if m in ALSO]
            out.append(Measured(name, times[name], cpu[name], heavy, goal, also))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(rows: list[Measured], bytecode: bool = True) -> list[str]:
    """A markdown table: median (min-max), goal, verdict, and what the command imported."""
    _, how = _zckpt_argv()
    cache = (
        "from a bytecode cache (filled by an untimed first round)"
        if bytecode
        else "compiling every module from source (no bytecode cache)"
    )
    lines = [
        f"New processes, medians of {len(rows[0].times)}; zckpt runs as {how}, {cache}.",
        "",
        "| command | s median (min-max) | CPU s median | goal | verdict | imports torch/Numba "
        "| imports NumPy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = f"<= {r.goal} s" if r.goal is not None else ""
        verdict = "" if r.goal is None else ("met" if r.median <= r.goal else "missed")
        heavy = "" if r.imported is None else (", ".join(r.imported) or "neither")
        numpy = "" if r.also is None else ("yes" if r.also else "no")
        lines.append(
            f"| {r.name} | {r.median:.3f} ({min(r.times):.3f}-{max(r.times):.3f}) | "
            f"{statistics.median(r.cpu):.3f} | {goal} | {verdict} | {heavy} | {numpy} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=11, help="processes per row (default 11)")
    ap.add_argument("--dir", default=None, help="parent of the temporary checkpoint")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument(
        "--no-bytecode",
        action="store_true",
        help="compile every module from source on each start (default: a bytecode cache)",
    )
    args = ap.parse_args(argv)
    load = os.getloadavg()
    lines = [
        f"Command: `python bench/bench_cli.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}",
        *report(measure(args.reps, args.dir, bytecode=not args.no_bytecode), not args.no_bytecode),
    ]
    load = os.getloadavg()
    lines.append(f"\nLoad average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
