"""A skeleton decoded from the columnar form plans from its tree's arrays, never building its
tuples: the plans, expert ids, paths and errors must be exactly those of the eager skeleton."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.errors import FormatError
from zckpt.format import _columns
from zckpt.format._columns import skeleton_from_columns, skeleton_to_columns
from zckpt.format._tree_index import ColumnSkeleton
from zckpt.testing import specs, states, training_states
from zckpt.tree import DICT, TENSOR, Skeleton, flatten, iter_nodes

EXPERTS = (r"experts\.(\d+)\.",)
PATTERNS = [
    EXPERTS,
    (r"^block\.(\w+)\.", r"experts\.(\d+)\."),
    (r"experts\.(\d+)\.", r"^block\.(\d+)\."),
]


def _columnar(skel: Skeleton) -> ColumnSkeleton:
    back = skeleton_from_columns(skeleton_to_columns(skel))
    assert isinstance(back, ColumnSkeleton) and not back.built
    return back


def _eager(cols: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Skeleton:
    """The skeleton as the node-by-node build alone gives it (the reader before the index)."""
    with monkeypatch.context() as m:
        m.setattr(_columns, "tree_index", lambda *a: None)
        return skeleton_from_columns(cols)


@st.composite
def moe_states(draw: st.DrawFn) -> Any:
    """Expert and plain tensors under module, master and optimizer state, with odd keys mixed
    in: a list level, int keys, a key whose group 1 is no id, a top-level tensor."""
    n = draw(st.integers(1, 4))
    keys = [f"moe.experts.{e}.w{j}" for e in range(n) for j in range(draw(st.integers(1, 2)))]
    keys += draw(
        st.lists(st.sampled_from(["gate.weight", "block.1.ffn", "block.x.ffn"]), max_size=2)
    )
    shapes = {k: (draw(st.integers(0, 6)), draw(st.integers(1, 3))) for k in dict.fromkeys(keys)}
    master = {k: torch.zeros(s) for k, s in shapes.items()}
    state: dict[Any, Any] = {
        "module": {k: t.bfloat16() for k, t in master.items()},
        "master": master,
        "optimizer": {"state": {k: {"exp_avg": torch.zeros(t.shape)} for k, t in master.items()}},
    }
    if draw(st.booleans()):
        state["extra"] = [torch.zeros(2), {7: torch.zeros(3), "experts.2.x": torch.ones(1)}]
    if draw(st.booleans()):
        state[3] = torch.tensor(1)
    return state


@st.composite
def cases(draw: st.DrawFn) -> tuple[Any, zckpt.ZeroSpec]:
    ws = draw(st.sampled_from([1, 2, 3, 4, 8, 12]))
    stage = draw(st.integers(1, 3))
    replicate = draw(st.sampled_from([(), ("optimizer/state",), ("extra",)]))
    if draw(st.booleans()):
        state = draw(moe_states())
        experts = draw(st.sampled_from(PATTERNS))
        ep = draw(st.sampled_from([1, 1, 2]))
        if ws % ep:
            ep = 1
        spec = zckpt.ZeroSpec(
            ws, stage, experts=experts, expert_parallel_size=ep, replicate=replicate
        )
        return state, spec
    state = draw(training_states(max_params=6) if draw(st.booleans()) else states())
    groups = draw(specs(state)).param_groups
    return state, zckpt.ZeroSpec(ws, stage, replicate=replicate, param_groups=groups)


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except zckpt.ZckptError as e:
        return (type(e).__name__, str(e))


@settings(max_examples=150)
@given(cases())
@example(({"master": {"experts.1.w": torch.zeros(2)}, 5: torch.zeros(1)}, zckpt.ZeroSpec(2, 1)))
@example(
    ({"module": {"moe.experts.99999999.w": torch.zeros(2)}}, zckpt.ZeroSpec(2, 3, experts=EXPERTS))
)
def test_columnar_skeleton_plans_as_the_eager_one(case: tuple[Any, zckpt.ZeroSpec]) -> None:
    state, spec = case
    skel = flatten(state)[0]
    col = _columnar(skel)
    want = _outcome(lambda: zckpt.plan_shards(skel, spec))
    got = _outcome(lambda: zckpt.plan_shards(col, spec))
    if isinstance(want, tuple):
        assert got == want
        return
    assert got.placements == want.placements and got.groups == want.groups
    assert got.num_experts == want.num_experts
    for r in range(spec.world_size):
        assert got.writes_of(r) == want.writes_of(r)
        assert got.holds(r) == want.holds(r)
    # Another world size planned from the same decoded skeleton, as a loading rank does.
    other = spec.with_world_size(max(1, spec.world_size - 1))
    again = _outcome(lambda: tuple(zckpt.plan_shards(col, other).placements))
    assert again == _outcome(lambda: tuple(zckpt.plan_shards(skel, other).placements))
    assert col == skel and col.paths == skel.paths and col.built


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_planning_a_moe_checkpoint_builds_no_tuples(stage: int) -> None:
    """A loading rank's work on a MoE manifest's skeleton (the saved plan, the new one, its
    holdings and their writers) reads the tree's arrays only."""
    params = {f"layers.{i}.experts.{e}.w": (4, 3) for i in range(3) for e in range(8)}
    params.update({"embed": (10, 3), "norm": (3,)})
    state = {
        "module": {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in params.items()},
        "master": {k: torch.zeros(s) for k, s in params.items()},
        "optimizer": {"state": {k: {"exp_avg": torch.zeros(s)} for k, s in params.items()}},
    }
    skel = flatten(state)[0]
    col = _columnar(skel)
    saved = zckpt.ZeroSpec(8, stage, experts=EXPERTS, expert_parallel_size=4)
    new = zckpt.ZeroSpec(6, stage, experts=EXPERTS, expert_parallel_size=2)
    old_plan, new_plan = zckpt.plan_shards(col, saved), zckpt.plan_shards(col, new)
    for r in range(6):
        for f in new_plan.holds(r):
            assert old_plan.writers(f.leaf, f.start, f.stop)
    assert not col.built
    assert new_plan.placements == zckpt.plan_shards(skel, new).placements


@settings(max_examples=150)
@given(st.one_of(states(), moe_states()), st.sampled_from(PATTERNS))
def test_tree_index_paths_and_expert_ids(state: Any, patterns: tuple[str, ...]) -> None:
    skel = flatten(state)[0]
    col = _columnar(skel)
    tree = col.index
    assert [tree.path(i) for i in range(len(skel))] == list(skel.paths)
    nodes = list(iter_nodes(skel.node))  # preorder, as the columns list them
    depth = {p: len(p) for p, _ in nodes}
    assert tree.depth.tolist() == [depth[p] for p, _ in nodes]
    index_of = {p: j for j, (p, _) in enumerate(nodes)}
    assert tree.parent.tolist() == [index_of[p[:-1]] if p else -1 for p, _ in nodes]
    firsts = [index_of[p] for p in skel.paths]
    assert tree.leaf_node.tolist() == firsts
    spec = zckpt.ZeroSpec(2, 1, experts=patterns)
    want = _outcome(lambda: spec._expert_ids(skel.paths).tolist())
    assert _outcome(lambda: spec._expert_ids_tree(tree).tolist()) == want
    assert not col.built


def test_too_long_and_bad_id_paths_raise_the_eager_error() -> None:
    state = {
        "a": {"moe.experts.9999999.w1": torch.zeros(1)},
        "b": {"x" * 700: {"x" * 700: {"y" * 700: torch.zeros(1)}}},
    }
    for order in (state, dict(reversed(state.items()))):
        skel = flatten(order)[0]
        spec = zckpt.ZeroSpec(2, 1, experts=EXPERTS)
        with pytest.raises(zckpt.SpecError) as want:
            spec._expert_ids(skel.paths)
        with pytest.raises(zckpt.SpecError) as got:
            spec._expert_ids_tree(_columnar(skel).index)
        assert str(got.value) == str(want.value)


@st.composite
def mangled_columns(draw: st.DrawFn) -> dict[str, Any]:
    """Valid columns with the tree's shape disturbed (child counts moved between containers,
    key ids swapped or repeated): the tree may close early, nest too deep or repeat a key."""
    cols = dict(skeleton_to_columns(flatten(draw(states()))[0]))
    counts = np.frombuffer(cols["counts"], "<u4").astype(np.int64)
    if len(counts) > 1 and draw(st.booleans()):
        i, j = draw(st.permutations(range(len(counts))))[:2]
        k = draw(st.integers(0, int(counts[i])))
        counts[i] -= k
        counts[j] += k
        cols["counts"] = counts.astype("<u4").tobytes()
    kids = np.frombuffer(cols["key_ids"], "<u4").copy()
    if len(kids) > 1 and draw(st.booleans()):
        i, j = draw(st.integers(0, len(kids) - 1)), draw(st.integers(0, len(kids) - 1))
        kids[i] = kids[j] if draw(st.booleans()) else kids[i]
        kids[[i, j]] = kids[[j, i]]
        cols["key_ids"] = kids.tobytes()
    return cols


@settings(max_examples=200)
@given(mangled_columns())
def test_mangled_trees_fail_as_the_node_by_node_build(cols: dict[str, Any]) -> None:
    monkeypatch = pytest.MonkeyPatch()
    want = _outcome(lambda: _eager(cols, monkeypatch))
    got = _outcome(lambda: skeleton_from_columns(cols))
    if isinstance(want, tuple):
        assert got == want
    else:
        assert not isinstance(got, tuple), got
        assert got == want and got.paths == want.paths


def test_deep_nesting_found_by_the_index_names_the_place() -> None:
    cols = dict(skeleton_to_columns(Skeleton((DICT, ()), (), ())))
    # A chain of 130 dicts, as a hostile writer could declare it.
    n = 131
    cols.update(
        tags=bytes([DICT] * n + [TENSOR]),
        counts=np.ones(n, "<u4").tobytes(),
        keys=["k"],
        key_ids=np.zeros(n, "<u4").tobytes(),
        leaves=np.zeros(1, "<u4").tobytes(),
        dtypes=b"\x00",
        ndims=b"\x01",
        dims=np.array([1], "<u8").tobytes(),
    )
    with pytest.raises(FormatError, match=r"k/k/k.*nested deeper than 128"):
        skeleton_from_columns(cols)


def test_columnar_skeleton_copies_as_a_plain_one() -> None:
    import copy

    skel = flatten({"a": [torch.zeros(2), {"b": torch.ones(1)}], "n": 3})[0]
    col = _columnar(skel)
    assert col.name(1) == "a/1/b" and not col.built
    dup = copy.deepcopy(col)
    assert type(dup) is Skeleton and dup == skel and dup.paths == skel.paths
    assert hash(col) == hash(skel) and col == col
