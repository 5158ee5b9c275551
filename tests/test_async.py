"""Asynchronous saves: the snapshot is taken at call time, errors reach wait() and the next save
on every rank, saves commit in order, staging memory is reused, and exit does not lose a save."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.store import AsyncSaver, LocalStorage, PendingSave, SaveError
from zckpt.testing import ThreadComm, assert_states_equal, run_ranks
from zckpt.tree import flatten, unflatten

GROUPS = (("embed.weight", "fc.weight"), ("fc.bias",))
ROOT = Path(__file__).resolve().parents[1]


def training_state(seed: int = 0) -> dict[str, Any]:
    """Every kind of leaf: fp32, bf16, fp16, int, bool, 0-d, non-contiguous, tied, plain values."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (11, 5), "fc.weight": (7, 5), "fc.bias": (7,)}
    master = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    module: dict[str, Any] = {n: t.bfloat16() for n, t in master.items()}
    module["head.weight"] = module["embed.weight"]  # tied
    module["mask"] = torch.rand(13, generator=g) > 0.5
    module["scale"] = torch.randn(6, 4, generator=g).half().t()  # non-contiguous
    module["num_batches"] = torch.tensor(3)
    opt = {
        n: {"exp_avg": torch.randn(s, generator=g), "exp_avg_sq": torch.rand(s, generator=g),
            "step": torch.tensor(3.0)}
        for n, s in shapes.items()
    }  # fmt: skip
    return {
        "module": module,
        "master": master,
        "optimizer": {"state": opt, "param_groups": [{"lr": 0.005, "betas": (0.9, 0.999)}]},
        "global_steps": 3,
    }


def spec(ws: int = 4, stage: int = 2) -> zckpt.ZeroSpec:
    return zckpt.ZeroSpec(ws, stage, param_groups=GROUPS)


def deep_copy(state: Any) -> Any:
    skel, leaves = flatten(state)
    return unflatten(skel, [t.clone() for t in leaves])


def mutate(state: Any) -> None:
    """What a training step does: change every tensor in place."""
    for t in flatten(state)[1]:  # detached views of the same memory
        if t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)


class Gated(LocalStorage):
    """Local files, but no blob is written before ``gate`` is set: the test decides when the
    background thread may run, so "mutated before written" is certain, not a race."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
        if not self.gate.wait(30):
            raise TimeoutError("gate never opened")
        return super().write_atomic(path, buffers)


class Full(LocalStorage):
    """A disk that is full for blobs whose name contains ``which``."""

    def __init__(self, which: str = ".rank") -> None:
        self.which = which

    def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
        if self.which in os.path.basename(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_atomic(path, buffers)


@pytest.fixture
def saver() -> Iterator[AsyncSaver]:
    s = AsyncSaver()
    yield s
    with contextlib.suppress(SaveError):
        s.close()


@pytest.fixture(autouse=True)
def _settle_default_saver() -> Iterator[None]:
    yield
    with contextlib.suppress(SaveError):
        zckpt.store.default_saver().close()


def test_mutations_after_the_call_do_not_reach_the_checkpoint(
    tmp_path: Path, saver: AsyncSaver
) -> None:
    state = training_state()
    client = {"history": [1.0, 2.0], "rng": torch.arange(5), "none": torch.zeros(0, 3)}
    state["master"]["fc.bias"].requires_grad_(True)  # parameters often are
    at_call = deep_copy(state)
    client_at_call = deep_copy(client)
    storage = Gated()
    pending = zckpt.save_checkpoint(
        tmp_path, state, spec(), client_state=client, storage=storage, async_=saver
    )
    assert isinstance(pending, PendingSave)
    assert pending.tag == "global_step3" and not pending.done()
    mutate(state)
    mutate(client)
    client["history"].append(3.0)
    storage.gate.set()
    saved = pending.wait(timeout=30)
    assert pending.done() and saved.path == str(tmp_path / "global_step3")
    got = zckpt.load_checkpoint(tmp_path)
    assert_states_equal(got.state, at_call)
    assert_states_equal(got.client_state, client_at_call)
    assert got.state["module"]["head.weight"] is got.state["module"]["embed.weight"]


@pytest.mark.parametrize(("ws", "stage"), [(1, 1), (3, 3)])
def test_a_local_shard_is_snapshotted_too(
    tmp_path: Path, saver: AsyncSaver, ws: int, stage: int
) -> None:
    state = training_state(1)
    at_call = deep_copy(state)
    plan = zckpt.plan_shards(state, spec(ws, stage))
    shards = [zckpt.shard_state(state, plan, r) for r in range(ws)]
    storage = Gated()

    def rank_main(comm: ThreadComm) -> PendingSave:
        mine = AsyncSaver()  # ranks as threads: a saver each
        return mine.save(tmp_path, shards[comm.rank], tag="t", comm=comm, storage=storage)

    pendings = run_ranks(rank_main, ws)
    mutate(state)
    storage.gate.set()
    assert {p.wait(30).tag for p in pendings} == {"t"}
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, at_call)


def test_background_errors_surface_on_wait_and_on_the_next_save(
    tmp_path: Path, saver: AsyncSaver
) -> None:
    zckpt.save_checkpoint(tmp_path, training_state(0), spec(), tag="good")
    pending = saver.save(tmp_path, training_state(1), spec(), tag="bad", storage=Full())
    for _ in range(2):  # every wait() raises
        with pytest.raises(SaveError, match=r"rank 0: OSError: .*No space left") as info:
            pending.wait(30)
        assert list(info.value.errors) == [0]  # one process plays 4 ranks; it stops at the first
    with pytest.raises(SaveError, match=r"previous asynchronous save of .*bad failed") as info:
        saver.save(tmp_path, training_state(2), spec(), tag="next")
    assert isinstance(info.value.__cause__, SaveError)
    assert 0 in info.value.errors
    assert not (tmp_path / "next").exists()  # nothing of the refused save happened
    assert not (tmp_path / "bad" / "manifest.zckm").exists()
    assert not (tmp_path / "bad").exists()  # a failed save removes what it wrote
    assert (tmp_path / "latest").read_text() == "good"
    # Raised once: the save after it goes ahead.
    assert saver.save(tmp_path, training_state(2), spec(), tag="next").wait(30).tag == "next"


def test_the_next_save_raises_even_if_nobody_waited(tmp_path: Path) -> None:
    # The rule must not depend on whether a rank called wait(), or ranks would disagree.
    zckpt.save_checkpoint(tmp_path, training_state(), spec(), tag="x", storage=Full(), async_=True)
    with pytest.raises(SaveError, match="previous asynchronous save"):
        zckpt.save_checkpoint(tmp_path, training_state(), spec(), tag="y")  # synchronous, too
    assert zckpt.save_checkpoint(tmp_path, training_state(), spec(), tag="y").tag == "y"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without pinned memory")
def test_a_failed_snapshot_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    # Pinned memory cannot be allocated without an accelerator: the snapshot fails on rank 1
    # only, after the ranks agreed; every rank must still learn it, and nothing may hang.
    state = training_state()

    def rank_main(comm: ThreadComm) -> str:
        mine = AsyncSaver(pin_memory=comm.rank == 1)
        pending = mine.save(tmp_path, state, spec(3, 2), tag="t", comm=comm)
        with pytest.raises(SaveError) as info:
            pending.wait(30)
        assert list(info.value.errors) == [1]
        return info.value.errors[1]

    texts = run_ranks(rank_main, 3)
    assert all("RuntimeError: pin_memory" in t for t in texts), texts
    assert not (tmp_path / "t" / "manifest.zckm").exists()


def test_two_saves_in_a_row_commit_in_order(tmp_path: Path, saver: AsyncSaver) -> None:
    state = training_state()
    first_state = deep_copy(state)
    first = zckpt.save_checkpoint(tmp_path, state, spec(), tag="a", async_=saver)
    mutate(state)
    second_state = deep_copy(state)
    second = zckpt.save_checkpoint(tmp_path, state, spec(), tag="b", async_=saver)
    assert first.done()  # the second save waited for the first before snapshotting
    mutate(state)
    assert second.wait(30).tag == "b"
    assert (tmp_path / "latest").read_text() == "b"
    tags = zckpt.list_tags(tmp_path)
    assert [t.tag for t in sorted(tags, key=lambda t: t.committed_at)] == ["a", "b"]
    assert_states_equal(zckpt.load_checkpoint(tmp_path, tag="a").state, first_state)
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, second_state)


def test_a_synchronous_save_waits_for_the_default_savers_save(tmp_path: Path) -> None:
    storage = Gated()
    state = training_state()
    pending = zckpt.save_checkpoint(tmp_path, state, spec(), tag="a", storage=storage, async_=True)
    assert pending is zckpt.store.default_saver().pending
    threading.Timer(0.2, storage.gate.set).start()
    zckpt.save_checkpoint(tmp_path, state, spec(), tag="b")
    assert pending.done()
    assert (tmp_path / "latest").read_text() == "b"
    assert {t.tag for t in zckpt.list_tags(tmp_path)} == {"a", "b"}


def test_staging_memory_is_reused(tmp_path: Path, saver: AsyncSaver) -> None:
    state = training_state()
    ptrs = []
    for step in range(3):
        mutate(state)
        pending = saver.save(tmp_path, state, spec(), tag=f"s{step}")
        ptrs.append([d.data_ptr() for sh in pending.shards for d in sh.data])
        pending.wait(30)
    assert ptrs[0] == ptrs[1] == ptrs[2]
    held = saver.staging_nbytes
    assert held > 0
    bigger = {"master": {"w": torch.randn(held // 4 + 1000)}}
    saver.save(tmp_path, bigger, spec(2, 1), tag="big").wait(30)
    assert saver.staging_nbytes > held  # grown once, kept for the next saves
    saver.close()
    assert saver.staging_nbytes == 0


def test_every_rank_saves_asynchronously_and_learns_every_error(tmp_path: Path) -> None:
    state = training_state()
    ws = 3
    plan = zckpt.plan_shards(state, spec(ws, 2))

    # The training loop's own synchronisation: not the save's communicator, which its background
    # thread is using (as TorchComm keeps zckpt's collectives on a group of their own).
    training = threading.Barrier(ws, timeout=30)

    def rank_main(comm: ThreadComm) -> None:
        mine = AsyncSaver()
        local = zckpt.shard_state(state, plan, comm.rank)
        ok = mine.save(tmp_path, local, tag="ok", comm=comm)
        training.wait()  # every rank has its snapshot: now training mutates (once, on rank 0)
        if comm.rank == 0:
            mutate(state)
        training.wait()
        assert ok.wait(30).tag == "ok"
        bad = mine.save(tmp_path, local, tag="bad", comm=comm, storage=Full("rank00001"))
        with pytest.raises(SaveError) as info:
            bad.wait(30)
        assert list(info.value.errors) == [1]
        assert info.value.errors[1].startswith("OSError: [Errno 28]")
        assert "No space left" in info.value.errors[1]
        with pytest.raises(SaveError, match="previous asynchronous save"):
            mine.save(tmp_path, local, tag="after", comm=comm)
        assert mine.save(tmp_path, local, tag="after", comm=comm).wait(30).tag == "after"
        mine.close()

    expected = deep_copy(state)
    run_ranks(rank_main, ws, timeout=30)
    assert_states_equal(zckpt.load_checkpoint(tmp_path, tag="ok").state, expected)
    assert not (tmp_path / "bad" / "manifest.zckm").exists()
    assert (tmp_path / "latest").read_text() == "after"


def test_one_saver_refuses_two_threads_at_once(tmp_path: Path, saver: AsyncSaver) -> None:
    class SlowDirs(LocalStorage):
        entered, leave = threading.Event(), threading.Event()

        def makedirs(self, path: str) -> None:
            self.entered.set()
            self.leave.wait(30)
            super().makedirs(path)

    storage = SlowDirs()
    first = threading.Thread(
        target=lambda: saver.save(tmp_path, training_state(), spec(), tag="a", storage=storage)
    )
    first.start()
    assert storage.entered.wait(30)
    with pytest.raises(SaveError, match="on another thread"):
        saver.save(tmp_path, training_state(), spec(), tag="b")
    storage.leave.set()
    first.join(30)
    assert saver.wait() is not None


def test_bad_async_argument() -> None:
    with pytest.raises(TypeError, match="async_ must be a bool or an AsyncSaver"):
        zckpt.save_checkpoint("/nonexistent", {}, spec(), async_="yes")  # type: ignore[call-overload]


def test_exit_commits_a_save_in_flight_and_reports_one_that_failed(tmp_path: Path) -> None:
    # The script ends (the interpreter shuts down) while a blob is still being written: the
    # non-daemon save thread must finish and commit, not be killed mid-way. Another save failed
    # and nobody waited for it: that must not pass in silence.
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    script = f"""
import errno, time, torch, zckpt
class Slow(zckpt.store.LocalStorage):
    def write_atomic(self, path, buffers):
        time.sleep(0.3)
        return super().write_atomic(path, buffers)
class Full(zckpt.store.LocalStorage):
    def write_atomic(self, path, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")
failing = zckpt.store.AsyncSaver()
zckpt.save_checkpoint({str(bad)!r}, {{"w": torch.ones(3)}}, zckpt.ZeroSpec(1, 1), tag="t",
                      storage=Full(), async_=failing)
state = {{"master": {{"w": torch.arange(1000.0)}}}}
p = zckpt.save_checkpoint({str(ok)!r}, state, zckpt.ZeroSpec(2, 1), tag="t",
                          storage=Slow(), async_=True)
print("returned", p.done(), flush=True)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "returned False\n"  # still writing when the script ended
    got = zckpt.load_checkpoint(ok, tag="t").state
    assert got["master"]["w"].tolist() == [float(i) for i in range(1000)]
    assert f"zckpt: the asynchronous save of {bad / 't'} failed" in out.stderr
    assert "nobody waited for it" in out.stderr and "No space left" in out.stderr
    assert not (bad / "t" / "manifest.zckm").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_is_staged_in_pinned_memory_and_loads_back_bitwise(tmp_path: Path) -> None:
    state = training_state()
    cuda_state = unflatten(flatten(state)[0], [t.cuda() for t in flatten(state)[1]])
    at_call = deep_copy(state)  # on the CPU, as loads return it
    with AsyncSaver() as mine:
        pending = mine.save(tmp_path, cuda_state, spec(), tag="gpu")
        mutate(cuda_state)  # on the GPU's stream, right after the call
        assert all(d.is_pinned() for sh in pending.shards for d in sh.data)
        assert pending.wait(60).tag == "gpu"
        again = mine.save(tmp_path, cuda_state, spec(), tag="gpu2")
        assert [d.data_ptr() for sh in again.shards for d in sh.data] == [
            d.data_ptr() for sh in pending.shards for d in sh.data
        ]
        skel, leaves = flatten(cuda_state)
        at_second = unflatten(skel, [t.cpu() for t in leaves])
        mutate(cuda_state)
        again.wait(60)
    assert_states_equal(zckpt.load_checkpoint(tmp_path, tag="gpu").state, at_call)
    assert_states_equal(zckpt.load_checkpoint(tmp_path, tag="gpu2").state, at_second)
