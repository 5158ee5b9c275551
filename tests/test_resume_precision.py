"""Mixed-precision resumes: fp32 destinations get the fp32 masters, lossy choices warn.

Issue 11, item 1: a bf16/fp16 run (DeepSpeed's or zckpt's) resumed into an fp32 model with a
plain PyTorch optimizer must take the masters, not the 16-bit module weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import zckpt
import zckpt.interop
from zckpt.adapters import Checkpointer, optimizer_state

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"


class Model(torch.nn.Module):
    """The fixtures' model (case.json 'model.text'), built in any dtype."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(101, 37)
        self.fc1 = torch.nn.Linear(37, 53)
        self.norm = torch.nn.LayerNorm(53)
        self.fc2 = torch.nn.Linear(53, 37)
        self.frozen_proj = torch.nn.Linear(37, 37, bias=False)
        self.head = torch.nn.Linear(37, 101)
        self.head.weight = self.embed.weight
        self.frozen_proj.weight.requires_grad_(False)
        self.register_buffer("pos_scale", torch.ones(37))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.to(dtype)


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() != 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    )


def _mixed_checkpoint(d: Path, *, masters: bool) -> dict[str, torch.Tensor]:
    """A zckpt checkpoint of a bf16 run: bf16 module, fp32 masters (when ``masters``), AdamW."""
    torch.manual_seed(0)
    model = Model()
    opt = _adamw(model)
    loss = model.head(model.fc2(model.norm(model.fc1(model.embed(torch.arange(8)))))).sum()
    loss.backward()
    opt.step()
    exact = {n: p.detach().clone() for n, p in model.named_parameters()}
    state: dict[str, Any] = {
        "module": {
            k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()
        },
        "optimizer": optimizer_state(model, opt),
        "global_steps": 1,
    }
    if masters:
        state["master"] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(2, 2))
    return exact


@pytest.mark.parametrize("load_optimizer_states", [True, False])
def test_fp32_model_resumes_from_the_masters(tmp_path: Path, load_optimizer_states: bool) -> None:
    exact = _mixed_checkpoint(tmp_path, masters=True)
    model = Model()
    ck = Checkpointer(model, _adamw(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact choice warns about nothing lossy
        ck.load_checkpoint(tmp_path, load_optimizer_states=load_optimizer_states)
    for name, p in model.named_parameters():
        if name == "frozen_proj.weight":
            assert torch.equal(p, exact[name].bfloat16().float())
        else:
            assert torch.equal(p, exact[name]), name
    assert model.head.weight is model.embed.weight  # still tied


def test_bf16_model_resumes_from_the_16_bit_weights(tmp_path: Path) -> None:
    exact = _mixed_checkpoint(tmp_path, masters=True)
    model = Model(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Checkpointer(model, _adamw(model)).load_checkpoint(tmp_path)
    for name, p in model.named_parameters():
        assert torch.equal(p, exact[name].bfloat16()), name


def test_fp32_model_without_masters_warns(tmp_path: Path) -> None:
    _mixed_checkpoint(tmp_path, masters=False)
    model = Model()
    with pytest.warns(UserWarning, match=r"9 fp32 parameter\(s\) restored from 16-bit weights"):
        Checkpointer(model, _adamw(model)).load_checkpoint(tmp_path)


def test_restore_training_state_prefers_masters(tmp_path: Path) -> None:
    exact = _mixed_checkpoint(tmp_path, masters=True)
    state = zckpt.load_checkpoint(tmp_path).state
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zckpt.restore_training_state(state, model, _adamw(model))
    assert torch.equal(model.fc1.weight, exact["fc1.weight"])


@pytest.mark.parametrize("case", ["z2_ws2_bf16", "z1_ws2_fp16", "z3_ws2_bf16"])
def test_deepspeed_run_resumes_into_fp32_torch_with_its_masters(tmp_path: Path, case: str) -> None:
    src = FIXTURES / case
    if not src.is_dir():
        pytest.skip(f"no DeepSpeed fixture {src}")
    zckpt.interop.convert_deepspeed(src / "checkpoint", tmp_path / "z")
    expected = load_file(src / "expected_optimizer.safetensors")
    meta = json.loads((src / "case.json").read_text())
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frozen parameters have no master, and need none
        Checkpointer(model, _adamw(model)).load_checkpoint(tmp_path / "z")
    trainable = [p["name"] for p in meta["model"]["named_parameters"] if p["requires_grad"]]
    for name in trainable:
        got = dict(model.named_parameters())[name]
        assert torch.equal(got, expected[f"fp32/{name}"]), name


def test_converted_exclude_frozen_checkpoint_loads_strictly(tmp_path: Path) -> None:
    src = FIXTURES / "z2_ws2_bf16_exclude_frozen"
    if not src.is_dir():
        pytest.skip(f"no DeepSpeed fixture {src}")
    zckpt.interop.convert_deepspeed(src / "checkpoint", tmp_path / "z")
    m = zckpt.open_checkpoint(tmp_path / "z").manifest
    assert m.excluded_frozen  # DeepSpeed records no names; zckpt records that they were left out
    model = Model()
    before = model.frozen_proj.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Checkpointer(model, _adamw(model)).load_checkpoint(tmp_path / "z")  # strict
    assert torch.equal(model.frozen_proj.weight, before)  # not in the checkpoint: left alone
    expected = load_file(src / "expected_optimizer.safetensors")
    assert torch.equal(model.fc1.weight, expected["fp32/fc1.weight"])
    other = torch.nn.Linear(2, 2)  # a parameter that is not frozen stays required
    with pytest.raises(zckpt.LoadError, match="missing"):
        Checkpointer(other).load_checkpoint(tmp_path / "z")


# --- casts the resume would make silently (issue 15 audit) ---------------------------------------


@pytest.mark.parametrize(
    ("case", "dtype"), [("z2_ws2_bf16", torch.float16), ("z1_ws2_fp16", torch.bfloat16)]
)
def test_a_16_bit_run_resumed_in_the_other_16_bit_dtype_says_so_and_rounds_the_masters(
    tmp_path: Path, case: str, dtype: torch.dtype
) -> None:
    """It was silent, and each weight was the saved 16-bit one rounded again (two roundings)."""
    src = FIXTURES / case
    if not src.is_dir():
        pytest.skip(f"no DeepSpeed fixture {src}")
    zckpt.interop.convert_deepspeed(src / "checkpoint", tmp_path / "z")
    expected = load_file(src / "expected_optimizer.safetensors")
    saved_dtype = torch.bfloat16 if dtype == torch.float16 else torch.float16
    for load in ("checkpointer", "restore"):
        model = Model(dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if load == "checkpointer":
                Checkpointer(model, _adamw(model)).load_checkpoint(tmp_path / "z")
            else:
                state = zckpt.load_checkpoint(tmp_path / "z").state
                zckpt.restore_training_state(state, model, _adamw(model))
        said = [str(w.message) for w in caught if "trained in another precision" in str(w.message)]
        assert said and f"{saved_dtype} -> {dtype}" in said[0], [str(w.message) for w in caught]
        for name, p in model.named_parameters():
            if name != "frozen_proj.weight":  # trainable: the master, rounded once
                assert torch.equal(p, expected[f"fp32/{name}"].to(dtype)), (load, name)


_DTYPES = [
    torch.bool,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


class _One(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("t", torch.zeros(4, dtype=dtype))


_values = st.lists(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True, width=64),
        st.sampled_from([1e6, -7e4, 65504.0, 65520.0, 2.0**24 + 1, 1.7, -3.9, 0.5, 3e38]),
    ),
    min_size=4,
    max_size=4,
)


@settings(deadline=None)
@given(src=st.sampled_from(_DTYPES), dst=st.sampled_from(_DTYPES), values=_values)
@example(src=torch.bfloat16, dst=torch.float16, values=[1e6, 0.0, 1.0, 2.0])  # was inf
@example(src=torch.float32, dst=torch.int32, values=[1.7, 2.5, -3.9, 0.0])  # was truncated
@example(src=torch.float32, dst=torch.bool, values=[0.2, 0.0, 3.0, 1.0])  # was True/False
@example(src=torch.int64, dst=torch.float32, values=[2.0**24 + 1, 1, 2, 3])  # was 2**24
def test_a_resume_never_casts_a_value_silently_wrong(
    src: torch.dtype, dst: torch.dtype, values: list[float]
) -> None:
    """A module tensor saved in one dtype and restored into another either loads with every
    finite value finite (exactly, or with a warning when the destination is less precise) or
    is refused with a LoadError naming it: never inf from a finite value, never a float
    truncated into an integer, never an integer rounded, without a word."""
    if src.is_floating_point:
        finfo = torch.finfo(src)
        saved = torch.tensor(values, dtype=torch.float64).clamp(finfo.min, finfo.max).to(src)
    else:
        lo, hi = (0, 1) if src == torch.bool else (torch.iinfo(src).min, torch.iinfo(src).max)
        ints = [
            int(min(max(v, lo), hi)) if v == v and abs(v) != float("inf") else 0 for v in values
        ]
        saved = torch.tensor(ints, dtype=torch.int64).to(src)
    model = _One(dst)
    refused: zckpt.LoadError | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            zckpt.restore_training_state({"module": {"t": saved}}, model)
        except zckpt.LoadError as e:
            refused = e
    if refused is not None:
        assert "module/t" in str(refused) and src != dst, refused
        assert torch.equal(model.t, torch.zeros(4, dtype=dst))  # nothing loaded
        return
    got = model.t
    assert src == dst or (src.is_floating_point and dst.is_floating_point), (src, dst)
    if src.is_floating_point:
        assert torch.equal(torch.isfinite(saved), torch.isfinite(got)), (saved, got)
    exact = src == dst or (
        src.is_floating_point
        and dst.is_floating_point
        and torch.finfo(dst).bits > torch.finfo(src).bits
        and torch.finfo(dst).max >= torch.finfo(src).max
    )
    if exact:
        assert torch.equal(got.to(src), saved) and not caught, (saved, got, caught)
    else:
        assert caught, (src, dst)  # less precise: it says so
