"""The collective save path with ranks as threads: each rank writes its own file; errors and tag
mismatches reach every rank; nothing hangs; nothing is committed after a failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.testing import ThreadComm, assert_states_equal, gather_errors, run_ranks


def state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 7, generator=g)
    return {
        "module": {"w": w.half()},
        "master": {"w": w},
        "opt": {"m": torch.randn(33, 7, generator=g)},
    }


def test_each_rank_writes_its_own_file(tmp_path: Path) -> None:
    s = state()
    spec = zckpt.ZeroSpec(4, 2)
    plan = zckpt.plan_shards(s, spec)

    def rank_main(comm: ThreadComm) -> str:
        local = zckpt.shard_state(s, plan, comm.rank)  # what a ZeRO rank holds, nothing more
        return zckpt.save_checkpoint(tmp_path, local, tag="t", comm=comm).path

    assert run_ranks(rank_main, 4) == [str(tmp_path / "t")] * 4
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, s)
    assert len(list((tmp_path / "t").glob("*.rank*"))) == 4


def test_tag_mismatch_fails_on_every_rank(tmp_path: Path) -> None:
    s = state()
    spec = zckpt.ZeroSpec(3, 1)

    def rank_main(comm: ThreadComm) -> None:
        zckpt.save_checkpoint(
            tmp_path, s, spec, tag=f"t{comm.rank % 2}", comm=comm, tag_validation="fail"
        )

    errors = gather_errors(rank_main, 3)
    assert all(isinstance(e, zckpt.TagError) for e in errors), errors
    assert "rank 1 't1'" in str(errors[2])
    assert not (tmp_path / "t0" / "manifest.zckm").exists()


def test_tag_mismatch_warns_and_uses_rank0(tmp_path: Path) -> None:
    s = state()

    def rank_main(comm: ThreadComm) -> str:
        spec = zckpt.ZeroSpec(2, 3)
        return zckpt.save_checkpoint(tmp_path, s, spec, tag=f"t{comm.rank}", comm=comm).tag

    # warnings filters are process-wide: catch in the main thread, not in each rank's thread
    with pytest.warns(UserWarning, match="different tags: rank 0 't0', rank 1 't1'"):
        assert run_ranks(rank_main, 2) == ["t0", "t0"]


def test_a_failing_rank_fails_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    s = state()
    spec = zckpt.ZeroSpec(3, 2)
    zckpt.save_checkpoint(tmp_path, s, spec, tag="before")

    class Boom(zckpt.store.LocalStorage):
        def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
            if "rank00001" in path:
                raise RuntimeError("user code exploded")
            return super().write_atomic(path, buffers)

    def rank_main(comm: ThreadComm) -> None:
        zckpt.save_checkpoint(tmp_path, s, spec, tag="after", comm=comm, storage=Boom())

    errors = gather_errors(rank_main, 3)
    for e in errors:
        assert isinstance(e, zckpt.SaveError)
        assert e.errors == {1: "RuntimeError: user code exploded"}
    assert not (tmp_path / "after" / "manifest.zckm").exists()
    assert not (tmp_path / "after").exists()  # a failed save removes what it wrote
    assert (tmp_path / "latest").read_text() == "before"


def test_process_group_must_match_spec(tmp_path: Path) -> None:
    def rank_main(comm: ThreadComm) -> None:
        zckpt.save_checkpoint(tmp_path, state(), zckpt.ZeroSpec(3, 1), tag="x", comm=comm)

    errors = gather_errors(rank_main, 2)
    assert all(isinstance(e, zckpt.SpecError) for e in errors)
