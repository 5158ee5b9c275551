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
