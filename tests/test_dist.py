"""Real process groups: ranks are spawned processes joined by gloo, not mocks.

One group per world size (2, then 3, then 4) runs a list of scenarios and writes what it saw to
JSON; the tests below check those results. Each group is killed after a deadline, so a hang
fails the tests instead of the suite. Run as a script, this file is one rank (the parent starts
it with ``scenario rank world_size workdir``).

Scenarios: train a small model with AdamW and an LR scheduler, save, resume at the same world
size (losses equal an uninterrupted run exactly) and restore at other world sizes (bitwise
equal to what was saved); the ZeRO partitioned optimizer at world size 2 loaded at 3; tag
mismatch in fail mode and a rank failing its write (every rank raises, nothing committed);
checkpoints of data-parallel subgroups; zckpt's collectives from a background thread while the
training loop runs its own.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import zckpt
from zckpt.adapters import Checkpointer, ZeroAdamW, training_state
from zckpt.dist import TorchComm, default_comm
from zckpt.testing import assert_states_equal

TIMEOUT = datetime.timedelta(seconds=60)
STEPS = 3
BATCH = 12  # divisible by every world size used


class Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(6, 16)
        self.fc2 = torch.nn.Linear(16, 3)
        self.scale = torch.nn.Parameter(torch.tensor(0.75))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        out: torch.Tensor = self.fc2(torch.tanh(self.fc1(x))) * self.scale
        return out


def groups(model: Net) -> list[dict[str, Any]]:
    return [
        {"params": [model.fc1.weight, model.fc2.weight], "weight_decay": 0.05},
        {"params": [model.fc1.bias, model.fc2.bias, model.scale], "weight_decay": 0.0},
    ]


def plain(seed: int) -> tuple[Net, torch.optim.Optimizer, Any]:
    model = Net(seed)
    opt = torch.optim.AdamW(groups(model), lr=0.05)
    return model, opt, torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=4)


def zero(seed: int) -> tuple[Net, ZeroAdamW, Any]:
    model = Net(seed)
    opt = ZeroAdamW(
        model,
        groups(model),
        lr=0.05,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        all_gather=dist.all_gather_into_tensor,
    )
    return model, opt, torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=4)


def train(model: Net, opt: torch.optim.Optimizer, sched: Any, steps: range) -> list[str]:
    """Data-parallel steps over a fixed global batch; returns the global losses (float.hex)."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x[rank::ws]), y[rank::ws])
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= ws
        opt.step()
        sched.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append((total / ws).item().hex())
    return losses


def save_ref(path: Path, state: Any) -> None:
    torch.save(state, path)  # the test's own reference copy (torch.save is fine in a test)


def load_ref(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def errors_of(fn: Callable[[], Any]) -> dict[str, str] | None:
    try:
        fn()
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e)}
    return None


# -- scenarios, one per world size -------------------------------------------------------------


def at_ws2(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rank = dist.get_rank()

    # Train, save, keep training: the uninterrupted run.
    model, opt, sched = plain(seed=0)
    ck = Checkpointer(model, opt, sched, comm=TorchComm(timeout=TIMEOUT))
    train(model, opt, sched, range(STEPS))
    ck.global_steps = STEPS
    ck.save_checkpoint(work / "plain", client_state={"saved_at": 2})
    if rank == 0:
        save_ref(work / "ref_step3.pt", training_state(model, opt, sched, global_steps=STEPS))
    out["uninterrupted"] = train(model, opt, sched, range(STEPS, 2 * STEPS))
    final = training_state(model, opt, sched)

    # Resume at the same world size in fresh objects: the same losses, bit for bit.
    model2, opt2, sched2 = plain(seed=1)
    ck2 = Checkpointer(model2, opt2, sched2, comm=ck.comm)
    path, client = ck2.load_checkpoint(work / "plain")
    out["resumed_from"] = [path, client, ck2.global_steps]
    out["resumed"] = train(model2, opt2, sched2, range(STEPS, 2 * STEPS))
    out["resumed_state"] = errors_of(
        lambda: assert_states_equal(training_state(model2, opt2, sched2), final)
    )

    # The ZeRO partitioned optimizer: each rank saves only its partitions.
    zmodel, zopt, zsched = zero(seed=0)
    zck = Checkpointer(zmodel, zopt, zsched, comm=ck.comm)
    train(zmodel, zopt, zsched, range(STEPS))
    zck.global_steps = STEPS
    zck.save_checkpoint(work / "zero")
    save_ref(work / f"zero_ws2_rank{rank}.pt", {"flat": zopt.flat, "module": zmodel.state_dict()})

    # zckpt's collectives from a background thread while training all-reduces on its own group.
    comm = ck.comm
    seen: list[Any] = []

    def background() -> None:
        for i in range(30):
            seen.append(comm.all_gather({"rank": rank, "i": i}))

    t = threading.Thread(target=background)
    t.start()
    for _ in range(30):
        x = torch.ones(64)
        dist.all_reduce(x)
        assert x[0].item() == dist.get_world_size()
    t.join(30)
    out["background"] = [not t.is_alive(), seen[-1] if seen else None, len(seen)]

    # default_comm: the world group's TorchComm, made once.
    out["default_comm"] = [type(default_comm()).__name__, default_comm() is default_comm()]

    # A rank that never arrives: the others raise after the timeout instead of waiting forever.
    short = TorchComm(timeout=datetime.timedelta(seconds=1))
    if rank == 0:
        t0 = time.monotonic()
        out["absent_rank"] = [errors_of(lambda: short.all_gather("alone")), time.monotonic() - t0]
    else:
        time.sleep(2.5)
    return out


def at_ws3(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rank = dist.get_rank()
    comm = TorchComm(timeout=TIMEOUT)

    # Restore the world-size-2 checkpoint: bitwise what was saved.
    model, opt, sched = plain(seed=7)
    ck = Checkpointer(model, opt, sched, comm=comm)
    ck.load_checkpoint(work / "plain")
    out["restored"] = errors_of(
        lambda: assert_states_equal(
            training_state(model, opt, sched, global_steps=ck.global_steps),
            load_ref(work / "ref_step3.pt"),
        )
    )
    # Train on and save at this world size, for the world-size-4 group.
    train(model, opt, sched, range(STEPS, STEPS + 1))
    ck.global_steps += 1
    ck.save_checkpoint(work / "plain")
    if rank == 0:
        save_ref(work / "ref_step4.pt", training_state(model, opt, sched, global_steps=STEPS + 1))

    # ZeRO: the world-size-2 partitions, loaded straight into this rank's partitions.
    zmodel, zopt, zsched = zero(seed=5)
    Checkpointer(zmodel, zopt, zsched, comm=comm).load_checkpoint(work / "zero")
    saved = [load_ref(work / f"zero_ws2_rank{r}.pt") for r in range(2)]

    def same_partitions() -> None:
        assert zopt.steps == [STEPS, STEPS], zopt.steps
        assert_states_equal(zmodel.state_dict(), saved[0]["module"])
        for g, lay in enumerate(zopt.layouts):
            numel = lay.offsets[-1] + lay.numels[-1]
            for kind in ("master", "exp_avg", "exp_avg_sq"):
                whole = torch.cat([s["flat"][g][kind] for s in saved])[:numel]
                want = torch.zeros(lay.stop - lay.start)
                piece = whole[lay.start : min(lay.stop, numel)]
                want[: piece.numel()] = piece
                assert torch.equal(zopt.flat[g][kind], want), (g, kind)
        assert zopt.scalar["scale"]["exp_avg"].item() != 0.0

    out["zero"] = errors_of(same_partitions)
    train(zmodel, zopt, zsched, range(STEPS, STEPS + 1))  # and it trains on

    # Tag mismatch in fail mode: every rank raises, nothing is committed.
    bad = Checkpointer(model, opt, sched, comm=comm, tag_validation="fail")
    out["tag_mismatch"] = errors_of(
        lambda: bad.save_checkpoint(work / "mismatch", tag=f"t{min(rank, 1)}")
    )
    return out


class FailOnRank(zckpt.store.LocalStorage):
    """Storage whose blob writes fail on one rank (an exception in the middle of the write)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
        if f".rank{self.rank:05d}-" in os.path.basename(path):
            raise OSError(28, "No space left on device (injected)")
        return super().write_atomic(path, buffers)


def at_ws4(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rank = dist.get_rank()
    comm = TorchComm(timeout=TIMEOUT)

    # Restore the checkpoint the world-size-3 group wrote.
    model, opt, sched = plain(seed=11)
    ck = Checkpointer(model, opt, sched, comm=comm)
    out["restored_from"] = ck.load_checkpoint(work / "plain")[0]
    out["restored"] = errors_of(
        lambda: assert_states_equal(
            training_state(model, opt, sched, global_steps=ck.global_steps),
            load_ref(work / "ref_step4.pt"),
        )
    )

    # A rank failing in the middle of its write: every rank raises, naming it.
    failing = Checkpointer(model, opt, sched, comm=comm, storage=FailOnRank(2))
    out["failed_write"] = errors_of(lambda: failing.save_checkpoint(work / "failing"))

    # Data-parallel subgroups of the job ({0, 2} and {1, 3}) each save their own checkpoint.
    subgroups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = subgroups[rank % 2]
    sub = TorchComm(mine, timeout=TIMEOUT)
    out["subgroup"] = [sub.rank, sub.size, sub.all_gather(rank)]
    model2, opt2, sched2 = plain(seed=rank % 2)
    train_ck = Checkpointer(model2, opt2, sched2, comm=sub)
    train_ck.global_steps = rank % 2
    train_ck.save_checkpoint(work / f"subgroup{rank % 2}")

    # A group whose ranks are in a custom order: zckpt's ranks are the group's ranks.
    reverse = TorchComm(dist.new_group([3, 2, 1, 0], sort_ranks=False), timeout=TIMEOUT)
    out["reverse"] = [reverse.rank, reverse.all_gather(rank)]
    return out


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "ws2": at_ws2,
    "ws3": at_ws3,
    "ws4": at_ws4,
}


def child_main(scenario: str, rank: int, world_size: int, work: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{work / f'rendezvous-{scenario}'}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )
    try:
        result = SCENARIOS[scenario](work)
    except BaseException:
        result = {"crashed": traceback.format_exc()}
    (work / f"{scenario}.rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# -- the parent: spawn, wait with a deadline, collect ----------------------------------------------

DEADLINE_S = 180.0


def spawn(scenario: str, world_size: int, work: Path) -> list[dict[str, Any]]:
    """Run one rank per process; kill them all if any is still running at the deadline."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, *sys.path])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, scenario, str(r), str(world_size), str(work)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(world_size)
    ]
    deadline = time.monotonic() + DEADLINE_S
    outputs = []
    try:
        for p in procs:
            try:
                stdout, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{scenario}: ranks still running after {DEADLINE_S} s (a hang)")
            outputs.append(stdout.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r, (p, text) in enumerate(zip(procs, outputs)):
        file = work / f"{scenario}.rank{r}.json"
        if p.returncode != 0 or not file.exists():
            pytest.fail(f"{scenario} rank {r} exited with {p.returncode}:\n{text[-4000:]}")
        result = json.loads(file.read_text())
        if "crashed" in result:
            pytest.fail(f"{scenario} rank {r} raised:\n{result['crashed']}")
        results.append(result)
    return results


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def ws2(work: Path) -> list[dict[str, Any]]:
    return spawn("ws2", 2, work)


@pytest.fixture(scope="module")
def ws3(work: Path, ws2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return spawn("ws3", 3, work)


@pytest.fixture(scope="module")
def ws4(work: Path, ws3: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return spawn("ws4", 4, work)


def test_resume_at_the_same_world_size_gives_the_same_losses(ws2: list[dict[str, Any]]) -> None:
    for r in ws2:
        assert r["resumed"] == r["uninterrupted"]  # float.hex: bit for bit
        assert r["resumed_from"][1:] == [{"saved_at": 2}, STEPS]
        assert r["resumed_state"] is None, r["resumed_state"]


def test_restore_at_another_world_size_is_bitwise(work: Path, ws3: list[dict[str, Any]]) -> None:
    for r in ws3:
        assert r["restored"] is None, r["restored"]
    assert zckpt.open_checkpoint(work / "plain", "global_step3").manifest.spec.world_size == 2


@pytest.mark.slow
def test_restore_at_world_size_4(work: Path, ws4: list[dict[str, Any]]) -> None:
    for r in ws4:
        assert r["restored"] is None, r["restored"]
        assert r["restored_from"] == str(work / "plain" / "global_step4")


def test_zero_partitions_saved_at_2_load_at_3(ws3: list[dict[str, Any]]) -> None:
    for r in ws3:
        assert r["zero"] is None, r["zero"]


def test_tag_mismatch_in_fail_mode_fails_every_rank(work: Path, ws3: list[dict[str, Any]]) -> None:
    for r in ws3:
        err = r["tag_mismatch"]
        assert err is not None and err["type"] == "TagError", err
        assert "rank 1 't1'" in err["message"]
    assert not list(work.glob("mismatch/*/manifest.zckm"))


@pytest.mark.slow
def test_a_rank_failing_its_write_fails_every_rank(work: Path, ws4: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(ws4):
        err = r["failed_write"]
        assert err is not None, rank
        assert err["type"] == "SaveError", err
        assert "rank 2: OSError" in err["message"] and "No space left" in err["message"]
    assert not list(work.glob("failing/*/manifest.zckm"))
    assert not list(work.glob("failing/*/*.zck"))  # the generation's files were removed


@pytest.mark.slow
def test_subgroups_save_their_own_checkpoints(work: Path, ws4: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(ws4):
        assert r["subgroup"] == [rank // 2, 2, [rank % 2, rank % 2 + 2]]
        assert r["reverse"] == [3 - rank, [3, 2, 1, 0]]
    for dp in (0, 1):
        m = zckpt.open_checkpoint(work / f"subgroup{dp}").manifest
        assert m.tag == f"global_step{dp}" and m.spec.world_size == 2
        assert [f.rank for f in m.files] == [0, 1]


def test_a_rank_that_never_arrives_times_out(ws2: list[dict[str, Any]]) -> None:
    err, waited = ws2[0]["absent_rank"]
    assert err is not None and err["type"] == "ZckptError", err
    assert "rank 0: zckpt's all-gather failed" in err["message"]
    assert 0.8 < waited < 30


def test_collectives_from_a_background_thread(ws2: list[dict[str, Any]]) -> None:
    for r in ws2:
        assert r["default_comm"] == ["TorchComm", True]
        finished, last, count = r["background"]
        assert finished and count == 30
        assert last == [{"rank": 0, "i": 29}, {"rank": 1, "i": 29}]


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
