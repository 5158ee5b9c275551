"""End to end: tiny Hugging Face models trained by real DeepSpeed (2 gloo ranks on CPU, a
subprocess running tests/hf_ds_train.py), read back by zckpt and checked against DeepSpeed's own
output (``zero_to_fp32`` and its in-process accessors).

Per case:

1. ``zckpt consolidate DS_DIR out/ --max-shard-size 40KB`` + the config -> ``from_pretrained``
   gives logits equal (``torch.equal``) to a model loaded from ``zero_to_fp32``'s state dict
   (ZeRO-1 frozen and excluded frozen parameters: zero_to_fp32 has none, so the reference takes
   them from the trained model's own weights / the pretrained init).
2. ``convert_deepspeed`` -> ``Checkpointer(fp32 model, AdamW, LambdaLR).load_checkpoint`` at
   world size 1: parameters equal zero_to_fp32 bitwise; exp_avg, exp_avg_sq and step equal
   DeepSpeed's (``safe_get_full_optimizer_state``, gathered right after the save) bitwise; the
   learning rate and the scheduler's state equal the engine's.
3. One more step in plain PyTorch from the zckpt-resumed state equals (bitwise) the same step
   from DeepSpeed's state, and matches the DeepSpeed engine's own step 3 within
   :data:`hf_ds_train.NEXT_STEP_ATOL` (see there); scheduler state and learning rate after it
   equal the engine's.

World size 3 and ``ZeroAdamW`` resumes are tests/test_hf_deepspeed_resume.py (same runs).
The default run has 3 cases; the rest of the matrix is ``slow`` and scaled by ZCKPT_SLOW_SCALE.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="needs deepspeed==0.19.8 (DS_BUILD_OPS=0)")
transformers = pytest.importorskip("transformers", reason="needs transformers")

import hf_ds_train as T  # noqa: E402, N812  (beside this file; conftest puts tests/ on sys.path)

SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))

NEXT_STEP_ATOL = T.NEXT_STEP_ATOL

Case = T.Case
case_id = T.case_id
DEFAULT_CASES = T.DEFAULT_CASES
SLOW_CASES = T.slow_cases(SCALE)


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory: pytest.TempPathFactory):
    """case -> run dir, each DeepSpeed training run made once per session (shared with
    tests/test_hf_deepspeed_resume.py through hf_ds_train's cache)."""
    return lambda c: T.ds_run(c, tmp_path_factory)


def _zero_to_fp32(ds_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir))


def _logits(m: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) * 5 % 128
    m.eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def _frozen_keys(c: Case) -> list[str]:
    model, _, _, frozen, _ = c
    if not frozen:
        return []
    m = T.build_model(model, 0, True)
    return [n for n, p in m.named_parameters() if not p.requires_grad]


def plain(x: object) -> object:
    """``x`` as JSON gives it back (tuples as lists), to compare with the run's metadata."""
    return json.loads(json.dumps(x))


def plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched) -> None:
    """Step 3 in plain PyTorch: both DeepSpeed ranks' batches as one, loss, backward, the
    engine's gradient clipping, the optimizer step, the scheduler step."""
    ids = torch.cat([T.batch(T.STEPS + 1, r) for r in range(T.WORLD_SIZE)])
    model.train()
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], T.GRAD_CLIP)
    opt.step()
    sched.step()


def check_case(c: Case, run: Path, tmp_path: Path) -> None:
    import zckpt.cli
    from zckpt.adapters import Checkpointer
    from zckpt.interop import convert_deepspeed

    model_name, stage, dtype, frozen, excl = c
    ds_dir = run / "checkpoint"
    exp, meta = T.expected(run)
    ref_sd = _zero_to_fp32(ds_dir)
    frozen_keys = _frozen_keys(c)
    base = T.build_model(model_name, 0, frozen)  # the pretrained init training started from
    base_sd = base.state_dict()

    # ---- 1. consolidate -> from_pretrained == zero_to_fp32 -> load_state_dict -------------
    hf_dir = tmp_path / "hf"
    # the models are 0.1-0.2 MB in fp32: 40KB (not 200KB) makes several shards + an index
    rc = zckpt.cli.main(["consolidate", str(ds_dir), str(hf_dir) + "/", "--max-shard-size", "40KB"])
    assert rc in (0, None)
    shards = list(hf_dir.glob("*.safetensors"))
    assert len(shards) > 1, shards
    assert (hf_dir / "model.safetensors.index.json").exists()
    T.hf_config(model_name).save_pretrained(hf_dir)
    got = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    ref = T.build_model(model_name, 1, frozen)  # another seed: every value must come from ref_sd
    missing = set(ref.state_dict()) - set(ref_sd)
    ref.load_state_dict(ref_sd, strict=False)
    if excl:
        # neither side has the frozen block: both take it from the pretrained weights
        assert missing == set(frozen_keys)
        with torch.no_grad():
            for k in frozen_keys:
                ref.get_parameter(k).copy_(base_sd[k])
                got.get_parameter(k).copy_(base_sd[k])
    elif stage == 1 and frozen:
        # zero_to_fp32 drops ZeRO-1 frozen params; zckpt keeps them (the trained model's own)
        assert missing == set(frozen_keys)
        with torch.no_grad():
            for k in frozen_keys:
                ref.get_parameter(k).copy_(exp["module"][k].float())
    else:
        assert not missing, missing
    for k in frozen_keys:
        if not excl:
            # what training used: the module's frozen weight (training dtype), upcast
            assert torch.equal(got.get_parameter(k), exp["module"][k].float()), k
    assert torch.equal(_logits(got), _logits(ref))

    # ---- 2. convert_deepspeed -> Checkpointer resume == DeepSpeed's masters and AdamW state --
    conv = tmp_path / "zckpt"
    convert_deepspeed(ds_dir, conv)
    # seed 1 (not the training init) so a load that does nothing fails; the excluded frozen
    # block must come from the pretrained init, as in a real resume
    model = T.build_model(model_name, 0 if excl else 1, frozen)
    opt = T.make_optimizer(model)
    sched = T.make_scheduler(opt)
    ck = Checkpointer(model, opt, sched)
    path, _ = ck.load_checkpoint(str(conv))
    assert path is not None
    sd = model.state_dict()
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v.float()), k
    for k in frozen_keys:
        if stage == 1 and not excl:
            assert torch.equal(sd[k], exp["module"][k].float()), k
        elif excl:
            assert torch.equal(sd[k], base_sd[k]), k
    adam_step = meta["adam_step"]
    assert len(adam_step) == 1
    assert plain(sched.state_dict()) == meta["lr_scheduler"]
    assert [g["lr"] for g in opt.param_groups] == meta["lr"] != [T.LR]
    names = {p: n for n, p in model.named_parameters()}
    assert len(opt.state) == len(exp["exp_avg"])
    for p, st in opt.state.items():
        n = names[p]
        assert torch.equal(p.detach(), exp["fp32"][n]), n
        assert torch.equal(st["exp_avg"], exp["exp_avg"][n]), n
        assert torch.equal(st["exp_avg_sq"], exp["exp_avg_sq"][n]), n
        assert float(st["step"]) == adam_step[0] == T.STEPS, n

    # ---- 3. one more step, plain PyTorch, from zckpt's state and from DeepSpeed's ----------
    ds_model = T.build_model(model_name, 1, frozen)
    ds_model.load_state_dict({k: v.float() for k, v in ref_sd.items()}, strict=False)
    with torch.no_grad():
        for k in missing:
            ds_model.get_parameter(k).copy_(sd[k])  # checked above against DeepSpeed's module
    ds_opt = T.make_optimizer(ds_model)
    ds_names = {p: n for n, p in ds_model.named_parameters()}
    for p in ds_opt.param_groups[0]["params"]:
        n = ds_names[p]
        ds_opt.state[p] = {
            "step": torch.tensor(float(adam_step[0])),
            "exp_avg": exp["exp_avg"][n].clone(),
            "exp_avg_sq": exp["exp_avg_sq"][n].clone(),
        }
    ds_sched = T.make_scheduler(ds_opt)
    ds_sched.load_state_dict(dict(meta["lr_scheduler"]))  # it pops lr_lambdas
    for group, lr in zip(ds_opt.param_groups, meta["lr"]):
        group["lr"] = lr
    for m, o, s in ((model, opt, sched), (ds_model, ds_opt, ds_sched)):
        plain_step(m, o, s)
        assert plain(s.state_dict()) == meta["next_lr_scheduler"]
        assert [g["lr"] for g in o.param_groups] == meta["next_lr"]
    worst = 0.0
    for n, p in ds_model.named_parameters():
        if p.requires_grad:
            assert torch.equal(model.get_parameter(n), p), n
            worst = max(worst, (p.detach() - exp["next"][n]).abs().max().item())
    print(f"{case_id(c)}: max |torch step 3 - DeepSpeed engine step 3| = {worst:.3g}")
    assert worst <= NEXT_STEP_ATOL[dtype], (worst, NEXT_STEP_ATOL[dtype])
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("c", DEFAULT_CASES, ids=case_id)
def test_hf_deepspeed(c: Case, ds_runs, tmp_path: Path) -> None:
    check_case(c, ds_runs(c), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("c", SLOW_CASES, ids=case_id)
def test_hf_deepspeed_matrix(c: Case, ds_runs, tmp_path: Path) -> None:
    check_case(c, ds_runs(c), tmp_path)
