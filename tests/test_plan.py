"""Partition specs and plans: ZeRO semantics, exact tiling, balance, DeepSpeed layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import zckpt
from zckpt.spec._plan import EMPTY, FLAT, REPLICATED, TENSOR
from zckpt.testing import specs, states, training_states

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"


@st.composite
def state_and_spec(draw: st.DrawFn) -> tuple[object, zckpt.ZeroSpec]:
    state = draw(states())
    return state, draw(specs(state))


@given(state_and_spec())
def test_writes_tile_every_tensor_exactly_once(case: tuple[object, zckpt.ZeroSpec]) -> None:
    state, spec = case
    plan = zckpt.plan_shards(state, spec)
    assert len(plan.writes) == spec.world_size
    covered: dict[int, list[tuple[int, int]]] = {}
    for frags in plan.writes:
        for f in frags:
            covered.setdefault(f.leaf, []).append((f.start, f.stop))
    for leaf, meta in enumerate(plan.skeleton.tensors):
        ranges = sorted(covered.get(leaf, []))
        pos = 0
        for a, b in ranges:
            assert a == pos and b > a
            pos = b
        assert pos == meta.numel


@given(state_and_spec())
def test_placements_follow_zero_semantics(case: tuple[object, zckpt.ZeroSpec]) -> None:
    state, spec = case
    plan = zckpt.plan_shards(state, spec)
    for leaf, (path, meta) in enumerate(zip(plan.skeleton.paths, plan.skeleton.tensors)):
        kind = plan.placements[leaf].kind
        if meta.numel == 0:
            assert kind == EMPTY
        elif meta.shape == ():
            assert kind == REPLICATED
        elif spec.stage == 3:
            assert kind == TENSOR
        elif path[0] == "module":
            assert kind == REPLICATED
        else:
            assert kind == FLAT
    for g in plan.groups:
        assert g.padded_numel % (spec.alignment * spec.world_size) == 0
        assert g.numel <= g.padded_numel < g.numel + spec.alignment * spec.world_size
        assert g.partition_numel * spec.world_size == g.padded_numel
        assert len({plan.skeleton.tensors[leaf].dtype for leaf in g.leaves}) == 1


@given(state_and_spec())
def test_holds_is_partitions_plus_replicated(case: tuple[object, zckpt.ZeroSpec]) -> None:
    state, spec = case
    plan = zckpt.plan_shards(state, spec)
    for rank in range(spec.world_size):
        held = {f.leaf: f for f in plan.holds(rank)}
        for leaf, p in enumerate(plan.placements):
            if p.kind == REPLICATED:
                assert held[leaf] == zckpt.Fragment(leaf, 0, plan.skeleton.tensors[leaf].numel)
        for f in plan.writes[rank]:
            assert held[f.leaf].start <= f.start and f.stop <= held[f.leaf].stop


@given(training_states(max_params=6, max_numel=200), st.integers(1, 8))
def test_replicated_writes_are_spread_over_ranks(state: object, ws: int) -> None:
    plan = zckpt.plan_shards(state, zckpt.ZeroSpec(ws, 1))
    sizes, base = [0] * ws, [0] * ws
    for rank, frags in enumerate(plan.writes):
        for f in frags:
            nbytes = f.numel * plan.skeleton.tensors[f.leaf].itemsize
            sizes[rank] += nbytes
            if plan.placements[f.leaf].kind != REPLICATED:
                base[rank] += nbytes
    largest = max((m.nbytes for m in plan.skeleton.tensors), default=0)
    # The LPT bound: the final spread is at most the larger of the initial spread and one item.
    assert max(sizes) - min(sizes) <= max(largest, max(base) - min(base))


def test_stage3_partitions_are_ceil_sized() -> None:
    plan = zckpt.plan_shards({"module": {"w": torch.zeros(37, 37)}}, zckpt.ZeroSpec(4, 3))
    assert [f.numel for w in plan.writes for f in w] == [343, 343, 343, 340]


def test_param_groups_order_flat_buffers() -> None:
    state = {"master": {"b": torch.zeros(3), "a": torch.zeros(5), "c": torch.zeros(2)}}
    spec = zckpt.ZeroSpec(2, 2, param_groups=(("a", "b"), ("c",)))
    plan = zckpt.plan_shards(state, spec)
    names = [[plan.skeleton.name(i) for i in g.leaves] for g in plan.groups]
    assert names == [["master/a", "master/b"], ["master/c"]]
    assert [g.padded_numel for g in plan.groups] == [8, 4]


def test_bad_specs_and_ranks_are_refused() -> None:
    with pytest.raises(zckpt.SpecError, match="world_size"):
        zckpt.ZeroSpec(0, 1)
    with pytest.raises(zckpt.SpecError, match="stage"):
        zckpt.ZeroSpec(2, 4)
    with pytest.raises(zckpt.SpecError, match="groups 0 and 1"):
        zckpt.ZeroSpec(2, 1, param_groups=(("a",), ("a",)))
    plan = zckpt.plan_shards({"w": torch.zeros(2)}, zckpt.ZeroSpec(2, 1))
    with pytest.raises(zckpt.SpecError, match="rank 2 is out of range"):
        plan.holds(2)
    with pytest.raises(zckpt.SpecError, match=r"w: the state has torch.float32 \[3\]"):
        zckpt.shard_state({"w": torch.zeros(3)}, plan, 0)


def test_spec_round_trips_through_dict() -> None:
    spec = zckpt.ZeroSpec(3, 2, 4, replicate=("buffers",), param_groups=(("a", "b"), ("c",)))
    assert zckpt.ZeroSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(zckpt.SpecError, match="malformed spec"):
        zckpt.ZeroSpec.from_dict({"stage": 1})


def _ds_cases() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("z[12]_ws*") if not p.name.endswith("_moe"))


@pytest.mark.skipif(not FIXTURES.exists(), reason="../shared/fixtures not present")
@pytest.mark.parametrize("case", _ds_cases(), ids=lambda p: p.name)
def test_stage12_partitions_match_deepspeed(case: Path) -> None:
    """Our stage 1/2 flat layout puts the same elements on each rank as DeepSpeed 0.19.8 did."""
    info = json.loads((case / "case.json").read_text())
    params = [p for p in info["model"]["named_parameters"] if p["requires_grad"]]
    ngroups = 1 + max(p["param_group"] for p in params)
    groups = tuple(
        tuple(p["name"] for p in params if p["param_group"] == g) for g in range(ngroups)
    )
    master = {p["name"]: torch.zeros(p["shape"]) for p in params}
    ws = info["world_size"]
    plan = zckpt.plan_shards(
        {"master": master}, zckpt.ZeroSpec(ws, info["stage"], 2, param_groups=groups)
    )
    for rank in range(ws):
        name = next(
            f for f in info["files"] if re.search(rf"zero_pp_rank_{rank}_mp_rank_00_optim", f)
        )
        st_ = info["files"][name]["structure"]["optimizer_state_dict"]
        sizes = [
            int(re.search(r"\[(\d+)\]", t).group(1))  # type: ignore[union-attr]
            for t in st_["single_partition_of_fp32_groups"][f"list[{ngroups}]"]
        ]
        ours = [0] * ngroups
        for f in plan.writes[rank]:
            g = plan.placements[f.leaf].group
            ours[g] += f.numel
        assert ours == sizes
        owned = [set(m) for m in st_["param_slice_mappings"][f"list[{ngroups}]"]]
        for g in range(ngroups):
            ours_names = {
                plan.skeleton.paths[f.leaf][1]
                for f in plan.writes[rank]
                if plan.placements[f.leaf].group == g
            }
            assert ours_names == owned[g]
