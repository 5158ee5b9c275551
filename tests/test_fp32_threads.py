"""``fp32_tensors``: building the eager fp32 state dict on several threads changes nothing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.assemble import (
    TensorSource,
    assemble_fp32,
    fp32_entries,
    fp32_tensors,
    index_sources,
    shard_sources,
)
from zckpt.errors import CoverageError


def _state(sizes: list[int], bf16: list[bool]) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(sum(sizes) + len(sizes))
    module, master = {}, {}
    for i, (n, half) in enumerate(zip(sizes, bf16)):
        w = torch.randn(n, generator=g)
        module[f"p{i}"] = w.bfloat16() if half else w
        if half and i % 2 == 0:
            master[f"p{i}"] = w  # a master copy: its exact values win over the upcast
    return {"module": module, "master": master}


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    data=st.data(),
    world=st.integers(1, 5),
    threads=st.integers(1, 4),
)
def test_threads_build_the_same_tensors_as_the_serial_generator(
    sizes: list[int], data: st.DataObject, world: int, threads: int
) -> None:
    bf16 = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    state = _state(sizes, bf16)
    plan = zckpt.plan_shards(state, zckpt.ZeroSpec(world, 2))
    shards = [zckpt.shard_state(state, plan, r) for r in range(world)]
    skel = shards[0].skeleton
    index = index_sources(skel, shard_sources(shards))
    entries = fp32_entries(skel, shards[0].spec)
    want = dict(assemble_fp32(index, entries))
    got = fp32_tensors(index, entries, threads)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def test_tied_names_share_one_tensor_whatever_the_threads() -> None:
    w = torch.randn(7)
    state = {"module": {"w": w, "v": w}}
    plan = zckpt.plan_shards(state, zckpt.ZeroSpec(3, 1))
    shards = [zckpt.shard_state(state, plan, r) for r in range(3)]
    skel = shards[0].skeleton
    entries = fp32_entries(skel, shards[0].spec)
    assert any(e.tied_to is not None for e in entries)
    out = fp32_tensors(index_sources(skel, shard_sources(shards)), entries, threads=3)
    assert out["v"] is out["w"] and torch.equal(out["w"], w)


def test_a_missing_range_is_raised_from_the_threads_naming_the_tensor() -> None:
    state = {"module": {"a": torch.ones(4), "b": torch.ones(6), "c": torch.ones(3)}}
    plan = zckpt.plan_shards(state, zckpt.ZeroSpec(2, 1))
    shards = [zckpt.shard_state(state, plan, r) for r in range(2)]
    skel = shards[0].skeleton
    # Only rank 0's fragments: rank 1's part of the flat buffer is in no source.
    sources = [s for s in shard_sources(shards[:1]) if isinstance(s, TensorSource)]
    entries = fp32_entries(skel, shards[0].spec)
    with pytest.raises(CoverageError, match="are in no saved shard") as serial:
        dict(assemble_fp32(index_sources(skel, sources), entries))
    with pytest.raises(CoverageError, match="are in no saved shard") as threaded:
        fp32_tensors(index_sources(skel, sources), entries, threads=2)
    assert str(threaded.value) == str(serial.value)
