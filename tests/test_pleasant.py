"""Small things a user meets first: reprs, assertion messages, ``python -m zckpt``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zckpt
from zckpt.testing import assert_states_equal


def test_loaded_and_pending_save_reprs_are_short(tmp_path: Path) -> None:
    state = {"w": torch.zeros(1 << 16), "n": 3}
    zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(64, 3), tag="t")
    got = zckpt.load_checkpoint(tmp_path, world_size=8, rank=1)
    text = repr(got)
    assert len(text) < 300 and "world_size=8" in text and "Fragment" not in text
    with zckpt.store.AsyncSaver() as saver:
        pending = saver.save(tmp_path, state, zckpt.ZeroSpec(2, 1), tag="u")
        pending.wait()
        assert repr(pending) == f"PendingSave(tag='u', path={str(tmp_path / 'u')!r}, committed)"


def test_assert_states_equal_names_path_and_element() -> None:
    a = {"m": {"w": torch.arange(12.0).reshape(3, 4)}}
    b = {"m": {"w": a["m"]["w"].clone()}}
    b["m"]["w"][2, 1] = 99.0
    with pytest.raises(
        AssertionError, match=r"m/w: .* at element 9 \[2, 1\]: 9.0 != 99.0 \(1 of 12"
    ):
        assert_states_equal(a, b)


def test_python_dash_m_zckpt() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zckpt", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.startswith("zckpt ")


def test_readme_blocks_that_import_run_on_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block that opens with its own imports reads as standalone: a reader pastes it alone."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", readme, re.S | re.M)
    standalone = [b for b in blocks if b.lstrip().startswith(("import ", "from "))]
    assert len(standalone) >= 2
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(standalone):
        exec(compile(code, f"README.md[standalone block {i}]", "exec"), {"__name__": "readme"})
