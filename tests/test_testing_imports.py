"""zckpt.testing's assertions work without hypothesis; its strategies say how to get it."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "hypothesis" or name.startswith("hypothesis."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import torch
from zckpt.testing import ThreadComm, assert_states_equal, tensors_bitwise_equal
assert_states_equal({"a": torch.ones(2)}, {"a": torch.ones(2)})
try:
    from zckpt.testing import states
except ModuleNotFoundError as e:
    print(e)
"""


def test_assertions_import_without_hypothesis() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "pip install 'zckpt[test]'" in out


def test_strategies_still_import_with_hypothesis() -> None:
    from zckpt.testing import specs, states

    assert callable(states) and callable(specs)
