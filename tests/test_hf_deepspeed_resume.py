"""A DeepSpeed run (tests/hf_ds_train.py: tiny HF model, 2 gloo ranks) converted by
``convert_deepspeed`` and resumed at world sizes 1 and 3, with ``torch.optim.AdamW`` (every rank
a full replica) and with zckpt's ``ZeroAdamW`` (every rank only its flat partitions, laid out for
the new world size); ranks are threads with :class:`zckpt.testing.ThreadComm`. World size 1
with AdamW is tests/test_hf_deepspeed_e2e.py's part 2; the DeepSpeed runs are shared with it.

Per resume, on every rank:

1. right after ``Checkpointer.load_checkpoint``: trainable parameters equal DeepSpeed's fp32
   masters (``safe_get_full_fp32_param``) bitwise, frozen ones the module's weights (upcast) or,
   when the save excluded them, the pretrained init; ``exp_avg``/``exp_avg_sq`` (AdamW: per
   parameter; ZeroAdamW: each piece of the rank's partition, padding zero) and Adam's step equal
   DeepSpeed's bitwise; learning rates, the LambdaLR scheduler's state and ``global_steps``
   equal the engine's.
2. step 3, data parallel: the 4 sequences of DeepSpeed's step-3 batch dealt out to the ranks,
   each rank's loss weighted by its share, gradients summed over ranks in rank order (one
   all-gather), the engine's clipping, the optimizer and scheduler steps. The result equals
   **bitwise** a plain ``torch.optim.AdamW`` step from DeepSpeed's state (built from
   ``expected.safetensors``, no zckpt) given the same summed gradients: the resumed state and
   the partitioned arithmetic are exact. It equals a plain full-batch step within
   :data:`SPLIT_ATOL` (bitwise at world size 1), and the engine's own step 3 within
   ``hf_ds_train.NEXT_STEP_ATOL``; the scheduler's state and the learning rates equal the engine's
   after its step 3.

The default run resumes the 3 default DeepSpeed cases in every way; the rest is ``slow``, over
the same ZCKPT_SLOW_SCALE-scaled cases as the E2E module's matrix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed", reason="needs deepspeed==0.19.8 (DS_BUILD_OPS=0)")
pytest.importorskip("transformers", reason="needs transformers")

import hf_ds_train as T  # noqa: N812  (beside this file; conftest puts tests/ on sys.path)

from zckpt.adapters import Checkpointer, ZeroAdamW
from zckpt.testing import ThreadComm, run_ranks

SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))

#: |data-parallel step 3 at world size 3 - one full-batch step|, on the fp32 parameters. Both
#: run in fp32 from the same (bitwise checked) state; they differ only in how the batch's
#: gradient is summed: three partial batches' weighted losses back-propagated apart and added,
#: against one batch's mean, so the gradients differ by float32 rounding (~1e-7 relative), and
#: the updates (lr * m_hat/(sqrt(v_hat)+eps), lr = 6e-3) by far less than a parameter's last
#: bit; what shows is the parameter rounding one ulp the other way: 6e-8 for |p| in [0.5, 1),
#: 1.2e-7 in [1, 2) (norm weights). Measured 7.5e-9 (gpt2 z2 bf16), 1.1e-8 (gpt2 z1 fp32),
#: 6.0e-8 (llama z3 bf16), 1.2e-7 (llama z3 bf16 excl, one ulp of a norm weight); the same at
#: world size 3 with either optimizer. 1e-6 is ~8 ulps of a norm weight and 1e-4 of LR, so any
#: real error (a wrong weight, a lost rank, a stale parameter: each moves a step by ~lr) fails.
SPLIT_ATOL = 1e-6
#: vs the DeepSpeed engine's own step 3: see there.
NEXT_STEP_ATOL = T.NEXT_STEP_ATOL

RESUMES = [("adamw", 3), ("zero", 1), ("zero", 3)]  # ("adamw", 1) is the E2E module's part 2
Resume = tuple  # (case, optimizer kind, world size)


def resume_id(r: Resume) -> str:
    c, kind, ws = r
    return f"{T.case_id(c)}-{kind}-ws{ws}"


DEFAULT_RESUMES = [(c, k, ws) for c in T.DEFAULT_CASES for k, ws in RESUMES]
SLOW_RESUMES = [(c, k, ws) for c in T.slow_cases(SCALE) for k, ws in RESUMES]


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[T.Case], Path]:
    """case -> ``convert_deepspeed`` output of its DeepSpeed run, once per session."""
    from zckpt.interop import convert_deepspeed

    cache: dict[T.Case, Path] = {}

    def get(c: T.Case) -> Path:
        if c not in cache:
            out = tmp_path_factory.mktemp(f"conv_{T.case_id(c)}") / "zckpt"
            convert_deepspeed(T.ds_run(c, tmp_path_factory) / "checkpoint", out)
            cache[c] = out
        return cache[c]

    return get


def plain(x: object) -> object:
    """``x`` as JSON gives it back (tuples as lists), to compare with the run's metadata."""
    return json.loads(json.dumps(x))


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def step3_ids() -> torch.Tensor:
    """DeepSpeed's step-3 global batch: both of its ranks' micro-batches, in rank order."""
    return torch.cat([T.batch(T.STEPS + 1, r) for r in range(T.WORLD_SIZE)])


def local_grads(model: torch.nn.Module, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's share of step 3's gradient: its rows of the batch, its loss weighted by its
    share of the rows (every row has SEQ - 1 label tokens, so the shares add up to the mean)."""
    ids = step3_ids()
    mine = ids[rank::world_size]
    model.train()
    model.zero_grad()
    loss = model(input_ids=mine, labels=mine).loss * (len(mine) / len(ids))
    loss.backward()
    return [p.grad.detach().clone() for _, p in trainable(model)]


def apply_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, grads: list[torch.Tensor]
) -> None:
    """Step 3 given the summed gradients: the engine's clipping, optimizer step, scheduler step."""
    params = [p for _, p in trainable(model)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, T.GRAD_CLIP)
    opt.step()
    sched.step()


def deepspeed_replica(c: T.Case, exp: dict, meta: dict, base: dict) -> tuple[Any, Any, Any]:
    """A plain PyTorch model, AdamW and LambdaLR in DeepSpeed's state after step 2, built from
    what the engine itself reported (expected.safetensors), without zckpt."""
    model_name, _, _, frozen, excl = c
    model = T.build_model(model_name, 1, frozen)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(exp["fp32"][n])
            else:
                p.copy_(base[n] if excl else exp["module"][n].float())
    opt = T.make_optimizer(model)
    for n, p in trainable(model):
        opt.state[p] = {
            "step": torch.tensor(float(meta["adam_step"][0])),
            "exp_avg": exp["exp_avg"][n].clone(),
            "exp_avg_sq": exp["exp_avg_sq"][n].clone(),
        }
    sched = T.make_scheduler(opt)
    sched.load_state_dict(dict(meta["lr_scheduler"]))  # it pops lr_lambdas
    for group, lr in zip(opt.param_groups, meta["lr"]):
        group["lr"] = lr
    return model, opt, sched


def thread_all_gather(comm: ThreadComm) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``ZeroAdamW(all_gather=...)`` over threads: every rank's partition, in rank order."""

    def gather(out: torch.Tensor, part: torch.Tensor) -> None:
        out.copy_(torch.cat(comm.all_gather(part.clone())))

    return gather


def check_resume(r: Resume, run: Path, conv: Path) -> None:
    c, kind, ws = r
    model_name, _, dtype, frozen, excl = c
    exp, meta = T.expected(run)
    base = T.build_model(model_name, 0, frozen).state_dict()  # the pretrained init
    # seed 1 (not the training init) so a load that does nothing fails; the excluded frozen
    # block must come from the pretrained init, as in a real resume. Built here, not in the
    # threads: torch.manual_seed is process-wide.
    models = [T.build_model(model_name, 0 if excl else 1, frozen) for _ in range(ws)]

    def rank(comm: ThreadComm) -> dict[str, torch.Tensor]:
        model = models[comm.rank]
        opt: torch.optim.Optimizer
        if kind == "zero":
            gather = thread_all_gather(comm) if ws > 1 else None
            # hyperparameters (lr, betas, eps, weight decay) come from the checkpoint
            opt = ZeroAdamW(model, rank=comm.rank, world_size=ws, all_gather=gather)
        else:
            opt = T.make_optimizer(model)
        sched = T.make_scheduler(opt)
        ck = Checkpointer(model, opt, sched, comm=comm)
        path, _ = ck.load_checkpoint(str(conv))
        assert path is not None

        # ---- 1. the resumed state is DeepSpeed's, bitwise ---------------------------------
        where = f"rank {comm.rank} of {ws}"
        for n, p in model.named_parameters():
            if p.requires_grad:
                want = exp["fp32"][n]
            else:
                want = base[n] if excl else exp["module"][n].float()
            assert torch.equal(p.detach(), want), (where, n)
        assert ck.global_steps == T.STEPS
        assert plain(sched.state_dict()) == meta["lr_scheduler"], where
        assert [g["lr"] for g in opt.param_groups] == meta["lr"], where
        (adam_step,) = meta["adam_step"]
        if isinstance(opt, ZeroAdamW):
            assert opt.steps == [adam_step] == [T.STEPS], where
            (lay,) = opt.layouts
            assert lay.padded_numel == ws * (lay.stop - lay.start), where  # 1/ws of it
            covered = 0
            for name, a, b, o in lay.pieces():
                for kind_, src in (("master", "fp32"), ("exp_avg", "exp_avg"),
                                   ("exp_avg_sq", "exp_avg_sq")):  # fmt: skip
                    got = opt.flat[0][kind_][o : o + (b - a)]
                    assert torch.equal(got, exp[src][name].reshape(-1)[a:b]), (where, kind_, name)
                covered += b - a
            for buf in opt.flat[0].values():  # the rest of the partition is tail padding
                assert not buf[covered:].any(), where
        else:
            names = {p: n for n, p in model.named_parameters()}
            assert len(opt.state) == len(exp["exp_avg"]), where
            for p, st in opt.state.items():
                n = names[p]
                assert torch.equal(st["exp_avg"], exp["exp_avg"][n]), (where, n)
                assert torch.equal(st["exp_avg_sq"], exp["exp_avg_sq"][n]), (where, n)
                assert float(st["step"]) == adam_step == T.STEPS, (where, n)

        # ---- 2. step 3, data parallel over the ranks -------------------------------------
        mine = local_grads(model, comm.rank, ws)
        every = comm.all_gather(mine)
        summed = [sum(gs[1:], gs[0].clone()) for gs in zip(*every)]  # rank order, every rank
        apply_step(model, opt, sched, summed)
        assert plain(sched.state_dict()) == meta["next_lr_scheduler"], where
        assert [g["lr"] for g in opt.param_groups] == meta["next_lr"], where
        out = {n: p.detach().clone() for n, p in trainable(model)}
        out.update({f"grad/{n}": g for (n, _), g in zip(trainable(model), summed)})
        if isinstance(opt, ZeroAdamW):
            (lay,) = opt.layouts
            for name, a, b, o in lay.pieces():
                for k in ("exp_avg", "exp_avg_sq"):
                    out[f"{k}/{name}/{a}"] = opt.flat[0][k][o : o + (b - a)].clone()
        return out

    results = run_ranks(rank, ws, timeout=300)

    # every replica holds the same parameters after the step (ZeroAdamW: the gathered masters)
    first = results[0]
    for got in results[1:]:
        for n, _ in trainable(models[0]):
            assert torch.equal(got[n], first[n]), n

    # the same step in plain PyTorch from DeepSpeed's state, given the same summed gradients
    ref_model, ref_opt, ref_sched = deepspeed_replica(c, exp, meta, base)
    apply_step(ref_model, ref_opt, ref_sched, [first[f"grad/{n}"] for n, _ in trainable(ref_model)])
    for n, p in trainable(ref_model):
        assert torch.equal(first[n], p.detach()), n
    for got in results:  # ZeroAdamW: every rank's moments after the step
        for key, t in got.items():
            k, sep, rest = key.partition("/")
            if k in ("exp_avg", "exp_avg_sq") and sep:
                name, a = rest.rsplit("/", 1)
                st = ref_opt.state[ref_model.get_parameter(name)][k].reshape(-1)
                assert torch.equal(t, st[int(a) : int(a) + len(t)]), key
    assert plain(ref_sched.state_dict()) == meta["next_lr_scheduler"]

    # and within rounding of one plain full-batch step; within NEXT_STEP_ATOL of the engine's
    full_model, full_opt, full_sched = deepspeed_replica(c, exp, meta, base)
    grads = local_grads(full_model, 0, 1)
    apply_step(full_model, full_opt, full_sched, grads)
    split = max((first[n] - p.detach()).abs().max().item() for n, p in trainable(full_model))
    engine = max((first[n] - exp["next"][n]).abs().max().item() for n, _ in trainable(full_model))
    print(f"{resume_id(r)}: max |step 3 - full-batch step| = {split:.3g}, "
          f"|step 3 - DeepSpeed engine step 3| = {engine:.3g}")  # fmt: skip
    if ws == 1:
        assert split == 0.0
    assert split <= SPLIT_ATOL, (split, SPLIT_ATOL)
    assert engine <= NEXT_STEP_ATOL[dtype], (engine, NEXT_STEP_ATOL[dtype])


@pytest.mark.parametrize("r", DEFAULT_RESUMES, ids=resume_id)
def test_resume_converted_deepspeed(r: Resume, converted, tmp_path_factory) -> None:
    check_resume(r, T.ds_run(r[0], tmp_path_factory), converted(r[0]))


@pytest.mark.slow
@pytest.mark.parametrize("r", SLOW_RESUMES, ids=resume_id)
def test_resume_converted_deepspeed_matrix(r: Resume, converted, tmp_path_factory) -> None:
    check_resume(r, T.ds_run(r[0], tmp_path_factory), converted(r[0]))
