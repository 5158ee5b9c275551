"""A real multi-node run: ``examples/multinode.py`` (two torchrun nodes in network namespaces,
a moto S3 server in a third, one node SIGKILLed in the middle of a save, a resume on 3 ranks).

Needs root (``ip netns``), iproute2, and the test-s3 extra; skipped with the reason otherwise.
The script checks everything itself; the test checks its report again, and that nothing it
made (namespaces, processes) outlives it, also when it is stopped half-way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs", reason="needs s3fs: pip install 'zckpt[test-s3]'")
pytest.importorskip("moto.server", reason="needs moto[server]: pip install 'zckpt[test-s3]'")
pytest.importorskip("boto3", reason="needs boto3 (moto[server] brings it)")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "multinode.py"
SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))


def _netns_reason() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if os.geteuid() != 0:
        return "needs root for `ip netns` (run as root, or scripts/multinode with sudo)"
    probe = f"zckpt-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` failed here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


REASON = _netns_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _namespaces(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"zckpt-{pid}-")]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def test_two_nodes_kill_one_mid_save_resume_on_three(tmp_path: Path) -> None:
    # Saves the watcher can try to catch with some rank blobs stored and others not: a small
    # state uploads in a narrow window, so the reduced size gets more saves and larger blobs
    # (CI once saw all three of 8 steps x hidden 64 commit between two looks).
    steps = 16 if SCALE < 1 else 12
    out = tmp_path / "report.json"
    args = [f"--steps={steps}", "--save-every=2", f"--hidden={128 if SCALE < 1 else 256}"]
    p = subprocess.run(
        [sys.executable, str(SCRIPT), *args, f"--json={out}"],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    assert p.returncode == 0 and report.get("ok"), p.stdout[-6000:] + p.stderr[-6000:]

    # What the script checked, checked again from its report.
    crash, resume, ref = report["crash"], report["resume"], report["reference"]
    ref_losses = {int(k): v for k, v in ref["losses"].items()}
    assert sorted(ref_losses) == list(range(1, steps + 1))
    killed = crash["killed_during"]
    killed_step = int(killed.removeprefix("global_step"))
    caught = crash["caught"]
    assert 0 < len(caught["blobs"]) < caught["world_size"] == 4, caught
    assert caught["killed"] >= 3  # node1's torchrun agent and its two ranks
    store = crash["store"]
    assert killed not in store["tags"] and killed in store["uncommitted"], store
    assert store["latest"] == f"global_step{killed_step - 2}" and all(store["verified"].values())
    crash_losses = {int(k): v for k, v in crash["losses"].items()}
    assert crash_losses and all(ref_losses[s] == v for s, v in crash_losses.items())
    assert max(crash_losses) >= killed_step  # trained up to the save it died in
    assert resume["from"] == killed_step - 2
    got = {int(k): v for k, v in resume["losses"].items()}
    assert got == {s: ref_losses[s] for s in range(killed_step - 1, steps + 1)}
    end = report["end"]
    assert end["latest"] == f"global_step{steps}" and not end["uncommitted"], end
    assert not end["uploads"] and not end["locks"]

    # Nothing outlives the run.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in report["namespaces"])
    assert not Path(report["scratch"]).exists()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_stopped_half_way_leaves_nothing_behind() -> None:
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--steps=6", "--hidden=32"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    seen: set[int] = set()
    made: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            made = _namespaces(p.pid)
            inside = {ns: _pids(ns) for ns in made}
            seen.update(pid for pids in inside.values() for pid in pids)
            if len(made) == 3 and all(inside.values()):  # the server and both nodes run
                break
            time.sleep(0.2)
        assert len(made) == 3 and seen, (made, seen)
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, out
    assert _namespaces(p.pid) == [], out
    assert [pid for pid in seen if _alive(pid)] == [], out
