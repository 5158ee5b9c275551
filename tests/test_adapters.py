"""Adapters for PyTorch training loops, in one process: state keyed by names, tied parameters,
buffers, frozen parameters, the DeepSpeed-named Checkpointer, bad values, and the reference
ZeRO optimizer (several ranks as threads)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.adapters import (
    Checkpointer,
    ZeroAdamW,
    frozen_names,
    load_partitions,
    optimizer_state,
    restore_training_state,
    spec_for,
    training_state,
    zero_shard,
)
from zckpt.testing import ThreadComm, assert_states_equal, run_ranks


class Net(torch.nn.Module):
    """Two layers, a 0-d parameter, tied input/output embeddings, a persistent and a
    non-persistent buffer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(7, 4)
        self.fc = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.head(torch.tanh(self.fc(self.emb(x)))) * self.scale
        return out


def make(seed: int = 0, lr: float = 0.02) -> tuple[Net, torch.optim.Optimizer, Any]:
    model = Net(seed)
    decay = [model.fc.weight, model.emb.weight]
    rest = [model.fc.bias, model.scale]
    opt = torch.optim.AdamW(
        [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}], lr=lr
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=50)
    return model, opt, sched


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 7, (6, 5), generator=g), torch.randint(0, 7, (6, 5), generator=g)


def train(model: Net, opt: torch.optim.Optimizer, sched: Any, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def test_state_is_keyed_by_parameter_names() -> None:
    model, opt, sched = make()
    train(model, opt, sched, range(2))
    state = training_state(model, opt, sched, global_steps=2)
    assert list(state["optimizer"]["state"]) == ["fc.bias", "scale", "fc.weight", "emb.weight"]
    assert [g["params"] for g in state["optimizer"]["param_groups"]] == [
        ["fc.bias", "scale"],
        ["fc.weight", "emb.weight"],
    ]
    assert state["optimizer"]["param_groups"][1]["weight_decay"] == 0.1
    assert (
        state["optimizer"]["state"]["fc.weight"]["exp_avg"] is opt.state[model.fc.weight]["exp_avg"]
    )  # a view of the optimizer's own tensor, nothing copied
    spec = spec_for(model, opt, world_size=3)
    assert spec.param_groups == (("fc.bias", "scale"), ("fc.weight", "emb.weight"))
    # Every exp_avg of one param group is one flat buffer, in the group's order.
    plan = zckpt.plan_shards(state, spec)
    keys = sorted(g.key for g in plan.groups)
    assert "optimizer/state/exp_avg[torch.float32, group 1]" in keys


def test_restore_matches_names_not_indices(tmp_path: Path) -> None:
    model, opt, sched = make()
    train(model, opt, sched, range(3))
    zckpt.save_checkpoint(
        tmp_path, training_state(model, opt, sched, global_steps=3), spec_for(model, opt, 2)
    )
    # A fresh optimizer listing the parameters of each group in another order.
    model2, _, _ = make(seed=5)
    opt2 = torch.optim.AdamW(
        [
            {"params": [model2.scale, model2.fc.bias], "weight_decay": 0.0},
            {"params": [model2.emb.weight, model2.fc.weight], "weight_decay": 0.1},
        ]
    )
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=0.02, total_steps=50)
    got = restore_training_state(zckpt.load_checkpoint(tmp_path).state, model2, opt2, sched2)
    assert got.global_steps == 3
    for p, p2 in [(model.scale, model2.scale), (model.emb.weight, model2.emb.weight)]:
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"])
        assert torch.equal(p, p2)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.state_dict() == sched.state_dict()


def test_resume_is_exact(tmp_path: Path) -> None:
    model, opt, sched = make()
    train(model, opt, sched, range(3))
    Checkpointer(model, opt, sched).save_checkpoint(tmp_path, tag="s3")
    expected = train(model, opt, sched, range(3, 7))

    model2, opt2, sched2 = make(seed=9)
    ckpt = Checkpointer(model2, opt2, sched2)
    assert ckpt.load_checkpoint(tmp_path) == (str(tmp_path / "s3"), {})
    assert train(model2, opt2, sched2, range(3, 7)) == expected  # exactly: float ==
    assert_states_equal(training_state(model2, opt2, sched2), training_state(model, opt, sched))


def test_tied_parameters_are_saved_once_and_stay_tied(tmp_path: Path) -> None:
    model, opt, sched = make()
    train(model, opt, sched, range(2))
    Checkpointer(model, opt, sched).save_checkpoint(tmp_path, tag="t")
    skel = zckpt.open_checkpoint(tmp_path).manifest.skeleton
    tied = [
        leaf for path, leaf in skel.tensor_paths() if path[0] == "module" and "weight" in path[1]
    ]
    names = [path[1] for path, _ in skel.tensor_paths() if path[0] == "module"]
    assert "emb.weight" in names and "head.weight" in names
    assert len(tied) == 3 and len(set(tied)) == 2  # emb/head share one leaf, fc.weight its own

    model2, opt2, sched2 = make(seed=3)
    Checkpointer(model2, opt2, sched2).load_checkpoint(tmp_path)
    assert model2.head.weight is model2.emb.weight
    assert torch.equal(model2.emb.weight, model.emb.weight)


def test_only_persistent_buffers_are_saved(tmp_path: Path) -> None:
    model, opt, sched = make()
    train(model, opt, sched, range(2))
    module = training_state(model)["module"]
    assert "calls" in module and "cache" not in module
    Checkpointer(model).save_checkpoint(tmp_path, tag="t")
    model2 = Net(seed=4)
    model2.cache.fill_(7.0)
    Checkpointer(model2).load_checkpoint(tmp_path)
    assert model2.calls.item() == 2
    assert model2.cache.tolist() == [7.0, 7.0, 7.0]  # not part of the state: left alone


def test_frozen_parameters(tmp_path: Path) -> None:
    model, opt, sched = make()
    model.fc.weight.requires_grad_(False)
    assert frozen_names(model) == ("fc.weight",)
    Checkpointer(model, opt, sched).save_checkpoint(tmp_path, tag="all")
    Checkpointer(model, opt, sched, existing="keep").save_checkpoint(
        tmp_path, tag="trainable", exclude_frozen_parameters=True
    )
    m = zckpt.open_checkpoint(tmp_path, "trainable").manifest
    assert m.frozen == ("fc.weight",) and m.excluded_frozen
    assert "fc.weight" not in zckpt.load_checkpoint(tmp_path, tag="trainable").state["module"]
    assert "fc.weight" in zckpt.load_checkpoint(tmp_path, tag="all").state["module"]

    # Strict loading accepts the frozen parameters the save left out on purpose (they come
    # from the pretrained weights), and nothing else.
    model2, opt2, sched2 = make(seed=6)
    before = model2.fc.weight.clone()
    Checkpointer(model2, opt2, sched2).load_checkpoint(tmp_path, tag="trainable")
    assert torch.equal(model2.fc.weight, before)
    assert torch.equal(model2.fc.bias, model.fc.bias)


def test_checkpointer_load_flags(tmp_path: Path) -> None:
    model, opt, sched = make()
    ckpt = Checkpointer(model, opt, sched)
    train(model, opt, sched, range(2))
    ckpt.global_steps = 2
    ckpt.save_checkpoint(tmp_path, client_state={"epoch": 1, "rng": torch.arange(3)})

    def fresh() -> tuple[Net, torch.optim.Optimizer, Any, Checkpointer]:
        m, o, s = make(seed=8, lr=0.5)
        return m, o, s, Checkpointer(m, o, s)

    m2, o2, s2, c2 = fresh()
    path, client = c2.load_checkpoint(tmp_path, load_optimizer_states=False)
    assert path == str(tmp_path / "global_step2") and client is not None
    assert client["epoch"] == 1 and client["rng"].tolist() == [0, 1, 2]
    assert not o2.state and o2.param_groups[0]["lr"] != opt.param_groups[0]["lr"]
    assert s2.last_epoch == sched.last_epoch and c2.global_steps == 2

    m2, o2, s2, c2 = fresh()
    c2.load_checkpoint(tmp_path, load_lr_scheduler_states=False)
    assert o2.state and s2.last_epoch == 0

    m2, o2, s2, c2 = fresh()
    c2.load_checkpoint(tmp_path, load_module_only=True)
    assert torch.equal(m2.fc.weight, model.fc.weight)
    assert not o2.state and s2.last_epoch == 0 and c2.global_steps == 0

    m2, o2, s2, c2 = fresh()
    seen: dict[str, Any] = {}
    c2.load_checkpoint(tmp_path, custom_load_fn=lambda src, dst: seen.update(src=src, dst=dst))
    assert seen["dst"] is m2 and torch.equal(seen["src"]["fc.weight"], model.fc.weight)
    assert not torch.equal(m2.fc.weight, model.fc.weight)  # custom_load_fn replaced the loading

    other = torch.nn.Linear(4, 4)
    with pytest.raises(zckpt.LoadError, match=r"missing \['weight', 'bias'\]"):
        Checkpointer(other).load_checkpoint(tmp_path)
    Checkpointer(other).load_checkpoint(tmp_path, load_module_strict=False)

    (tmp_path / "empty").mkdir()
    assert Checkpointer(model).load_checkpoint(tmp_path / "empty") == (None, None)
    with pytest.raises(zckpt.CheckpointNotFoundError):
        Checkpointer(model).load_checkpoint(tmp_path, tag="nope")


def test_optimizer_groups_must_match(tmp_path: Path) -> None:
    model, opt, sched = make()
    train(model, opt, sched, range(1))
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="t")
    model2 = Net()
    one_group = torch.optim.AdamW(model2.parameters())
    with pytest.raises(zckpt.LoadError, match="2 param groups, the optimizer 1"):
        Checkpointer(model2, one_group).load_checkpoint(tmp_path)
    swapped = torch.optim.AdamW(
        [
            {"params": [model2.fc.weight, model2.scale]},
            {"params": [model2.emb.weight, model2.fc.bias]},
        ]
    )
    with pytest.raises(zckpt.LoadError, match="param_groups/0: parameters differ"):
        Checkpointer(model2, swapped).load_checkpoint(tmp_path)


def test_values_zckpt_cannot_store_are_refused_with_their_path(tmp_path: Path) -> None:
    model, opt, sched = make()
    train(model, opt, sched, range(1))
    opt.state[model.fc.bias]["seen"] = {1, 2}  # a set: not storable
    with pytest.raises(zckpt.StateError, match=r"optimizer/state/fc\.bias/seen: .*builtins\.set"):
        Checkpointer(model, opt, sched).save_checkpoint(tmp_path, tag="a")
    del opt.state[model.fc.bias]["seen"]
    sched.custom = object()  # type: ignore[attr-defined]
    with pytest.raises(zckpt.StateError, match="lr_scheduler/custom"):
        Checkpointer(model, opt, sched).save_checkpoint(tmp_path, tag="b")
    with pytest.raises(zckpt.StateError, match="client_state"):
        Checkpointer(model).save_checkpoint(tmp_path, tag="c", client_state={"f": print})
    assert not list(tmp_path.glob("*/manifest.zckm"))


def test_optimizer_foreign_tensor_is_refused() -> None:
    model = Net()
    opt = torch.optim.SGD([*model.parameters(), torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(zckpt.StateError, match=r"params/4: a tensor of shape \[2\]"):
        optimizer_state(model, opt)


# -- the reference ZeRO optimizer ---------------------------------------------------------------


def zero_groups(model: Net) -> list[dict[str, Any]]:
    return [
        {"params": [model.fc.bias, model.scale], "weight_decay": 0.0},
        {"params": [model.fc.weight, model.emb.weight], "weight_decay": 0.1},
    ]


def test_zero_adamw_is_bitwise_torch_adamw() -> None:
    model, _, _ = make()
    ref_model = copy.deepcopy(model)
    opt = ZeroAdamW(model, zero_groups(model), lr=0.02)
    ref = torch.optim.AdamW(zero_groups(ref_model), lr=0.02, foreach=False)
    a = train(model, opt, torch.optim.lr_scheduler.OneCycleLR(opt, 0.02, total_steps=9), range(4))
    b = train(
        ref_model, ref, torch.optim.lr_scheduler.OneCycleLR(ref, 0.02, total_steps=9), range(4)
    )
    assert a == b
    assert_states_equal(model.state_dict(), ref_model.state_dict())


def zero_at(world_size: int, rank: int, seed: int = 0) -> tuple[Net, ZeroAdamW]:
    model = Net(seed)

    def no_gather(out: torch.Tensor, part: torch.Tensor) -> None:
        raise AssertionError("these tests do not step at world size > 1")

    gather = None if world_size == 1 else no_gather
    opt = ZeroAdamW(model, zero_groups(model), rank=rank, world_size=world_size, all_gather=gather)
    return model, opt


def full_flat(opts: list[ZeroAdamW], g: int, kind: str) -> torch.Tensor:
    """The group's unpadded flat buffer, from every rank's partition."""
    lay = opts[0].layouts[g]
    numel = lay.offsets[-1] + lay.numels[-1]
    return torch.cat([o.flat[g][kind] for o in opts])[:numel]


def test_zero_partitions_save_and_load_at_other_world_sizes(tmp_path: Path) -> None:
    model, opt = zero_at(1, 0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    train(model, opt, sched, range(3))
    ck = Checkpointer(model, opt, sched)
    ck.global_steps = 3
    ck.save_checkpoint(tmp_path / "ws1")

    # Load at world size 3, each rank only its partitions; save from the partitions (ranks as
    # threads, each writing its own shard); load that at world size 2.
    ranks3 = [zero_at(3, r, seed=r + 1) for r in range(3)]
    for _, o in ranks3:
        load_partitions(o, zckpt.open_checkpoint(tmp_path / "ws1"))
        assert o.steps == [3, 3] and o.param_groups[1]["weight_decay"] == 0.1
    for g in range(2):
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(
                full_flat([o for _, o in ranks3], g, kind), full_flat([opt], g, kind)
            )
        for _, o in ranks3:  # the tail padding is zero
            lay = o.layouts[g]
            n = max(0, min(lay.stop, lay.offsets[-1] + lay.numels[-1]) - lay.start)
            assert not o.flat[g]["master"][n:].any()
    assert ranks3[2][1].scalar["scale"]["exp_avg"] == opt.scalar["scale"]["exp_avg"]

    def save(comm: ThreadComm) -> None:
        m, o = ranks3[comm.rank]
        m.load_state_dict(model.state_dict())
        shard = zero_shard(o, global_steps=3)
        zckpt.save_checkpoint(tmp_path / "ws3", shard, tag="t", comm=comm)

    run_ranks(save, 3)
    saved = zckpt.load_checkpoint(tmp_path / "ws3").state
    assert saved["optimizer"]["state"]["fc.weight"]["step"].item() == 3.0
    assert torch.equal(saved["master"]["emb.weight"], model.emb.weight)

    ranks2 = [zero_at(2, r, seed=9) for r in range(2)]
    for _, o in ranks2:
        load_partitions(o, zckpt.open_checkpoint(tmp_path / "ws3"))
    for g in range(2):
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(
                full_flat([o for _, o in ranks2], g, kind), full_flat([opt], g, kind)
            )


def test_zero_and_torch_adamw_checkpoints_load_into_each_other(tmp_path: Path) -> None:
    model, opt = zero_at(1, 0)
    expected = train(model, opt, None, range(4))[2:]
    model, opt = zero_at(1, 0)
    train(model, opt, None, range(2))
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="zero")

    # ZeRO checkpoint -> torch.optim.AdamW (saved hyperparameters kept, AdamW's own added).
    model2, _, _ = make(seed=2)
    plain = torch.optim.AdamW(zero_groups(model2), foreach=False)
    Checkpointer(model2, plain).load_checkpoint(tmp_path, tag="zero")
    assert plain.param_groups[0]["decoupled_weight_decay"] is True
    assert train(model2, plain, None, range(2, 4)) == expected

    # torch.optim.AdamW checkpoint -> ZeroAdamW (masters from the module weights).
    Checkpointer(model2, plain, existing="keep").save_checkpoint(tmp_path, tag="plain")
    _, zero = zero_at(1, 0, seed=4)
    Checkpointer(zero.model, zero).load_checkpoint(tmp_path, tag="plain")
    assert zero.steps == [4, 4]
    assert torch.equal(full_flat([zero], 1, "exp_avg"), torch.cat(
        [plain.state[p]["exp_avg"].reshape(-1) for p in plain.param_groups[1]["params"]]
    ))  # fmt: skip


def test_zero_checkpointer_flags(tmp_path: Path) -> None:
    model, opt = zero_at(1, 0)
    train(model, opt, None, range(2))
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="t")
    model2, opt2 = zero_at(1, 0, seed=5)
    Checkpointer(model2, opt2).load_checkpoint(tmp_path, load_optimizer_states=False)
    assert opt2.steps == [0, 0] and not opt2.flat[1]["exp_avg"].any()
    # The masters follow the loaded weights, so the next step does not undo the load.
    assert torch.equal(opt2.flat[1]["master"], opt.flat[1]["master"])
    with pytest.raises(zckpt.SpecError, match="rank 0 of 2"):
        Checkpointer(*zero_at(2, 0))


def _overwrite_after_each_load(
    monkeypatch: pytest.MonkeyPatch, save_dir: Path, writer: Checkpointer, times: int
) -> list[int]:
    """Make the tag ``t`` be overwritten by ``writer`` right after each of the first ``times``
    loads the Checkpointer makes: another job's save landing in the middle of a resume."""
    from zckpt.adapters import _checkpointer

    real = _checkpointer.load_checkpoint
    calls: list[int] = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        got = real(*args, **kwargs)
        calls.append(1)
        if len(calls) <= times:
            writer.global_steps += 1
            writer.save_checkpoint(save_dir, tag="t", overwrite=True)
        return got

    monkeypatch.setattr(_checkpointer, "load_checkpoint", racing)
    return calls


def test_a_tag_overwritten_during_a_resume_is_read_from_one_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The partitions of a ZeroAdamW are read after the module: an overwrite in between used
    # to give module values of one generation and partitions of the next, silently.
    model, opt = zero_at(1, 0)
    train(model, opt, None, range(2))
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="t")
    model_b, opt_b = zero_at(1, 0, seed=3)
    train(model_b, opt_b, None, range(3))
    calls = _overwrite_after_each_load(
        monkeypatch, tmp_path, Checkpointer(model_b, opt_b, existing="keep"), times=1
    )
    model2, opt2 = zero_at(1, 0, seed=5)
    Checkpointer(model2, opt2).load_checkpoint(tmp_path, tag="t")
    assert len(calls) == 2  # the first load saw the overwrite and was done again
    assert_states_equal(model2.state_dict(), model_b.state_dict())
    for g in range(2):
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(full_flat([opt2], g, kind), full_flat([opt_b], g, kind))
    assert opt2.steps == opt_b.steps


def test_a_tag_overwritten_during_every_resume_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = zero_at(1, 0)
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="t")
    _overwrite_after_each_load(
        monkeypatch, tmp_path, Checkpointer(model, opt, existing="keep"), times=2
    )
    with pytest.raises(zckpt.LoadError, match=r"tag 't' was overwritten while it was being"):
        Checkpointer(*zero_at(1, 0, seed=5)).load_checkpoint(tmp_path)
