"""Plans from arithmetic (issue 13): the per-rank fast paths agree with full enumeration.

``_reference_plan`` is the enumeration zckpt planned with before (every rank's fragments of
every tensor built up front), kept here as the oracle: the fast plan must give the same
placements, groups, every rank's writes and holdings, and ``writers`` must find exactly the
written fragments an enumerated index finds, for random skeletons and specs (world sizes 1-64,
stages 1-3, MoE, replicated subtrees, param groups).
"""

from __future__ import annotations

import heapq
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.spec._plan import (
    EMPTY,
    EXPERT,
    FLAT,
    REPLICATED,
    TENSOR,
    FlatGroup,
    Fragment,
    Placement,
    _group_key,
    _param_index,
)
from zckpt.testing import specs, states, training_states
from zckpt.tree import Skeleton, TensorMeta, skeleton_of

EXPERTS = (r"experts\.(\d+)\.",)


def _reference_plan(state: Any, spec: zckpt.ZeroSpec) -> dict[str, Any]:
    """The former plan_shards: every rank's fragments enumerated (O(ranks x tensors))."""
    skel = skeleton_of(state)
    ws = spec.world_size
    params = _param_index(spec)
    placements: list[Placement] = []
    replicated: list[int] = []
    group_members: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    group_ids: dict[tuple[Any, ...], int] = {}
    for leaf, (path, meta) in enumerate(zip(skel.paths, skel.tensors)):
        expert = spec.expert_of(path) if spec.experts else None
        if meta.numel == 0:
            placements.append(Placement(EMPTY))
        elif expert is not None:
            placements.append(Placement(EXPERT, expert=expert))
        elif len(meta.shape) == 0 or spec.is_replicated_path(path):
            placements.append(Placement(REPLICATED))
            replicated.append(leaf)
        elif spec.stage == 3:
            placements.append(Placement(TENSOR))
        elif spec.is_module_path(path):
            placements.append(Placement(REPLICATED))
            replicated.append(leaf)
        else:
            key, order = _group_key(path, meta, params)
            gid = group_ids.setdefault(key, len(group_ids))
            group_members.setdefault(key, []).append((order, leaf))
            placements.append(Placement(FLAT, group=gid))
    writes: list[list[Fragment]] = [[] for _ in range(ws)]
    load = [0] * ws
    groups: list[FlatGroup] = []
    for key, members in group_members.items():
        members.sort()
        leaves = tuple(leaf for _, leaf in members)
        offsets, total = [], 0
        for leaf in leaves:
            offsets.append(total)
            total += skel.tensors[leaf].numel
        padded = spec.padded(total)
        part = padded // ws
        dtype = skel.tensors[leaves[0]].dtype
        name = "/".join(key[0]) + f"[{key[1]}, group {key[2]}]"
        groups.append(FlatGroup(name, dtype, leaves, tuple(offsets), total, padded, part))
        itemsize = skel.tensors[leaves[0]].itemsize
        for rank in range(ws):
            lo, hi = rank * part, (rank + 1) * part
            load[rank] += max(0, min(hi, total) - lo) * itemsize
            for leaf, off in zip(leaves, offsets):
                n = skel.tensors[leaf].numel
                a, b = max(lo, off), min(hi, off + n)
                if a < b:
                    writes[rank].append(Fragment(leaf, a - off, b - off))
    for leaf, p in enumerate(placements):
        if p.kind == TENSOR:
            meta = skel.tensors[leaf]
            per = -(-meta.numel // ws)
            for rank in range(ws):
                a, b = rank * per, min(meta.numel, (rank + 1) * per)
                if a < b:
                    writes[rank].append(Fragment(leaf, a, b))
                    load[rank] += (b - a) * meta.itemsize
    num_experts = 1 + max((p.expert for p in placements if p.kind == EXPERT), default=-1)
    ep = spec.expert_parallel_size
    if num_experts % ep:
        raise zckpt.SpecError(f"{num_experts} experts cannot be split over {ep}")
    for leaf, p in enumerate(placements):
        if p.kind == EXPERT:
            slot = p.expert // (num_experts // ep)
            group = [r for r in range(ws) if r % ep == slot]
            writer = group[p.expert % len(group)]
            placements[leaf] = p._replace(owner=writer)
            writes[writer].append(Fragment(leaf, 0, skel.tensors[leaf].numel))
            load[writer] += skel.tensors[leaf].nbytes
    heap = [(load[r], r) for r in range(ws)]
    heapq.heapify(heap)
    for leaf in sorted(replicated, key=lambda i: (-skel.tensors[i].nbytes, i)):
        lo, rank = heapq.heappop(heap)
        placements[leaf] = Placement(REPLICATED, owner=rank)
        writes[rank].append(Fragment(leaf, 0, skel.tensors[leaf].numel))
        heapq.heappush(heap, (lo + skel.tensors[leaf].nbytes, rank))

    def holds(rank: int) -> tuple[Fragment, ...]:
        own = {
            f.leaf: f for f in writes[rank] if placements[f.leaf].kind not in (REPLICATED, EXPERT)
        }
        out = []
        for leaf, p in enumerate(placements):
            meta = skel.tensors[leaf]
            if p.kind == REPLICATED:
                out.append(Fragment(leaf, 0, meta.numel))
            elif p.kind == EXPERT:
                slot = p.expert // (num_experts // ep)
                group = [r for r in range(ws) if r % ep == slot]
                if rank not in group:
                    continue
                if not meta.shape or (spec.stage < 3 and spec.is_module_path(skel.paths[leaf])):
                    out.append(Fragment(leaf, 0, meta.numel))
                    continue
                per = -(-meta.numel // len(group))
                i = group.index(rank)
                a, b = i * per, min(meta.numel, (i + 1) * per)
                if a < b:
                    out.append(Fragment(leaf, a, b))
            elif leaf in own:
                out.append(own[leaf])
        return tuple(out)

    return {
        "placements": tuple(placements),
        "groups": tuple(groups),
        "writes": tuple(tuple(sorted(w)) for w in writes),
        "holds": [holds(r) for r in range(ws)],
    }


def _moe_state(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    shapes: dict[str, tuple[int, ...]] = {"gate.weight": (n, draw(st.integers(1, 5)))}
    for e in range(n):
        shapes[f"moe.experts.{e}.w1"] = (draw(st.integers(0, 7)), 3)
        shapes[f"moe.experts.{e}.b1"] = (draw(st.integers(1, 4)),)
    master = {k: torch.zeros(s) for k, s in shapes.items()}
    return {
        "module": {k: t.bfloat16() for k, t in master.items()},
        "master": master,
        "optimizer": {"state": {k: {"exp_avg": torch.zeros(t.shape)} for k, t in master.items()}},
        "step": torch.tensor(3),
    }


@st.composite
def cases(draw: st.DrawFn) -> tuple[Any, zckpt.ZeroSpec]:
    kind = draw(st.sampled_from(["training", "tree", "moe"]))
    ws = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 12, 16, 31, 32, 64]))
    stage = draw(st.integers(1, 3))
    alignment = draw(st.integers(1, 4))
    if kind == "moe":
        state = _moe_state(draw)
        n = len([k for k in state["master"] if "experts" in k]) // 2
        eps = [e for e in range(1, n + 1) if n % e == 0 and ws % e == 0]
        ep = draw(st.sampled_from(eps))
        return state, zckpt.ZeroSpec(ws, stage, alignment, experts=EXPERTS, expert_parallel_size=ep)
    state = draw(training_states(max_params=6) if kind == "training" else states())
    groups = draw(specs(state)).param_groups  # the shared strategy's random param groups
    replicate = draw(st.sampled_from([(), ("optimizer/state",), ("extra",), ("master",)]))
    return state, zckpt.ZeroSpec(ws, stage, alignment, replicate=replicate, param_groups=groups)


def _check_against_reference(state: Any, spec: zckpt.ZeroSpec) -> None:
    ref = _reference_plan(state, spec)
    plan = zckpt.plan_shards(state, spec)
    assert plan.placements == ref["placements"]
    assert plan.groups == ref["groups"]
    assert plan.writes == ref["writes"]
    assert tuple(plan.writes) == ref["writes"]
    for r in range(spec.world_size):
        assert plan.writes_of(r) == ref["writes"][r]
        assert plan.holds(r) == ref["holds"][r]
    # writers(): the written fragments overlapping any range, as an enumerated index finds them.
    by_leaf: dict[int, list[tuple[int, Fragment]]] = {}
    for r, frags in enumerate(ref["writes"]):
        for f in frags:
            by_leaf.setdefault(f.leaf, []).append((r, f))
    for leaf, meta in enumerate(plan.skeleton.tensors):
        n = meta.numel
        every = sorted(by_leaf.get(leaf, []), key=lambda rf: rf[1].start)
        for a, b in {(0, n), (0, max(0, n // 2)), (n // 3, n), (max(0, n - 1), n), (1, 2)}:
            want = [(r, f) for r, f in every if f.start < b and f.stop > a]
            assert plan.writers(leaf, a, b) == want, (leaf, a, b)
    # Holdings at another world size, planned from the saved skeleton alone, are found whole.
    if spec.world_size > 1:
        other = zckpt.plan_shards(plan.skeleton, spec.with_world_size(spec.world_size - 1))
        for r in range(other.world_size):
            for f in other.holds(r):
                got = plan.writers(f.leaf, f.start, f.stop)
                covered = sum(min(g.stop, f.stop) - max(g.start, f.start) for _, g in got)
                assert covered == f.numel


@settings(max_examples=150)
@given(cases())
@example(({"master": {"a": torch.zeros(3), "b": torch.zeros(5)}}, zckpt.ZeroSpec(64, 2)))
@example(
    ({"module": {"w": torch.zeros(100)}, "master": {"w": torch.zeros(100)}}, zckpt.ZeroSpec(64, 3))
)
def test_fast_plan_equals_full_enumeration(case: tuple[Any, zckpt.ZeroSpec]) -> None:
    state, spec = case
    try:
        _reference_plan(state, spec)
    except zckpt.SpecError:
        with pytest.raises(zckpt.SpecError):
            zckpt.plan_shards(state, spec)
        return
    _check_against_reference(state, spec)


def _wide_skeleton(n: int) -> Skeleton:
    """A skeleton of ``n`` parameters' training state without tensor bytes."""
    from zckpt.tree import DICT
    from zckpt.tree import TENSOR as T

    metas: list[TensorMeta] = []
    paths: list[tuple[Any, ...]] = []

    def leaf(path: tuple[Any, ...], dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
        metas.append(TensorMeta(dtype, shape))
        paths.append(path)
        return (T, len(metas) - 1)

    shapes = {f"layers.{i}.w": (7 + i % 5, 3 + i % 4) for i in range(n)}
    module = tuple((k, leaf(("module", k), torch.bfloat16, s)) for k, s in shapes.items())
    master = tuple((k, leaf(("master", k), torch.float32, s)) for k, s in shapes.items())
    node = (DICT, (("module", (DICT, module)), ("master", (DICT, master))))
    return Skeleton(node, tuple(metas), tuple(paths))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_plans_match_at_many_ranks_on_a_wide_skeleton(stage: int) -> None:
    skel = _wide_skeleton(40)
    _check_against_reference(skel, zckpt.ZeroSpec(64, stage))


def test_writes_reads_like_a_tuple() -> None:
    plan = zckpt.plan_shards({"master": {"w": torch.zeros(10)}}, zckpt.ZeroSpec(3, 3))
    assert plan.writes[-1] == plan.writes[2] == (Fragment(0, 8, 10),)
    assert plan.writes[1:] == (plan.writes[1], plan.writes[2])
    assert list(plan.writes) == [plan.writes[r] for r in range(3)]
    assert plan == zckpt.plan_shards({"master": {"w": torch.zeros(10)}}, zckpt.ZeroSpec(3, 3))
    with pytest.raises(IndexError):
        plan.writes[3]


def test_bench_metadata_smoke_runs(tmp_path: Any) -> None:
    """bench/bench_metadata.py --smoke: every case reports a row (numbers are not checked)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    subprocess.run(
        [sys.executable, str(root / "bench" / "bench_metadata.py"), "--smoke", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    rows = json.loads(out.read_text())
    cases = {(r["model"], r["ws"], r["stage"]) for r in rows}
    assert cases == {
        (m, ws, st) for m in ("llama-smoke", "moe-smoke") for ws in (8, 64) for st in (1, 3)
    }
    for r in rows:
        assert r["manifest_bytes"] > 0 and r["blob_index_bytes"] > 0 and r["sources"] > 0


_KEYS = st.one_of(
    st.sampled_from(["module", "master", "state", "exp_avg", "gate.weight", "x" * 700]),
    st.builds(
        lambda e, w: f"moe.experts.{e}.{w}",
        st.sampled_from(["0", "3", "12", "9999999", "01"]),
        st.sampled_from(["w1", "b1"]),
    ),
    st.builds(lambda e: f"block.{e}.ffn", st.sampled_from(["1", "2", "x"])),
    st.integers(-3, 5),
)


@settings(max_examples=300)
@given(
    st.lists(st.lists(_KEYS, max_size=5).map(tuple), max_size=12),
    st.sampled_from(
        [
            EXPERTS,
            (r"^block\.(\w+)\.", r"experts\.(\d+)\."),
            (r"experts\.(\d+)\.", r"^block\.(\d+)\."),
        ]
    ),
)
@example([("module", "x" * 700, "x" * 700, "moe.experts.3.w1")], EXPERTS)  # too long
@example([("block.x.ffn", "moe.experts.3.w1")], (r"^block\.(\w+)\.", r"experts\.(\d+)\."))
@example([("moe.experts.9999999.w1",), ("x" * 700,) * 3], EXPERTS)  # bad id before too long
def test_experts_of_is_expert_of_on_each_path(
    paths: list[tuple[Any, ...]], patterns: tuple[str, ...]
) -> None:
    """The vectorised matcher gives expert_of's answer for every path, or the error expert_of
    raises on the first path (in order) that raises."""
    spec = zckpt.ZeroSpec(2, 1, experts=patterns)
    want: list[int | None] = []
    error = None
    for p in paths:
        try:
            want.append(spec.expert_of(p))
        except zckpt.SpecError as e:
            error = str(e)
            break
    if error is None:
        assert spec.experts_of(paths) == want
    else:
        with pytest.raises(zckpt.SpecError) as got:
            spec.experts_of(paths)
        assert str(got.value) == error


def test_placements_read_like_a_tuple() -> None:
    state = {"module": {"w": torch.zeros(4)}, "master": {"w": torch.zeros(4)}, "n": torch.ones(())}
    plan = zckpt.plan_shards(state, zckpt.ZeroSpec(2, 2))
    as_tuple = tuple(plan.placements)
    assert as_tuple == (
        Placement(REPLICATED, owner=0),
        Placement(FLAT, group=0),
        Placement(REPLICATED, owner=1),
    )
    assert plan.placements == as_tuple and as_tuple == plan.placements
    assert plan.placements[1:] == as_tuple[1:] and plan.placements[-1] == as_tuple[-1]
    assert len(plan.placements) == 3 and hash(plan.placements) == hash(as_tuple)
    assert (
        plan.placements != as_tuple[:2]
        and plan.placements != zckpt.plan_shards(state, zckpt.ZeroSpec(2, 3)).placements
    )
    assert [p.kind for p in plan.placements] == [REPLICATED, FLAT, REPLICATED]
