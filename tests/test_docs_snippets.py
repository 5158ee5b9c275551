"""Every Python snippet in README.md and docs/ runs as written (issue 12, "docs that run").

The blocks of one file run in order in one namespace, in a fresh working directory, as a
reader would paste them one after the other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("doc", [pytest.param(p, id=p.name) for p in DOCS if _blocks(p)])
def test_python_snippets_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict[str, Any] = {"__name__": f"snippets_{doc.stem}"}
    for i, code in enumerate(_blocks(doc)):
        try:
            exec(compile(code, f"{doc.name}[block {i}]", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"{doc.name}, python block {i} failed: {e!r}\n{code}") from e
    if doc.name == "format.md":  # the normative reader decodes a real blob as zckpt does
        state = {"w": torch.randn(5000), "h": torch.randn(300).bfloat16()}
        plan = zckpt.plan_shards(state, zckpt.ZeroSpec(1, 1))
        for codec in ("raw", "zstd", "byteplane"):
            blob = zckpt.encode_shard(zckpt.shard_state(state, plan, 0), codec=codec)
            _, fragments = ns["read_blob"](blob)
            mine = zckpt.decode_shard(blob)
            for (_, _, _, data), t in zip(fragments, mine.data, strict=True):
                assert data == t.contiguous().view(torch.uint8).numpy().tobytes(), codec


def test_every_doc_is_checked() -> None:
    assert {p.name for p in DOCS if _blocks(p)} >= {"README.md", "training.md", "format.md"}
    assert os.path.isdir(ROOT / "docs")
