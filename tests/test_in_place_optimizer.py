"""Resume in place, the optimizer's half (issue 14, part 1): ``Checkpointer.load_checkpoint``
reads the optimizer's state tensors straight into the tensors the optimizer already holds
(same memory before and after), creates them first for a fresh optimizer (no training step),
and leaves the optimizer exactly as ``optimizer.load_state_dict`` of the saved state would
(values, dtypes, devices, param groups); ``ZeroAdamW``'s flat buffers are filled where they
live. Mismatches are named before anything is read."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.adapters import Checkpointer, ZeroAdamW, restore_training_state, training_state
from zckpt.testing import ThreadComm, assert_states_equal, run_ranks


class Net(torch.nn.Module):
    """Tied input/output embeddings, a 0-d parameter, an int64 buffer."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(11, 6)
        self.fc = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight
        self.scale = torch.nn.Parameter(torch.tensor(1.25))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        out: torch.Tensor = self.head(torch.tanh(self.fc(self.embed(x)))) * self.scale
        return out


OPTIMIZERS: dict[str, Callable[[Net], torch.optim.Optimizer]] = {
    "adamw": lambda m: torch.optim.AdamW(
        [
            {"params": [m.fc.bias, m.scale], "weight_decay": 0.0},
            {"params": [m.fc.weight, m.embed.weight], "lr": 0.02},
        ],
        lr=0.01,
    ),
    "adamw-fused": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, fused=True),
    "adam-amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True),
    "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.5, centered=True),
    "nadam": lambda m: torch.optim.NAdam(m.parameters(), lr=0.01),
    "asgd": lambda m: torch.optim.ASGD(m.parameters(), lr=0.01),
}
CASTS_SCALARS = ("asgd", "nadam")


def train(model: Net, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randint(0, 11, (4, 3), generator=g), torch.randint(0, 11, (4, 3), generator=g)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            out = model(x).float().flatten(0, 1)
            loss = torch.nn.functional.cross_entropy(out, y.flatten())
            loss.backward()
            return loss.detach()

        losses.append(float(opt.step(closure)))  # type: ignore[arg-type]
    return losses


def state_tensors(opt: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    return {
        (i, k): v
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
        for k, v in opt.state.get(p, {}).items()
        if isinstance(v, torch.Tensor)
    }


def save(
    d: Path, kind: str, dtype: torch.dtype, ws: int, steps: int = 2
) -> tuple[Net, torch.optim.Optimizer]:
    """Train ``steps`` steps, save from ``ws`` ranks (threads, each its shard), return the
    model and optimizer as saved."""
    model = Net(0, dtype)
    opt = OPTIMIZERS[kind](model)
    train(model, opt, range(steps))

    def one(comm: ThreadComm) -> None:
        m, o = (model, opt) if comm.rank == 0 else copy.deepcopy((model, opt))
        Checkpointer(m, o, comm=comm).save_checkpoint(d, tag="t", global_step=steps)

    run_ranks(one, ws)
    return model, opt


def load(d: Path, models: list[tuple[Net, torch.optim.Optimizer]], **kw: Any) -> None:
    """Every rank of ``len(models)`` (threads) resumes its own model and optimizer."""

    def one(comm: ThreadComm) -> None:
        m, o = models[comm.rank]
        Checkpointer(m, o, comm=comm).load_checkpoint(d, **kw)

    run_ranks(one, len(models))


def reference(d: Path, kind: str, dtype: torch.dtype) -> tuple[Net, torch.optim.Optimizer]:
    """The state the load must give: fresh tensors loaded, handed to ``load_state_dict``."""
    model = Net(7, dtype)
    opt = OPTIMIZERS[kind](model)
    restore_training_state(zckpt.load_checkpoint(d).state, model, opt)
    return model, opt


def assert_optimizers_equal(got: torch.optim.Optimizer, want: torch.optim.Optimizer) -> None:
    """Equal state dicts (values bitwise, dtypes, keys, param groups) and equal devices."""
    assert_states_equal(got.state_dict(), want.state_dict())
    a, b = state_tensors(got), state_tensors(want)
    assert {k: v.device for k, v in a.items()} == {k: v.device for k, v in b.items()}


@settings(max_examples=24, deadline=None)
@example(kind="adamw", dtype=torch.float32, ws=2, stepped=True)
@example(kind="adamw", dtype=torch.bfloat16, ws=1, stepped=False)
@example(kind="sgd-momentum", dtype=torch.float32, ws=1, stepped=False)
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    ws=st.integers(1, 3),
    stepped=st.booleans(),
)
def test_resume_fills_the_optimizers_tensors_and_the_next_step_is_the_same(
    tmp_path_factory: pytest.TempPathFactory, kind: str, dtype: torch.dtype, ws: int, stepped: bool
) -> None:
    d = tmp_path_factory.mktemp("ckpt")
    model, opt = save(d, kind, dtype, ws)
    ranks = []
    for r in range(ws):
        m = Net(10 + r, dtype)
        o = OPTIMIZERS[kind](m)
        if stepped:  # an optimizer with state of its own, from other batches
            train(m, o, range(50 + r, 51 + r))
        ranks.append((m, o))
    before = [(state_tensors(o), {n: p.data_ptr() for n, p in m.state_dict().items()})
              for m, o in ranks]  # fmt: skip
    load(d, ranks)
    ref_model, ref_opt = reference(d, kind, dtype)
    expected = copy.deepcopy(training_state(ref_model, ref_opt))
    # torch's own load_state_dict casts the 0-d fp32 state of 16-bit parameters (ASGD's eta
    # and mu, NAdam's mu_product) to their dtype: the resume must give what torch gives, and
    # only where torch's round trip is exact is that the saved state.
    exact = dtype == torch.float32 or kind not in CASTS_SCALARS
    if exact:
        assert_states_equal(expected, training_state(model, opt))
    for (m, o), (tensors, params) in zip(ranks, before):
        assert_states_equal(training_state(m, o), expected)
        assert_optimizers_equal(o, ref_opt)
        assert m.head.weight is m.embed.weight
        assert {n: p.data_ptr() for n, p in m.state_dict().items()} == params
        now = state_tensors(o)
        if stepped:  # every tensor the optimizer had is the one it holds now, filled
            assert set(now) == set(tensors)
            assert all(now[k] is t for k, t in tensors.items())
    losses = train(ref_model, ref_opt, range(2, 3))
    after = training_state(ref_model, ref_opt)
    if exact:  # the uninterrupted run's next step
        assert train(model, opt, range(2, 3)) == losses
        assert_states_equal(training_state(model, opt), after)
    for m, o in ranks:
        assert train(m, o, range(2, 3)) == losses
        assert_states_equal(training_state(m, o), after)


def test_a_fresh_optimizer_gets_its_state_created_once_and_read_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zckpt.assemble import _overlap

    model, opt = save(tmp_path, "adamw", torch.float32, 1)
    made: dict[str, torch.Tensor] = {}
    real = _overlap.new_tensor

    def counted(shape: Any, dt: torch.dtype, name: str) -> torch.Tensor:
        assert name not in made, f"{name} allocated twice"
        made[name] = real(shape, dt, name)
        return made[name]

    monkeypatch.setattr(_overlap, "new_tensor", counted)
    m2 = Net(3)
    o2 = OPTIMIZERS["adamw"](m2)
    load(tmp_path, [(m2, o2)])
    # One allocation per optimizer state tensor, made before the read and read into: the
    # optimizer holds those very tensors. None for the module (read into the parameters).
    names = dict(zip(
        (p for g in o2.param_groups for p in g["params"]),
        (n for g in training_state(m2, o2)["optimizer"]["param_groups"] for n in g["params"]),
    ))  # fmt: skip
    held = {f"optimizer/state/{names[p]}/{k}": v for p, s in o2.state.items() for k, v in s.items()}
    assert sorted(made) == sorted(held)
    assert all(held[n] is t for n, t in made.items())
    assert_states_equal(training_state(m2, o2), training_state(model, opt))
    assert o2.state[m2.fc.weight]["step"].item() == 2.0  # no training step was taken


def test_stepped_optimizer_allocates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zckpt.assemble import _overlap

    save(tmp_path, "adamw", torch.float32, 2)
    m2 = Net(3)
    o2 = OPTIMIZERS["adamw"](m2)
    train(m2, o2, range(9, 10))
    made: list[str] = []
    real = _overlap.new_tensor
    monkeypatch.setattr(_overlap, "new_tensor", lambda s, dt, n: made.append(n) or real(s, dt, n))
    load(tmp_path, [(m2, o2)])
    assert made == []


class Counting(zckpt.LocalStorage):
    """Counts the tensor bytes read."""

    def __init__(self) -> None:
        self.bytes = 0

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        n = super().read_into(path, offset, out)
        self.bytes += n
        return n


def test_every_saved_byte_is_read_once(tmp_path: Path) -> None:
    """Tied parameters, their optimizer state, every moment: each saved tensor read once."""
    save(tmp_path, "adamw", torch.float32, 2)
    skel = zckpt.open_checkpoint(tmp_path).manifest.skeleton
    m2 = Net(3)
    o2 = OPTIMIZERS["adamw"](m2)
    train(m2, o2, range(9, 10))
    counting = Counting()
    Checkpointer(m2, o2, storage=counting).load_checkpoint(tmp_path)
    assert counting.bytes == sum(t.nbytes for t in skel.tensors)


def test_saved_fp32_state_is_cast_into_a_bf16_optimizers_own_tensors(tmp_path: Path) -> None:
    """A checkpoint of an fp32 run resumed by a bf16 model: load_state_dict casts the state to
    the parameters' dtype; the in-place resume casts it into the optimizer's own tensors."""
    save(tmp_path, "adamw", torch.float32, 1)
    m2 = Net(3, torch.bfloat16)
    o2 = OPTIMIZERS["adamw"](m2)
    train(m2, o2, range(9, 10))
    tensors = state_tensors(o2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module's fp32 values are rounded (a warning)
        load(tmp_path, [(m2, o2)])
        _, ref_opt = reference(tmp_path, "adamw", torch.bfloat16)
    assert_optimizers_equal(o2, ref_opt)
    assert o2.state[m2.fc.weight]["exp_avg"].dtype == torch.bfloat16
    assert all(state_tensors(o2)[k] is t for k, t in tensors.items())


def test_state_of_another_dtype_than_torch_gives_is_replaced_as_torch_does(
    tmp_path: Path,
) -> None:
    """An optimizer holding fp32 moments for bf16 parameters (its own choice): load_state_dict
    casts saved state to the parameter's dtype, so the resume must too (a new tensor)."""
    save(tmp_path, "sgd-momentum", torch.bfloat16, 1)
    m2 = Net(3, torch.bfloat16)
    o2 = OPTIMIZERS["sgd-momentum"](m2)
    for p in m2.parameters():
        o2.state[p]["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32)
    load(tmp_path, [(m2, o2)])
    _, ref_opt = reference(tmp_path, "sgd-momentum", torch.bfloat16)
    assert_optimizers_equal(o2, ref_opt)
    assert o2.state[m2.fc.weight]["momentum_buffer"].dtype == torch.bfloat16


def test_lbfgs_state_with_lists_resumes(tmp_path: Path) -> None:
    """LBFGS keeps lists of tensors and Python numbers: its tensor entries are read in place,
    the rest as before."""
    model = Net(0)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3, history_size=4)
    train(model, opt, range(2))
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="t")
    m2 = Net(3)
    o2 = torch.optim.LBFGS(m2.parameters(), lr=0.1, max_iter=3, history_size=4)
    train(m2, o2, range(7, 9))
    d = o2.state[o2._params[0]]["d"]  # type: ignore[attr-defined]
    Checkpointer(m2, o2).load_checkpoint(tmp_path)
    assert o2.state[o2._params[0]]["d"] is d  # type: ignore[attr-defined]
    assert_states_equal(training_state(m2, o2), training_state(model, opt))
    assert train(m2, o2, range(2, 3)) == train(model, opt, range(2, 3))


class OwnLoad(torch.optim.SGD):
    """An optimizer with its own load_state_dict: loaded as before (fresh tensors, handed in)."""

    calls = 0

    def load_state_dict(self, state_dict: Any) -> None:
        OwnLoad.calls += 1
        super().load_state_dict(state_dict)


def test_an_optimizer_with_its_own_load_state_dict_loads_as_before(tmp_path: Path) -> None:
    model = Net(0)
    opt = OwnLoad(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, range(2))
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="t")
    m2 = Net(3)
    o2 = OwnLoad(m2.parameters(), lr=0.05, momentum=0.9)
    train(m2, o2, range(7, 8))
    before = state_tensors(o2)
    Checkpointer(m2, o2).load_checkpoint(tmp_path)
    assert OwnLoad.calls == 1
    assert not any(state_tensors(o2)[k] is t for k, t in before.items())  # not in place
    assert_states_equal(training_state(m2, o2), training_state(model, opt))


def test_a_state_tensor_of_another_shape_is_named_and_nothing_is_read(tmp_path: Path) -> None:
    save(tmp_path, "adamw", torch.float32, 1)
    m2 = Net(3)
    o2 = OPTIMIZERS["adamw"](m2)
    train(m2, o2, range(9, 10))
    o2.state[m2.fc.weight]["exp_avg"] = torch.zeros(3)
    weights = {n: p.clone() for n, p in m2.state_dict().items()}
    with pytest.raises(zckpt.LoadError, match=r"optimizer/state/fc\.weight/exp_avg: .*shape \[3\]"):
        Checkpointer(m2, o2).load_checkpoint(tmp_path)
    assert_states_equal(m2.state_dict(), weights)  # refused before anything was read


def test_param_groups_that_differ_are_refused_before_anything_is_read(tmp_path: Path) -> None:
    save(tmp_path, "adamw", torch.float32, 1)
    m2 = Net(3)
    o2 = torch.optim.AdamW(m2.parameters())
    weights = {n: p.clone() for n, p in m2.state_dict().items()}
    with pytest.raises(zckpt.LoadError, match="2 param groups, the optimizer 1") as info:
        Checkpointer(m2, o2).load_checkpoint(tmp_path)
    assert str(tmp_path / "t") in str(info.value)
    assert_states_equal(m2.state_dict(), weights)


@pytest.mark.parametrize("ws", [1, 3])
def test_zero_adamw_partitions_are_read_where_they_live(
    tmp_path: Path, ws: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zckpt.assemble import _overlap

    model = Net(0)
    opt = ZeroAdamW(model, lr=0.01)
    train(model, opt, range(2))
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="t")
    ranks = [Net(5) for _ in range(ws)]

    def no_gather(out: torch.Tensor, part: torch.Tensor) -> None:
        raise AssertionError("no step here")

    opts = [
        ZeroAdamW(m, lr=0.01, rank=r, world_size=ws, all_gather=None if ws == 1 else no_gather)
        for r, m in enumerate(ranks)
    ]
    ptrs = [[t.data_ptr() for b in o.flat for t in b.values()] for o in opts]
    made: list[str] = []
    real = _overlap.new_tensor
    monkeypatch.setattr(_overlap, "new_tensor", lambda s, dt, n: made.append(n) or real(s, dt, n))

    def one(comm: ThreadComm) -> None:
        Checkpointer(ranks[comm.rank], opts[comm.rank], comm=comm).load_checkpoint(tmp_path)

    run_ranks(one, ws)
    assert [[t.data_ptr() for b in o.flat for t in b.values()] for o in opts] == ptrs
    assert all(n.endswith("/step") for n in made), made  # only the 0-d step counts are fresh
    for g, lay in enumerate(opt.layouts):
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            full = torch.cat([o.flat[g][kind] for o in opts])
            n = lay.offsets[-1] + lay.numels[-1]
            assert torch.equal(full[:n], opt.flat[g][kind][:n]), (g, kind)
            assert not full[n:].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_optimizer_state_is_filled_in_its_own_gpu_tensors(tmp_path: Path) -> None:
    """A GPU optimizer's state cannot be read into directly (into= takes CPU memory): it is
    read fresh and copied into the optimizer's own GPU tensors, as load_state_dict's .to()."""
    save(tmp_path, "adamw", torch.float32, 1)
    m2 = Net(3).cuda()
    o2 = OPTIMIZERS["adamw"](m2)
    m2(torch.zeros(2, dtype=torch.int64, device="cuda")).sum().backward()
    o2.step()
    tensors = state_tensors(o2)
    Checkpointer(m2, o2).load_checkpoint(tmp_path)
    ref = Net(7).cuda()
    ref_opt = OPTIMIZERS["adamw"](ref)
    restore_training_state(zckpt.load_checkpoint(tmp_path).state, ref, ref_opt)
    assert_optimizers_equal(o2, ref_opt)
    assert all(state_tensors(o2)[k] is t for k, t in tensors.items())


def test_state_shared_by_two_parameters_stays_one_tensor(tmp_path: Path) -> None:
    """One state tensor under two parameters is saved once; load_state_dict gives one tensor
    back under both, and so must the in-place resume (in the optimizer's own tensor)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shared = torch.arange(9.0).reshape(3, 3)
    opt.state[model[0].weight]["momentum_buffer"] = shared
    opt.state[model[1].weight]["momentum_buffer"] = shared
    Checkpointer(model, opt).save_checkpoint(tmp_path, tag="t")
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    own = torch.zeros(3, 3)
    o2.state[m2[0].weight]["momentum_buffer"] = own
    o2.state[m2[1].weight]["momentum_buffer"] = torch.zeros(3, 3)
    Checkpointer(m2, o2).load_checkpoint(tmp_path)
    a = o2.state[m2[0].weight]["momentum_buffer"]
    assert a is own and o2.state[m2[1].weight]["momentum_buffer"] is own
    assert torch.equal(own, shared)
