"""The benchmark suite runs at its smoke size and reports every row (numbers are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROWS = [
    "| save | raw tofile/readinto |",
    "| save | torch.save/load |",
    "| save | safetensors |",
    "| save | DCP, 1 process |",
    "| save | zckpt raw, ws 1 |",
    "| save | zckpt raw, ws 2 |",
    "| save | zckpt byteplane, ws 1 |",
    "| save | zckpt byteplane, ws 2 |",
    *(
        f"| {kind} load | {peer} |"
        for kind in ("warm", "cold")
        for peer in (
            "raw tofile/readinto",
            "torch.save/load",
            "safetensors",
            "DCP, 1 process",
            "zckpt raw, ws 1",
            "zckpt raw, ws 2",
            "zckpt byteplane, ws 1",
        )
    ),
    "| reshard | ws 2 -> 2, sum over ranks |",
    "| reshard | ws 2 -> 3, sum over ranks |",
    "| fp32 | eager |",
    "| fp32 | lazy (one at a time) |",
    "| async | sync save |",
    "| async | async save, blocked |",
    *(
        f"| compress | {label}, {codec} {op} |"
        for label in ("fp32 master", "bf16 weight", "fp32 exp_avg", "fp32 exp_avg_sq")
        for codec in ("zstd", "byteplane")
        for op in ("encode", "decode")
    ),
]


def test_suite_smoke(tmp_path: Path) -> None:
    out = tmp_path / "suite.md"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text in proc.stdout
    missing = [row for row in ROWS if row not in text]
    assert not missing, missing
    assert "Out of scope" in text and "Targets (issue 6)" in text
    assert "cores:" in text and "disk" in text
    # The suite removes its temporary checkpoints.
    assert not list(tmp_path.glob("zckpt-suite-*"))
