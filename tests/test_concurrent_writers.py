"""Several processes on one save_dir at once: concurrent saves of one tag, of different tags with
retention, a reader following ``latest`` while tags come and go, and ``clean``/retention run
while a save is in flight.

Writers are real processes: this file run as a script (``python test_concurrent_writers.py
child``) reads JSON commands on stdin and answers each with a JSON line. Every saved state is
self-identifying (every tensor filled from one number, also its ``global_steps``), so a loaded
state is checked bitwise against the one saver it must come from. Overlap is forced, not hoped
for: writers use a :class:`SlowStorage` that sleeps (or waits for the test's go-ahead file)
before delegating each ``write_atomic`` to :class:`LocalStorage`.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.store import LocalStorage
from zckpt.testing import assert_states_equal

SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))
SPEC = zckpt.ZeroSpec(2, 2)  # one process writes both ranks' files
N = 1 << 19  # elements per fp32 tensor: 2 MiB each, ~5 MiB per state


def state_for(value: int, n: int = N) -> dict[str, Any]:
    """A state every tensor of which says ``value``."""
    return {
        "module": {"w": torch.full((n,), float(value % 128), dtype=torch.bfloat16)},
        "master": {"w": torch.full((n,), float(value))},
        "optimizer": {"state": {"w": {"exp_avg": torch.full((n,), -float(value))}}},
        "ids": torch.full((7,), value, dtype=torch.int64),
        "global_steps": value,
    }


def client_for(value: int) -> dict[str, Any]:
    return {"value": value, "t": torch.full((3,), value, dtype=torch.int64)}


def check_loaded(loaded: zckpt.Loaded, n: int = N) -> int:
    """Assert a loaded state is exactly one saver's; return its value."""
    v = loaded.state["global_steps"]
    assert_states_equal(loaded.state, state_for(v, n))
    assert_states_equal(loaded.client_state, client_for(v))
    return int(v)


class SlowStorage(LocalStorage):
    """``LocalStorage`` that sleeps ``delay`` seconds before each ``write_atomic`` (``first``
    before the first one of each save), and before the ``pause_at``-th call prints
    ``paused <path>`` and waits until the file ``resume`` exists; ``latest_delay`` more before
    replacing ``latest`` (a slow metadata write: the window between a commit and its
    ``latest``)."""

    def __init__(self, delay: float = 0.0, first: float = 0.0, pause_at: int = 0,
                 resume: str = "", latest_delay: float = 0.0) -> None:  # fmt: skip
        self.delay, self.first, self.pause_at, self.resume = delay, first, pause_at, resume
        self.latest_delay = latest_delay
        self.calls = 0

    def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
        self.calls += 1
        if self.calls == self.pause_at:
            print(json.dumps({"paused": path}), flush=True)
            deadline = time.monotonic() + 120
            while not os.path.exists(self.resume) and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(self.first if self.calls == 1 else self.delay)
        if os.path.basename(path) == "latest":
            time.sleep(self.latest_delay)
        return super().write_atomic(path, buffers)


def _child() -> None:
    """Run save commands from stdin; one JSON line per save."""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("exit"):
            return
        storage = SlowStorage(**cmd.get("storage", {}))
        for job in cmd["saves"]:
            storage.calls = 0
            v = job["value"]
            res: dict[str, Any] = {"tag": job["tag"], "value": v, "ok": False}
            try:
                zckpt.save_checkpoint(
                    cmd["dir"],
                    state_for(v, cmd.get("n", N)),
                    SPEC,
                    tag=job["tag"],
                    client_state=client_for(v),
                    overwrite=job.get("overwrite", False),
                    keep_last=job.get("keep_last"),
                    storage=storage,
                )
                res["ok"] = True
            except zckpt.ZckptError as e:
                res.update(type=type(e).__name__, msg=str(e), zckpt=True)
            except Exception as e:  # reported: the test fails on it
                res.update(type=type(e).__name__, msg=str(e), zckpt=False,
                           tb=traceback.format_exc()[-1500:])  # fmt: skip
            print(json.dumps(res), flush=True)
        print(json.dumps({"done": True}), flush=True)


class Writer:
    """A child process running :func:`_child`."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.p = subprocess.Popen(
            [sys.executable, __file__, "child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.buf = b""

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def line(self, timeout: float = 180) -> dict[str, Any]:
        """The next JSON line (read unbuffered, so ``poll`` sees what is pending)."""
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.p.kill()
                raise AssertionError(f"a writer gave no answer in {timeout}s (hang?)")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise AssertionError(f"a writer died (exit {self.p.wait()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))

    def poll(self) -> dict[str, Any] | None:
        """The next line if one is already there, else None."""
        assert self.p.stdout is not None
        if b"\n" not in self.buf:
            ready, _, _ = select.select([self.p.stdout.fileno()], [], [], 0)
            if not ready:
                return None
        return self.line()

    def results(self, timeout: float = 180) -> list[dict[str, Any]]:
        out = []
        while True:
            r = self.line(timeout)
            if r.get("done"):
                return out
            out.append(r)

    def close(self) -> None:
        try:
            self.send({"exit": True})
            self.p.wait(30)
        except Exception:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def writers() -> Any:
    made: list[Writer] = []

    def make(k: int) -> list[Writer]:
        new = [Writer() for _ in range(k)]
        made.extend(new)
        return new

    yield make
    for w in made:
        w.close()


def committed(save_dir: Path) -> list[str]:
    return [c.tag for c in zckpt.list_tags(str(save_dir))]


def check_directory(save_dir: Path) -> dict[str, int]:
    """Every committed tag and ``latest`` load bitwise as one saver's state: {tag: value}."""
    out = {}
    for tag in committed(save_dir):
        out[tag] = check_loaded(zckpt.load_checkpoint(save_dir, tag=tag))
    latest = zckpt.load_checkpoint(save_dir)
    assert latest.load_path is not None, "latest names no loadable tag"
    check_loaded(latest)
    return out


# ---------------------------------------------------------------------------------- (a)


def _race(a: Writer, b: Writer, save_dir: Path, tag: str, va: int, vb: int, over: bool) -> Any:
    """Both writers save ``tag`` at the same instant: a sleep before every file write (longer
    before the first) keeps each save in flight until both have passed their checks."""
    storage = {"delay": 0.05, "first": 0.3}
    for w, v in ((a, va), (b, vb)):
        w.send({"dir": str(save_dir), "storage": storage,
                "saves": [{"tag": tag, "value": v, "overwrite": over}]})  # fmt: skip
    (ra,), (rb,) = a.results(), b.results()
    return ra, rb


def _loads_as(save_dir: Path, tag: str | None, allowed: set[int]) -> str | None:
    """None if ``tag`` (None: latest) loads bitwise as one of the ``allowed`` states."""
    try:
        v = check_loaded(zckpt.load_checkpoint(save_dir, tag=tag))
    except (zckpt.ZckptError, AssertionError, TypeError) as e:
        return f"does not load: {type(e).__name__}: {e}"[:600]
    return None if v in allowed else f"holds {v}, expected one of {sorted(allowed)}"


def test_two_processes_creating_the_same_tag_never_both_succeed(
    tmp_path: Path, writers: Any
) -> None:
    """Two processes save the same new tag (overwrite=False) into one save_dir at the same
    instant, several rounds (a new tag each round). At most one may succeed; the other raises a
    ZckptError saying why; the tag then holds exactly the winner's state; latest loads."""
    a, b = writers(2)
    zckpt.save_checkpoint(tmp_path, state_for(1), SPEC, tag="base", client_state=client_for(1))
    failures, log = [], []
    for rnd in range(max(3, int(4 * SCALE))):
        tag, va, vb = f"same{rnd}", 100 + 2 * rnd, 101 + 2 * rnd
        ra, rb = _race(a, b, tmp_path, tag, va, vb, over=False)
        winners = [r for r in (ra, rb) if r["ok"]]
        why = f"round {rnd}: A={_show(ra)} B={_show(rb)}"
        log.append(why)
        if len(winners) > 1:
            failures.append(f"{why}: both saves of the same new tag succeeded")
        for r in (ra, rb):
            if not r["ok"] and not r.get("zckpt"):
                failures.append(f"{why}: a non-zckpt error {r['type']}: {r.get('tb')}")
        if not winners:
            if tag in committed(tmp_path):
                failures.append(f"{why}: neither save succeeded, yet the tag is committed")
        elif (bad := _loads_as(tmp_path, tag, {r["value"] for r in winners})) is not None:
            failures.append(f"{why}: the tag {bad}")
        if (bad := _loads_as(tmp_path, None, {1, va, vb})) is not None:
            failures.append(f"{why}: latest {bad}")
    print("\n".join(log))
    assert not failures, "\n".join(failures)


def test_two_processes_overwriting_the_same_tag_at_once(tmp_path: Path, writers: Any) -> None:
    """Two processes overwrite one committed tag at the same instant (overwrite=True), several
    rounds. Serialised overwrites may both succeed; what may never happen is a broken tag: it
    holds exactly the state of a writer that succeeded (the previous one if none did), a loser
    raises a ZckptError, and latest loads."""
    a, b = writers(2)
    zckpt.save_checkpoint(tmp_path, state_for(1), SPEC, tag="same", client_state=client_for(1))
    failures, log = [], []
    current = {1}
    for rnd in range(max(3, int(4 * SCALE))):
        va, vb = 100 + 2 * rnd, 101 + 2 * rnd
        ra, rb = _race(a, b, tmp_path, "same", va, vb, over=True)
        why = f"round {rnd}: A={_show(ra)} B={_show(rb)}"
        log.append(why)
        for r in (ra, rb):
            if not r["ok"] and not r.get("zckpt"):
                failures.append(f"{why}: a non-zckpt error {r['type']}: {r.get('tb')}")
        current = {r["value"] for r in (ra, rb) if r["ok"]} or current
        if (bad := _loads_as(tmp_path, "same", current)) is not None:
            failures.append(f"{why}: the tag {bad}")
        else:  # the one that committed last: what a round without a winner must keep
            current = {check_loaded(zckpt.load_checkpoint(tmp_path, tag="same"))}
        if (bad := _loads_as(tmp_path, None, current)) is not None:
            failures.append(f"{why}: latest {bad}")
    print("\n".join(log))
    assert not failures, "\n".join(failures)


def _generic(msg: str) -> str:
    """An error message with paths, tags and generations replaced, for counting by kind."""
    msg = re.sub(r"/\S*?/(s\d{4})/", "<save_dir>/<tag>/", msg)
    msg = re.sub(r"/\S*?/(s\d{4})\b", "<save_dir>/<tag>", msg)
    msg = re.sub(r"[0-9a-f]{16}\.(rank\d{5}-of-\d{5}|client)\.zck", "<blob>", msg)
    return " ".join(msg.split())[:160]


def _show(r: dict[str, Any]) -> str:
    return "ok" if r["ok"] else f"{r.get('type')}({r.get('msg', '')[:200]!r})"


# ---------------------------------------------------------------------------------- (b)


def test_two_processes_saving_different_tags_with_retention(tmp_path: Path, writers: Any) -> None:
    """Two processes save their own tags into one save_dir concurrently, keep_last=2 on both
    (one of them slow to replace ``latest`` after its commits, so the other's retention runs in
    between): every tag that remains committed loads bitwise, latest loads, and no error other
    than a clear ZckptError (counted and reported) happens."""
    a, b = writers(2)
    rounds = max(8, int(20 * SCALE))
    n = 1 << 16
    for w, name, base, slow in ((a, "a", 1000, 0.0), (b, "b", 2000, 0.3)):
        w.send({"dir": str(tmp_path), "n": n, "storage": {"delay": 0.002, "latest_delay": slow},
                "saves": [{"tag": f"{name}{i:03d}", "value": base + i, "keep_last": 2}
                          for i in range(rounds)]})  # fmt: skip
    # Meanwhile: whenever latest names the same tag before and after a listing, that tag must
    # be committed (latest never names a deleted or uncommitted tag).
    results: list[dict[str, Any]] = []
    running, dangling, checks = {a, b}, Counter(), 0
    while running:
        for w in list(running):
            while (r := w.poll()) is not None:
                if r.get("done"):
                    running.discard(w)
                    break
                results.append(r)
        l1 = _read_latest(tmp_path)
        tags = committed(tmp_path)
        if l1 is not None and l1 == _read_latest(tmp_path) and l1 not in tags:
            dangling[l1] += 1
        checks += 1
        time.sleep(0.001)
    bad = [r for r in results if not r["ok"] and not r.get("zckpt")]
    assert not bad, f"non-zckpt errors: {bad}"
    errors = Counter(f"{r['type']}: {r['msg'][:160]}" for r in results if not r["ok"])
    problems = []
    for tag in committed(tmp_path):
        try:
            got = zckpt.load_checkpoint(tmp_path, tag=tag)
            v = got.state["global_steps"]
            assert_states_equal(got.state, state_for(v, n))
            assert (1000 if tag[0] == "a" else 2000) + int(tag[1:]) == v, (tag, v)
        except (zckpt.ZckptError, AssertionError) as e:
            problems.append(f"committed tag {tag} does not load: {type(e).__name__}: {e}"[:400])
    try:
        got = zckpt.load_checkpoint(tmp_path)
        assert got.load_path is not None
    except (zckpt.ZckptError, AssertionError) as e:
        problems.append(f"latest does not load: {type(e).__name__}: {e}"[:400])
    if dangling:
        problems.append(
            f"in {sum(dangling.values())} of {checks} checks during the run latest named a tag "
            f"that was not committed: {dict(dangling)}"
        )
    assert not problems and not errors, (
        f"{len(results)} saves; errors by kind: {dict(errors)}; problems: {problems}; "
        f"committed now: {committed(tmp_path)}"
    )


def _read_latest(save_dir: Path) -> str | None:
    try:
        return (save_dir / "latest").read_text()
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------- (c)


def test_reader_following_latest_while_tags_are_replaced(tmp_path: Path, writers: Any) -> None:
    """A reader loads ``latest`` in a loop while another process saves new tags with
    keep_last=1 (so the tag latest named a moment ago is deleted). Every load must return one
    complete saved state, and none may raise: a loader whose tag was deleted under it should
    re-resolve ``latest`` once and load the new one. Errors are counted in the message."""
    (w,) = writers(1)
    n = 1 << 18
    zckpt.save_checkpoint(tmp_path, state_for(0, n), SPEC, tag="s0000", client_state=client_for(0))
    saves = max(20, int(40 * SCALE))
    w.send({"dir": str(tmp_path), "n": n,
            "saves": [{"tag": f"s{i:04d}", "value": i, "keep_last": 1}
                      for i in range(1, saves + 1)]})  # fmt: skip
    loads, errors, wrong = 0, Counter(), []
    seen = set()
    done: list[dict[str, Any]] = []
    while True:
        r = w.poll()
        if r is not None:
            if r.get("done"):
                break
            done.append(r)
            continue
        try:
            got = zckpt.load_checkpoint(tmp_path)
        except zckpt.ZckptError as e:
            errors[f"{type(e).__name__}: {_generic(str(e))}"] += 1
            continue
        loads += 1
        try:
            v = check_loaded(got, n)
            assert os.path.basename(got.load_path or "") == f"s{v:04d}", (got.load_path, v)
            seen.add(v)
        except AssertionError as e:
            wrong.append(str(e)[:300])
    failed_saves = [r for r in done if not r["ok"]]
    assert not failed_saves, failed_saves
    assert not wrong, f"{len(wrong)} loads returned an inconsistent state: {wrong[:3]}"
    assert len(seen) > 1, "the reader never saw latest move: the test did not race"
    total = loads + sum(errors.values())
    assert not errors, (
        f"{sum(errors.values())} of {total} loads of latest raised while tags were replaced "
        f"({len(seen)} distinct states seen): {dict(errors)}"
    )


# ---------------------------------------------------------------------------------- (d)


def _run_other_process(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180
    )


CLEANERS = {
    "zckpt.clean": "import sys, zckpt; print(zckpt.clean(sys.argv[1]))",
    "cli clean": "import sys; from zckpt.cli import main; sys.exit(main(['clean', sys.argv[1]]))",
    "apply_retention": "import sys, zckpt; print(zckpt.apply_retention(sys.argv[1], keep_last=1))",
}


def _with_arg(code: str, arg: str) -> str:
    return f"import sys; sys.argv[1:] = [{arg!r}]\n{code}"


@pytest.mark.parametrize(
    ("cleaner", "overwrite"),
    [
        ("zckpt.clean", False),
        ("cli clean", False),
        ("zckpt.clean", True),
        ("apply_retention", True),
    ],
    ids=["clean-new-tag", "cli-clean-new-tag", "clean-overwrite", "retention-overwrite"],
)
def test_cleanup_from_another_process_leaves_an_inflight_save_alone(
    tmp_path: Path, writers: Any, cleaner: str, overwrite: bool
) -> None:
    """A save is paused after its first blob is durable (its tag directory exists, holding a
    file of the new generation and, for an overwrite, the old committed generation); another
    process runs clean (or retention) on the save_dir; then the save resumes. The save must
    commit and load bitwise, and every earlier checkpoint must still load."""
    (w,) = writers(1)
    n = 1 << 16
    for i, tag in enumerate(("old1", "old2", "old3")):
        zckpt.save_checkpoint(tmp_path, state_for(10 + i, n), SPEC, tag=tag,
                              client_state=client_for(10 + i))  # fmt: skip
    tag = "old1" if overwrite else "new"
    resume = tmp_path.parent / f"resume-{tmp_path.name}"
    w.send({"dir": str(tmp_path), "n": n,
            "storage": {"pause_at": 2, "resume": str(resume)},
            "saves": [{"tag": tag, "value": 77, "overwrite": overwrite}]})  # fmt: skip
    paused = w.line()
    assert "paused" in paused, paused
    inflight = sorted(os.listdir(tmp_path / tag))
    proc = _run_other_process(_with_arg(CLEANERS[cleaner], str(tmp_path)))
    after_cleaner = sorted(os.listdir(tmp_path / tag)) if (tmp_path / tag).is_dir() else None
    resume.write_text("go")
    (res,) = w.results()
    problems = []
    if proc.returncode != 0:
        problems.append(f"{cleaner} exited {proc.returncode}: {proc.stderr[-800:]}")
    if not res["ok"]:
        problems.append(f"the in-flight save failed: {_show(res)}")
    else:
        try:
            got = zckpt.load_checkpoint(tmp_path, tag=tag)
            assert check_loaded(got, n) == 77
        except (zckpt.ZckptError, AssertionError) as e:
            problems.append(f"the save returned, but {tag} does not load: {type(e).__name__}: {e}")
    for i, old in enumerate(("old1", "old2", "old3")):
        if old == tag or old not in committed(tmp_path):
            continue
        try:
            assert check_loaded(zckpt.load_checkpoint(tmp_path, tag=old), n) == 10 + i
        except (zckpt.ZckptError, AssertionError) as e:
            problems.append(f"{old} no longer loads: {type(e).__name__}: {e}")
    assert not problems, (
        f"{cleaner} ran while {tag} was being saved (tag dir then held {inflight}; after "
        f"{cleaner}: {after_cleaner}; it printed {proc.stdout.strip()[-300:]!r}):\n"
        + "\n".join(problems)
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        _child()
