"""ZeroAdamW resuming a mixed-precision checkpoint (16-bit ``module``, fp32 ``master``) into an
fp32 model: the parameters must be the masters, as with a plain optimizer (issue 11, item 1).

Found by tests/test_hf_deepspeed_resume.py: ``Checkpointer(fp32 model, ZeroAdamW)`` loaded its
partitions from the masters but the parameters from the bf16 weights (3.7e-3 off DeepSpeed's
masters on the tiny GPT-2), without a warning; the next forward ran on the rounded weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import zckpt
from zckpt.adapters import Checkpointer, ZeroAdamW, optimizer_state
from zckpt.testing import ThreadComm, run_ranks


def _model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _loss(model: torch.nn.Module) -> torch.Tensor:
    return model(torch.linspace(-1, 1, 20).reshape(4, 5)).square().mean()


def _mixed_checkpoint(d: Path) -> dict[str, torch.Tensor]:
    """A bf16 run's checkpoint: bf16 module, fp32 masters, AdamW state; returns the masters."""
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, foreach=False)
    for _ in range(2):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    masters = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = {k: v.bfloat16() for k, v in model.state_dict().items()}
    assert any(not torch.equal(module[n].float(), m) for n, m in masters.items())
    state = {
        "module": module,
        "master": masters,
        "optimizer": optimizer_state(model, opt),
        "global_steps": 2,
    }
    zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(2, 2))
    return masters


@pytest.mark.parametrize("load_optimizer_states", [True, False])
@pytest.mark.parametrize("world_size", [1, 3])
def test_zero_adamw_fp32_model_resumes_from_the_masters(
    tmp_path: Path, world_size: int, load_optimizer_states: bool
) -> None:
    masters = _mixed_checkpoint(tmp_path)

    def rank(comm: ThreadComm) -> list[torch.Tensor]:
        model = _model(comm.rank + 1)
        opt = ZeroAdamW(model, rank=comm.rank, world_size=world_size,
                        all_gather=lambda out, part: None)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the exact choice warns about nothing lossy
            Checkpointer(model, opt, comm=comm).load_checkpoint(
                tmp_path, load_optimizer_states=load_optimizer_states
            )
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), masters[n]), (comm.rank, n)
        # the rank's master partition and its parameters agree (and so the next step's
        # forward runs on the weights the partitions update)
        for name, a, b, o in opt.layouts[0].pieces():
            got = opt.flat[0]["master"][o : o + (b - a)]
            assert torch.equal(got, masters[name].reshape(-1)[a:b]), (comm.rank, name)
        return [p.detach().clone() for p in model.parameters()]

    run_ranks(rank, world_size)


def test_zero_adamw_next_step_after_a_mixed_resume_is_torch_adamw(tmp_path: Path) -> None:
    _mixed_checkpoint(tmp_path)
    model, ref_model = _model(3), _model(4)
    opt = ZeroAdamW(model)
    ref = torch.optim.AdamW(ref_model.parameters(), foreach=False)
    Checkpointer(model, opt).load_checkpoint(tmp_path)
    Checkpointer(ref_model, ref).load_checkpoint(tmp_path)
    for m, o in ((model, opt), (ref_model, ref)):
        o.zero_grad()
        _loss(m).backward()
        o.step()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
