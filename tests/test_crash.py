"""Crash safety, for real: a child saving checkpoints is SIGKILLed at random instants."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from crash_child import state_of
from fork_server import fork_server

import zckpt
from zckpt.testing import assert_states_equal

SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))


def check_directory(save_dir: Path) -> int:
    """Every committed tag and ``latest`` load bitwise; returns the newest committed version."""
    latest = zckpt.load_checkpoint(save_dir)
    assert latest.load_path is not None, "latest must name a complete checkpoint"
    assert_states_equal(latest.state, state_of(latest.state["version"]))
    newest = latest.state["version"]
    for c in zckpt.list_tags(str(save_dir)):
        got = zckpt.load_checkpoint(save_dir, tag=c.tag)
        assert_states_equal(got.state, state_of(got.state["version"]))
        newest = max(newest, got.state["version"])
    for d in save_dir.iterdir():
        if d.is_dir() and not (d / "manifest.zckm").exists():
            with pytest.raises(zckpt.CheckpointNotFoundError):
                zckpt.load_checkpoint(save_dir, tag=d.name)
    return int(newest)


def run_trials(save_dir: Path, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    zckpt.save_checkpoint(save_dir, state_of(1), zckpt.ZeroSpec(4, 2), tag="v1")
    version = 1
    with fork_server("crash_child") as server:  # a child per trial, forked: no 2 s start-up
        for _ in range(trials):
            server.start([str(save_dir), str(version + 1)])
            line = server.readline()
            assert line == "ready", line
            time.sleep(rng.uniform(0.0, 0.3))
            assert os.WTERMSIG(server.kill()) == signal.SIGKILL
            version = max(version + 1, check_directory(save_dir))
            zckpt.clean(str(save_dir))
            check_directory(save_dir)


def test_sigkill_during_saves_never_loses_a_checkpoint(tmp_path: Path) -> None:
    run_trials(tmp_path, trials=4, seed=0)


@pytest.mark.slow
def test_sigkill_many_trials(tmp_path: Path) -> None:
    run_trials(tmp_path, trials=max(4, int(40 * SCALE)), seed=1)
