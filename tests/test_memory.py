"""Bounded memory: fp32 consolidation in lazy mode stays near the largest tensor, not the total.

Peak resident memory is measured in a child process (``tests/peak_child.py``), so imports do not
hide what consolidation itself costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peak_child import PREAMBLE, run_child

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


# Fresh output memory (issue 14, part 2): ZCKPT_ALLOC=prefault pre-faults new tensors, which stay
# ordinary tensors; the default is plain torch.empty.

ALLOC_CHILD = r"""
import torch
from zckpt.assemble._memory import strategy
from zckpt.assemble._overlap import new_tensor

mib = int(sys.argv[1])
new_tensor((1,), torch.float32, "warmup")
start()
t = new_tensor((mib << 18,), torch.float32, "t")   # mib MiB, not written by anyone yet
def rss():
    with open("/proc/self/status") as f:
        return [int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS:")][0]
after_alloc = rss()
del t
done(after_alloc=after_alloc - _base, after_free=rss() - _base, strategy=strategy())
"""


def _alloc_child(mib: int, **env: str) -> dict[str, Any]:
    script = PREAMBLE + ALLOC_CHILD
    out = subprocess.run(
        [sys.executable, "-c", script, str(mib)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_prefaulted_tensors_are_resident_and_freeing_frees_them() -> None:
    from zckpt.assemble._memory import _madvise

    if _madvise() is None:
        pytest.skip("no madvise here")
    got = _alloc_child(64, ZCKPT_ALLOC="prefault")
    if got["strategy"] != "prefault":
        pytest.skip("this kernel has no MADV_POPULATE_WRITE")
    assert got["after_alloc"] >= 60, got  # resident before anything wrote to it
    assert got["after_free"] <= 8, got  # and handed back to the system when freed


@pytest.mark.parametrize("value", ["", "plain"])
def test_plain_allocation_is_the_default(value: str) -> None:
    got = _alloc_child(64, ZCKPT_ALLOC=value)
    assert got["after_alloc"] <= 8, got  # torch.empty alone: nothing resident until written
    assert got["after_free"] <= 8, got


@pytest.mark.parametrize("value", ["plain", "prefault"])
def test_new_tensors_behave_like_ordinary_tensors(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zckpt.assemble._overlap import new_tensor

    monkeypatch.setenv("ZCKPT_ALLOC", value)
    t = new_tensor((512, 1024), torch.float32, "w")  # 2 MiB: pre-faulted
    assert t.is_contiguous() and t.dtype == torch.float32 and t.shape == (512, 1024)
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(512, 1024))
    want = t.clone()
    t.share_memory_()  # moved into shared memory, values kept
    assert t.is_shared() and torch.equal(t, want)
    model = torch.nn.Linear(1024, 512, bias=False)
    model.load_state_dict({"weight": new_tensor((512, 1024), torch.float32, "w").copy_(want)})
    assert torch.equal(model.weight, want)
    u = new_tensor((1 << 20,), torch.bfloat16, "u").fill_(1.5)
    assert float(u.float().sum()) == 1.5 * (1 << 20)
    if torch.cuda.is_available():  # pin_memory needs an accelerator
        p = new_tensor((1 << 20,), torch.float32, "p").fill_(2.0).pin_memory()
        assert p.is_pinned() and float(p[0]) == 2.0


@pytest.mark.parametrize("value", ["plain", "prefault"])
def test_loaded_and_consolidated_tensors_are_ordinary(
    tmp_path: Path, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZCKPT_ALLOC", value)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1 << 19, generator=g)  # 2 MiB: over the pre-fault threshold
    state = {"module": {"w": w.bfloat16()}, "master": {"w": w}}
    zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(2, 2), tag="t")
    got = zckpt.load_checkpoint(tmp_path).state
    assert torch.equal(got["master"]["w"], w)
    fp32 = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path)
    assert torch.equal(fp32["w"], w)
    fp32["w"].share_memory_()
    assert fp32["w"].is_shared() and torch.equal(fp32["w"], w)
