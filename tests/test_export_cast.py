"""Exports in a narrower dtype (``zckpt consolidate --dtype fp16|bf16``, ``export_safetensors``
with ``dtype=``): a finite value the cast would turn into ``inf`` is a :class:`CastError`
naming the tensor, and nothing is written; every other value is the cast's own, bit for bit.
Before, the export wrote ``inf`` and exited 0."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from dcp_support import dcp_save
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import zckpt
from zckpt.cli import main
from zckpt.format._dtypes import cast_values

FP16_MAX = torch.finfo(torch.float16).max

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
values = st.lists(st.one_of(finite32, st.just(math.inf), st.just(-math.inf), st.just(math.nan)),
                  min_size=1, max_size=40)  # fmt: skip


def _overflows(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool((t.isfinite() & t.to(dtype).isinf()).any())


@settings(max_examples=200, deadline=None)
@given(values, st.sampled_from([torch.float16, torch.bfloat16]))
@example([1e6], torch.float16)
@example([65519.0], torch.float16)  # rounds down to 65504, not inf: allowed
@example([65520.0], torch.float16)  # the first fp32 value that rounds to inf
@example([math.inf, -1.0, math.nan], torch.float16)  # infinities and NaN stay what they are
def test_cast_values_refuses_only_new_infinities(xs: list[float], dtype: torch.dtype) -> None:
    t = torch.tensor(xs, dtype=torch.float32)
    if _overflows(t, dtype):
        with pytest.raises(zckpt.CastError, match=r"^w: \d+ finite value\(s\)"):
            cast_values(t, dtype, "w")
    else:
        got = cast_values(t, dtype, "w")
        assert torch.equal(got.view(torch.int16), t.to(dtype).view(torch.int16))


def _save(d: Path, big: float) -> dict[str, torch.Tensor]:
    w = torch.linspace(-2, 2, 12).reshape(3, 4)
    b = torch.tensor([0.5, big, -0.25])
    s = {"module": {"w": w.bfloat16(), "b": b}, "master": {"w": w}}
    zckpt.save_checkpoint(d, s, zckpt.ZeroSpec(2, 2), tag="t")
    return {"w": w, "b": b}


@pytest.mark.parametrize("out", ["m.safetensors", "hf/", "m.pt"])
def test_consolidate_fp16_refuses_an_overflow_and_writes_nothing(
    tmp_path: Path, capsys: Any, out: str
) -> None:
    d = tmp_path / "ck"
    _save(d, 1e6)
    target = tmp_path / "exports" / out
    target.parent.mkdir()
    code = main(["consolidate", str(d), str(target), "--dtype", "fp16", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "b: 1 finite value(s)" in err and "overflow torch.float16" in err, err
    assert list(target.parent.iterdir()) == []  # no output, no temporary left


@pytest.mark.parametrize("out", ["m.safetensors", "m.pt"])
def test_consolidate_fp16_in_range_is_the_cast(tmp_path: Path, out: str) -> None:
    d = tmp_path / "ck"
    want = _save(d, FP16_MAX)
    target = tmp_path / out
    assert main(["consolidate", str(d), str(target), "--dtype", "fp16", "--quiet"]) == 0
    got = load_file(target) if out.endswith(".safetensors") else torch.load(target)
    for k, v in want.items():
        assert torch.equal(got[k], v.half()), k


def test_an_earlier_export_survives_the_refusal(tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "ck"
    _save(d, 1e6)
    target = tmp_path / "m.safetensors"
    assert main(["consolidate", str(d), str(target), "--quiet"]) == 0  # fp32: fits
    before = target.read_bytes()
    argv = ["consolidate", str(d), str(target), "--dtype", "fp16", "--overwrite", "--quiet"]
    assert main(argv) == 1
    assert target.read_bytes() == before


def test_export_safetensors_api_refuses(tmp_path: Path) -> None:
    from zckpt.interop import export_safetensors

    with pytest.raises(zckpt.CastError, match=r"^x: 1 finite"):
        export_safetensors({"x": torch.tensor([7e4])}, tmp_path / "x.safetensors", dtype="float16")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("out", ["m.safetensors", "m.pt"])
def test_dcp_consolidate_fp16_refuses(tmp_path: Path, capsys: Any, out: str) -> None:
    ck = tmp_path / "dcp"
    dcp_save({"model": {"w": torch.tensor([1.0, 2e5])}}, ck)
    target = tmp_path / "exports" / out
    target.parent.mkdir()
    assert main(["consolidate", str(ck), str(target), "--dtype", "fp16", "--quiet"]) == 1
    assert "overflow torch.float16" in capsys.readouterr().err
    assert list(target.parent.iterdir()) == []
