"""Bounded memory: fp32 consolidation in lazy mode stays near the largest tensor, not the total.

Peak resident memory is measured in a child process (``tests/peak_child.py``), so imports do not
hide what consolidation itself costs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peak_child import run_child

import zckpt

CHILD = r"""
import zckpt

path, mode = sys.argv[1], sys.argv[2]
sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(path, lazy_mode=True)
sd["warmup"].contiguous()            # load compiled kernels before the baseline
start()
if mode == "lazy":
    for name, t in sd.items():       # one tensor at a time, as a converter would
        x = t.contiguous()
        del x
else:
    full = zckpt.get_fp32_state_dict_from_zero_checkpoint(path)
done()
"""

N, ROWS, COLS = 24, 1024, 1024  # 24 tensors of 4 MiB fp32: 96 MiB of output


def run(path: Path, mode: str) -> float:
    return float(run_child(CHILD, path, mode)["growth_mib"])


def test_lazy_consolidation_peak_is_one_tensor_not_the_total(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    master = {f"p{i}": torch.randn(ROWS, COLS, generator=g) for i in range(N)}
    master["warmup"] = torch.randn(8)
    state = {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}
    zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(4, 2), tag="t")
    del state, master
    total_mib = N * ROWS * COLS * 4 / 2**20
    largest_mib = ROWS * COLS * 4 / 2**20
    eager = run(tmp_path, "eager")
    lazy = run(tmp_path, "lazy")
    assert eager >= 0.9 * total_mib, eager
    assert lazy <= largest_mib + 32, (lazy, eager)
