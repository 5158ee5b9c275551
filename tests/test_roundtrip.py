"""The core promise: shard, encode, decode, consolidate is exact; so is any reshard chain."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import zckpt
from zckpt.spec._plan import FLAT, TENSOR
from zckpt.testing import assert_states_equal, specs, states, tensors_bitwise_equal

CODECS = ("raw", "zstd", "byteplane")


@st.composite
def cases(draw: st.DrawFn, n_specs: int = 1) -> tuple[Any, list[zckpt.ZeroSpec]]:
    state = draw(states())
    return state, [draw(specs(state)) for _ in range(n_specs)]


def shards_of(state: Any, spec: zckpt.ZeroSpec) -> list[zckpt.Shard]:
    plan = zckpt.plan_shards(state, spec)
    return [zckpt.shard_state(state, plan, r) for r in range(spec.world_size)]


@given(cases(), st.sampled_from(CODECS), st.sampled_from([1 << 20, 64]))
def test_encode_decode_consolidate_is_exact(case: Any, codec: str, chunk: int) -> None:
    state, (spec,) = case
    blobs = [zckpt.encode_shard(s, codec=codec, chunk_bytes=chunk) for s in shards_of(state, spec)]
    decoded = [zckpt.decode_shard(b) for b in reversed(blobs)]
    assert_states_equal(zckpt.consolidate(decoded), state)


@given(cases(n_specs=3))
def test_reshard_chains_equal_direct_sharding(case: Any) -> None:
    state, (a, b, c) = case
    chained = zckpt.reshard(zckpt.reshard(shards_of(state, a), b), c)
    direct = shards_of(state, c)
    assert len(chained) == len(direct) == c.world_size
    for x, y in zip(chained, direct):
        assert x.rank == y.rank and x.fragments == y.fragments
        for dx, dy in zip(x.data, y.data):
            assert tensors_bitwise_equal(dx, dy)
    assert_states_equal(zckpt.consolidate(chained), state)


@given(cases())
def test_shard_from_local_buffers_meets_shard_state(case: Any) -> None:
    """A ZeRO optimizer's local flat partitions produce the same shard as slicing the full state."""
    state, (spec,) = case
    plan = zckpt.plan_shards(state, spec)
    _, leaves = zckpt.tree.flatten(state)
    flat = [t.reshape(-1) for t in leaves]
    for rank in range(spec.world_size):
        groups = {}
        for gi, g in enumerate(plan.groups):
            lo, hi = g.partition_range(rank)
            buf = torch.cat(
                [flat[i] for i in g.leaves] + [torch.zeros(g.padded_numel - g.numel, dtype=g.dtype)]
            )
            groups[gi] = buf[lo:hi].clone()
        tensors = {}
        for f in plan.writes[rank]:
            p = plan.placements[f.leaf]
            if p.kind == TENSOR:
                tensors[f.leaf] = flat[f.leaf][f.start : f.stop].clone()
            elif p.kind != FLAT:
                tensors[f.leaf] = leaves[f.leaf]
        got = zckpt.shard_from_local(plan, rank, groups, tensors)
        want = zckpt.shard_state(state, plan, rank)
        assert got.fragments == want.fragments
        assert all(tensors_bitwise_equal(x, y) for x, y in zip(got.data, want.data))


def upcast_oracle(w: torch.Tensor) -> torch.Tensor:
    """fp32 of ``w``: IEEE widening; an fp16 NaN keeps sign and payload and is quieted.

    torch's own ``.float()`` is not usable as the oracle for fp16 NaNs: its vector loop does this,
    but its scalar tail (0-d tensors, the last n % 8 elements) returns 0x7FFFFFFF for every NaN.
    """
    if not w.dtype.is_floating_point:
        return w
    out = w.float()
    if w.dtype == torch.float16:
        bits = w.view(torch.int16).to(torch.int32) & 0xFFFF
        nan = ((bits & 0x7C00) == 0x7C00) & ((bits & 0x03FF) != 0)
        q = ((bits & 0x8000) << 16) | 0x7FC00000 | ((bits & 0x03FF) << 13)
        out = torch.where(nan, q, out.view(torch.int32)).view(torch.float32)
    return out


@given(cases())
def test_fp32_consolidation_upcasts_bitwise(case: Any) -> None:
    state, (spec,) = case
    full = zckpt.consolidate(shards_of(state, spec), dtype=torch.float32)
    _, want = zckpt.tree.flatten(state)
    _, got = zckpt.tree.flatten(full)
    for w, g in zip(want, got):
        assert tensors_bitwise_equal(g, upcast_oracle(w))


def test_fp32_state_dict_prefers_master_weights() -> None:
    w = torch.randn(7, 3)
    state = {
        "module": {
            "w": w.bfloat16(),
            "b": torch.ones(3, dtype=torch.float16),
            "n": torch.tensor(5),
        },
        "master": {"w": w},
    }
    sd = zckpt.fp32_state_dict(shards_of(state, zckpt.ZeroSpec(3, 3)))
    assert list(sd) == ["w", "b", "n"]
    assert torch.equal(sd["w"], w)
    assert sd["b"].dtype == torch.float32 and sd["n"].dtype == torch.int64


def test_missing_rank_is_named() -> None:
    state = {"master": {"w": torch.arange(20.0)}}
    shards = shards_of(state, zckpt.ZeroSpec(4, 1))
    with pytest.raises(
        zckpt.CoverageError, match=r"master/w: elements \[12, 18\) .*rank\(s\) \[2\]"
    ):
        zckpt.consolidate([s for s in shards if s.rank != 2])


def test_shards_of_different_states_are_refused() -> None:
    a = shards_of({"w": torch.zeros(4)}, zckpt.ZeroSpec(2, 3))
    b = shards_of({"w": torch.zeros(5)}, zckpt.ZeroSpec(2, 3))
    with pytest.raises(zckpt.CoverageError, match="different states"):
        zckpt.consolidate([a[0], b[1]])
    with pytest.raises(zckpt.CoverageError, match="more than once"):
        zckpt.consolidate([a[0], a[0], a[1]])


def test_unsupported_leaves_are_named() -> None:
    with pytest.raises(zckpt.StateError, match=r"opt/lr: cannot store a value of type .*Fraction"):
        from fractions import Fraction

        zckpt.tree.flatten({"opt": {"lr": Fraction(1, 3)}})
    with pytest.raises(zckpt.StateError, match="does not fit in 64 bits"):
        zckpt.tree.flatten({"n": 2**70})
