"""Ranks given states with different tensors: the save fails on every rank, before the commit.

Rank 0 writes the manifest from its own skeleton. A rank whose state had a tensor more or less,
another shape or another dtype wrote a blob the manifest does not describe, and the save
committed anyway: ``latest`` named a checkpoint no load could read ("its fragments differ from
the manifest's record"), and ``keep_last`` deleted the good ones before it. Each test here fails
without ``store/_agreement.py``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.store import AsyncSaver
from zckpt.store._agreement import first_difference, structure
from zckpt.testing import assert_states_equal, run_ranks
from zckpt.tree import flatten

MUTATIONS = ("extra", "missing", "shape", "dtype", "renamed", "tied")


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=g)
    return {
        "module": {
            "w": w,
            "b": torch.randn(4, generator=g),
            "head": torch.randn(6, 4, generator=g),
        },
        "optimizer": {"exp_avg": torch.randn(6, 4, generator=g)},
        "step": seed,
    }


def _mutate(state: dict[str, Any], how: str) -> dict[str, Any]:
    m = dict(state["module"])
    if how == "extra":
        m["extra"] = torch.zeros(3)
    elif how == "missing":
        del m["b"]
    elif how == "shape":
        m["b"] = torch.zeros(5)
    elif how == "dtype":
        m["b"] = m["b"].double()
    elif how == "renamed":
        m["bias"] = m.pop("b")
    elif how == "tied":  # head tied to w on this rank only: one leaf fewer
        m["head"] = m["w"]
    return {**state, "module": m}


def _save_all(d: str, states: list[dict[str, Any]], tag: str) -> list[Any]:
    """Every rank's outcome (its result or the exception it raised)."""

    def rank(comm: Any) -> Any:
        try:
            spec = zckpt.ZeroSpec(len(states), 3)
            return zckpt.save_checkpoint(
                d, states[comm.rank], spec, comm=comm, tag=tag, keep_last=1
            )
        except zckpt.ZckptError as e:
            return e

    return run_ranks(rank, len(states))


@settings(max_examples=30, deadline=None)
@given(
    ws=st.integers(2, 4),
    how=st.sampled_from(MUTATIONS),
    odd=st.sets(st.integers(0, 3), min_size=1),
    where=st.sampled_from(["local", "memory"]),
)
@example(ws=2, how="extra", odd={1}, where="local")
@example(ws=3, how="tied", odd={0}, where="memory")
def test_ranks_with_other_tensors_fail_the_save_and_keep_what_was_there(
    tmp_path_factory: pytest.TempPathFactory, ws: int, how: str, odd: set[int], where: str
) -> None:
    odd = {r for r in odd if r < ws}
    if not odd or len(odd) == ws:
        odd = {ws - 1}
    base = str(tmp_path_factory.mktemp("agree"))
    d = base if where == "local" else f"memory://agree-{os.path.basename(base)}"
    good = _state(1)
    assert all(not isinstance(r, Exception) for r in _save_all(d, [good] * ws, "good"))
    states = [_mutate(_state(2), how) if r in odd else _state(2) for r in range(ws)]
    outcomes = _save_all(d, states, "bad")
    assert all(isinstance(o, zckpt.SaveError) for o in outcomes), outcomes
    for o in outcomes:
        assert "nothing was committed" in str(o) and "different tensors" in str(o), str(o)
        assert not o.committed
        assert "module/" in str(o), str(o)  # names the tensor
    assert set(outcomes[0].errors) <= set(range(ws))
    assert zckpt.list_tags(d) and [c.tag for c in zckpt.list_tags(d)] == ["good"]
    assert_states_equal(zckpt.load_checkpoint(d, world_size=1).state, good)
    storage, root = zckpt.store.storage_for(d)
    leftovers = storage.listdir(f"{root}/bad") if storage.is_dir(f"{root}/bad") else []
    assert leftovers == [], leftovers


def test_plain_values_may_differ_and_rank_0s_are_kept(tmp_path: Path) -> None:
    """As DeepSpeed keeps rank 0's client state: a per-rank counter is no structure."""
    states = [{**_state(3), "step": r, "name": f"rank{r}"} for r in range(3)]
    assert all(not isinstance(o, Exception) for o in _save_all(str(tmp_path), states, "t"))
    got = zckpt.load_checkpoint(tmp_path, world_size=1).state
    assert got["step"] == 0 and got["name"] == "rank0"


def test_first_difference_names_the_first_tensor_and_both_ranks() -> None:
    a = structure(flatten(_state(0))[0])
    b = structure(flatten(_mutate(_state(0), "shape"))[0])
    assert first_difference([a, a, b]) == (
        "tensor 'module/b' is float32 (4,) on rank 0 but float32 (5,) on rank 2"
    )
    assert first_difference([None, a, a]) is None
    assert first_difference([None, a, b]) is not None and "rank 1" in first_difference([None, a, b])  # type: ignore[operator]


@pytest.mark.parametrize(
    ("field", "other"),
    [("stage", zckpt.ZeroSpec(2, 2)), ("alignment", zckpt.ZeroSpec(2, 3, alignment=8))],
)
def test_ranks_with_another_spec_fail_the_save(
    tmp_path: Path, field: str, other: zckpt.ZeroSpec
) -> None:
    """Rank 1 cut its shard by another stage (or alignment): its fragments were not the
    manifest's plan, and the committed checkpoint did not load."""
    zckpt.save_checkpoint(tmp_path, _state(1), zckpt.ZeroSpec(1, 3), tag="good")
    specs = [zckpt.ZeroSpec(2, 3), other]

    def rank(comm: Any) -> Any:
        try:
            return zckpt.save_checkpoint(
                tmp_path, _state(2), specs[comm.rank], comm=comm, tag="bad"
            )
        except zckpt.ZckptError as e:
            return e

    outcomes = run_ranks(rank, 2)
    assert all(isinstance(o, zckpt.SaveError) for o in outcomes), outcomes
    want = f"rank 0 saved with {field}={getattr(specs[0], field)!r}, rank 1 with {field}="
    assert all(want in str(o) and "nothing was committed" in str(o) for o in outcomes), outcomes
    assert outcomes[0].errors.keys() == {1}
    assert [c.tag for c in zckpt.list_tags(tmp_path)] == ["good"]
    assert not (tmp_path / "bad").exists() or not os.listdir(tmp_path / "bad")
    assert_states_equal(zckpt.load_checkpoint(tmp_path, world_size=1).state, _state(1))


class _FlippingLatest(zckpt.store.LocalStorage):
    """``latest`` names ``t1`` and ``t2`` in turn at each read: another job saving to the
    directory while the ranks of this one resume from it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.lock = threading.Lock()

    def read(self, path: str, offset: int, length: int) -> bytes:
        if os.path.basename(path) == "latest":
            with self.lock:
                self.reads += 1
                return (b"t1", b"t2")[self.reads % 2][offset : offset + length]
        return super().read(path, offset, length)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def test_every_rank_resumes_from_the_tag_latest_named_for_rank_0(tmp_path: Path) -> None:
    """Each rank read ``latest`` itself: with it rewritten between two ranks' reads, rank 0
    resumed from t2 and rank 1 from t1, and both trained on, silently apart."""
    from zckpt.adapters import Checkpointer

    for i, tag in enumerate(("t1", "t2")):
        Checkpointer(_model(i), existing="keep").save_checkpoint(tmp_path, tag=tag)
    storage = _FlippingLatest()

    def rank(comm: Any) -> Any:
        model = _model(7)
        path, _ = Checkpointer(model, comm=comm, storage=storage).load_checkpoint(tmp_path)
        return os.path.basename(str(path)), model.weight.detach().clone()

    got = run_ranks(rank, 3)
    assert len({t for t, _ in got}) == 1, [t for t, _ in got]
    assert all(torch.equal(w, got[0][1]) for _, w in got)
    assert storage.reads == 1  # rank 0's read; the others load the tag it named


def test_ranks_that_loaded_different_checkpoints_all_raise(tmp_path: Path) -> None:
    from zckpt.adapters import Checkpointer

    def rank(comm: Any) -> Any:
        ck = Checkpointer(_model(0), comm=comm)
        views = [("/d/t1", None, "g1"), ("/d/t1", None, "g1"), ("/d/t1", None, "g2")]
        try:
            return ck._agreed(lambda: views[comm.rank])
        except zckpt.ZckptError as e:
            return e

    got = run_ranks(rank, 3)
    assert all(isinstance(e, zckpt.LoadError) for e in got), got
    assert all("rank 2: /d/t1 (generation g2)" in str(e) for e in got)

    def failing(comm: Any) -> Any:
        ck = Checkpointer(_model(0), comm=comm)

        def load() -> Any:
            if comm.rank == 1:
                raise zckpt.LoadError("rank 1's disk")
            return ("/d/t1", None, "g1")

        try:
            return ck._agreed(load)
        except zckpt.ZckptError as e:
            return e

    got = run_ranks(failing, 3)  # no rank waits for the one that failed
    assert all(isinstance(e, zckpt.LoadError) for e in got), got
    assert "rank 1: LoadError: rank 1's disk" in str(got[0]) and str(got[1]) == "rank 1's disk"


def test_an_asynchronous_save_fails_the_same_way(tmp_path: Path) -> None:
    """The check runs in the save's second half, which an asynchronous save runs in its
    background thread: ``wait()`` raises it on every rank."""
    zckpt.save_checkpoint(tmp_path, _state(1), zckpt.ZeroSpec(1, 3), tag="good")

    def rank(comm: Any) -> Any:
        state = _mutate(_state(2), "shape") if comm.rank == 1 else _state(2)
        pending = zckpt.save_checkpoint(
            tmp_path, state, zckpt.ZeroSpec(2, 3), comm=comm, tag="bad", async_=AsyncSaver()
        )
        try:
            return pending.wait(timeout=60)
        except zckpt.ZckptError as e:
            return e

    got = run_ranks(rank, 2)
    assert all(isinstance(e, zckpt.SaveError) for e in got), got
    assert all("tensor 'module/b' is float32 (4,) on rank 0" in str(e) for e in got), got
    assert [c.tag for c in zckpt.list_tags(tmp_path)] == ["good"]


def _save_to(dirs: list[str], tag: str = "t") -> list[Any]:
    def rank(comm: Any) -> Any:
        try:
            return zckpt.save_checkpoint(
                dirs[comm.rank], _state(2), zckpt.ZeroSpec(len(dirs), 3), comm=comm, tag=tag
            )
        except zckpt.ZckptError as e:
            return e

    return run_ranks(rank, len(dirs))


def test_a_rank_that_saved_elsewhere_fails_the_save(tmp_path: Path) -> None:
    """Rank 1 wrote its blob under its own directory (a rank-dependent path, or a node-local
    disk at the same path): rank 0 committed a manifest naming a file no load could find."""
    shared, own = tmp_path / "shared", tmp_path / "own"
    zckpt.save_checkpoint(shared, _state(1), zckpt.ZeroSpec(1, 3), tag="good")
    (own / "t").mkdir(parents=True)  # rank 1's write finds its directory
    got = _save_to([str(shared), str(own)])
    assert all(isinstance(e, zckpt.SaveError) for e in got), got
    assert all("rank 1's file" in str(e) and "is not there as rank 0 lists" in str(e) for e in got)
    assert [c.tag for c in zckpt.list_tags(shared)] == ["good"]
    assert not (shared / "t").exists()
    assert_states_equal(zckpt.load_checkpoint(shared, world_size=1).state, _state(1))


def test_one_shared_directory_by_two_paths_is_one_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    got = _save_to([str(tmp_path / "real"), str(tmp_path / "link")])
    assert not any(isinstance(e, Exception) for e in got), got
    assert_states_equal(zckpt.load_checkpoint(tmp_path / "real", world_size=1).state, _state(2))


def test_ranks_that_name_other_urls_fail_the_save() -> None:
    base = f"memory://agree-urls-{os.getpid()}"
    zckpt.save_checkpoint(f"{base}/a", _state(1), zckpt.ZeroSpec(1, 3), tag="good")
    got = _save_to([f"{base}/a", f"{base}/b"])
    assert all(isinstance(e, zckpt.SaveError) for e in got), got
    assert all("saved to different places: rank 0 wrote to" in str(e) for e in got), got
    assert [c.tag for c in zckpt.list_tags(f"{base}/a")] == ["good"]
