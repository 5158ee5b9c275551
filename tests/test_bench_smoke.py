"""The benchmark suite runs at its smoke size and reports every row (numbers are not checked).

The DeepSpeed group needs ``deepspeed`` (CI does not install it): where it is missing, the main
smoke run shows that its rows were skipped and why; where it is installed, the main run skips it
(``--no-deepspeed``, to stay fast) and a second test runs that group alone at the smoke size.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

TWO = ("DCP, 2 processes", "zckpt raw, ws 2, 2 processes")
ROWS = [
    "| save | raw tofile/readinto |",
    "| save | torch.save/load |",
    "| save | safetensors |",
    "| save | DCP, 1 process |",
    "| save | zckpt raw, ws 1 |",
    "| save | zckpt raw, ws 2 |",
    "| save | zckpt byteplane, ws 1 |",
    "| save | zckpt byteplane, ws 2 |",
    *(f"| {op} | {peer} |" for op in ("save", "warm load", "cold load") for peer in TWO),
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
DS_ROWS = [
    "| fp32 DS | DeepSpeed zero_to_fp32 |",
    "| fp32 DS | zckpt eager |",
    "| fp32 DS | zckpt lazy (one at a time) |",
]


def run_suite(tmp_path: Path, *options: str, timeout: float) -> str:
    out = tmp_path / "suite.md"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--smoke", "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text in proc.stdout
    # The suite removes its temporary checkpoints.
    assert not list(tmp_path.glob("zckpt-suite-*"))
    return text


def test_suite_smoke(tmp_path: Path) -> None:
    text = run_suite(tmp_path, *(["--no-deepspeed"] if HAS_DEEPSPEED else []), timeout=180)
    missing = [row for row in ROWS if row not in text]
    assert not missing, missing
    assert "Targets (issue 6)" in text
    assert "cores:" in text and "disk" in text
    why = "--no-deepspeed" if HAS_DEEPSPEED else "`import deepspeed` failed"
    assert f"DeepSpeed rows skipped: {why}" in text
    assert "| DeepSpeed checkpoint: zckpt eager peak RSS / output size | not measured |" in text
    assert not any(row in text for row in DS_ROWS)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_suite_deepspeed_smoke(tmp_path: Path) -> None:
    # A cache of its own: DeepSpeed generates the tiny checkpoint in this test (about 15 s).
    cache = tmp_path / "ds-cache"
    text = run_suite(tmp_path, "--only", "deepspeed", "--ds-cache", str(cache), timeout=240)
    missing = [row for row in DS_ROWS if row not in text]
    assert not missing, missing
    assert "DeepSpeed checkpoint: written by DeepSpeed" in text
    assert "generated in" in text
    assert "Bitwise check passed" in text
    assert "| DeepSpeed checkpoint: zckpt fp32 bitwise equal to zero_to_fp32 | yes |" in text
    assert "| durable save raw ws 1 / DCP | not measured |" in text  # group not run
    assert list(cache.glob("deepspeed-*/generated.json"))
