"""Mixture of Experts: per-expert files, loading at another expert-parallel size and world size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.spec._plan import EXPERT
from zckpt.testing import assert_states_equal, tensors_bitwise_equal

EXPERTS = (r"experts\.(\d+)\.",)


def moe_state(num_experts: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    shapes = {"gate.weight": (num_experts, 6), "fc.weight": (5, 6)}
    for e in range(num_experts):
        shapes[f"moe.experts.{e}.w1"] = (7, 6)
        shapes[f"moe.experts.{e}.b1"] = (7,)
    master = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    return {
        "module": {n: t.bfloat16() for n, t in master.items()},
        "master": master,
        "optimizer": {
            "state": {n: {"exp_avg": torch.randn(t.shape, generator=g)} for n, t in master.items()}
        },
    }


def spec(ws: int, stage: int, ep: int) -> zckpt.ZeroSpec:
    return zckpt.ZeroSpec(ws, stage, experts=EXPERTS, expert_parallel_size=ep)


def test_experts_are_written_to_their_own_files(tmp_path: Path) -> None:
    state = moe_state()
    zckpt.save_checkpoint(tmp_path, state, spec(4, 2, 2), tag="t")
    m = zckpt.open_checkpoint(tmp_path).manifest
    experts = [f for f in m.files if f.expert >= 0]
    assert sorted(f.expert for f in experts) == [0, 1, 2, 3]
    for f in m.files:
        ids = {
            zckpt.ZeroSpec(1, 1, experts=EXPERTS).expert_of(m.skeleton.paths[x.leaf])
            for x in f.fragments
        }
        if f.expert >= 0:
            assert ids == {f.expert}, f.name
            assert f.name.endswith(f"expert{f.expert:05d}.zck")
        else:
            assert ids <= {None}, f.name
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, state)


@pytest.mark.parametrize(
    ("ws", "stage", "ep"), [(2, 1, 1), (4, 3, 4), (6, 2, 2), (8, 3, 4), (3, 2, 1)]
)
def test_load_at_another_expert_parallel_size(tmp_path: Path, ws: int, stage: int, ep: int) -> None:
    state = moe_state()
    zckpt.save_checkpoint(tmp_path, state, spec(4, 2, 2), tag="t")
    target = spec(ws, stage, ep)
    plan = zckpt.plan_shards(state, target)
    _, full = zckpt.tree.flatten(state)
    for rank in range(ws):
        got = zckpt.load_checkpoint(tmp_path, target, rank)
        _, leaves = zckpt.tree.flatten(got.state)
        held = {f.leaf: f for f in plan.holds(rank)}
        for leaf, t in enumerate(leaves):
            f = held.get(leaf)
            want = full[leaf]
            if f is None:
                assert t.numel() == 0
                p = plan.placements[leaf]
                assert p.kind != EXPERT or rank not in plan.expert_ranks(p.expert)
            elif f.numel == want.numel():
                assert tensors_bitwise_equal(t, want)
            else:
                assert tensors_bitwise_equal(t, want.reshape(-1)[f.start : f.stop])
    # Every expert is held by exactly its expert-data-parallel group.
    for e in range(4):
        assert len(plan.expert_ranks(e)) == ws // ep


def test_bad_expert_specs_are_refused() -> None:
    with pytest.raises(zckpt.SpecError, match="does not divide world_size"):
        spec(4, 2, 3)
    with pytest.raises(
        zckpt.SpecError, match="4 experts cannot be split over expert_parallel_size 8"
    ):
        zckpt.plan_shards(moe_state(), spec(8, 1, 8))
    with pytest.raises(zckpt.SpecError, match="has no group"):
        zckpt.ZeroSpec(2, 1, experts=(r"experts\.\d+",))


@settings(max_examples=40)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_expert_plans_tile_and_round_trip(per_ep: int, ep: int, dp: int, stage: int) -> None:
    """Any expert count, expert-parallel and data-parallel size: exact tiling, round trip."""
    state = moe_state(num_experts=ep * per_ep)
    target = spec(ep * dp, stage, ep)
    plan = zckpt.plan_shards(state, target)
    seen: dict[int, int] = {}
    for frags in plan.writes:
        for f in frags:
            seen[f.leaf] = seen.get(f.leaf, 0) + f.numel
    assert all(seen[i] == m.numel for i, m in enumerate(plan.skeleton.tensors))
    shards = [zckpt.shard_state(state, plan, r) for r in range(target.world_size)]
    assert_states_equal(zckpt.consolidate(shards), state)
    for leaf, p in enumerate(plan.placements):
        if p.kind == EXPERT:
            holders = [
                r for r in range(target.world_size) if any(f.leaf == leaf for f in plan.holds(r))
            ]
            assert set(holders) <= set(plan.expert_ranks(p.expert))
