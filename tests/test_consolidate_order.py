"""`zckpt consolidate` of a DeepSpeed checkpoint lays shards out in the module's order (issue 11
item 7), not zero_to_fp32's (buffers, frozen, then param groups)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zckpt.cli import main
from zckpt.interop import module_key_order

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"


def test_deepspeed_shards_follow_the_module_order(tmp_path: Path) -> None:
    case = FIXTURES / "z2_ws2_bf16" / "checkpoint"
    if not case.is_dir():
        pytest.skip(f"no DeepSpeed fixture at {case}")
    out = tmp_path / "out"
    assert main(["consolidate", str(case), str(out), "--max-shard-size", "20KB", "--quiet"]) == 0
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    order = [k for k in module_key_order(case) if k in weight_map]
    files = [weight_map[k] for k in order]
    # No tensor is over 20KB here, so HF's rule fills shards strictly in the given order.
    assert len(set(files)) >= 2 and files == sorted(files)
    assert order[:4] == ["pos_scale", "num_batches", "embed.weight", "fc1.weight"]
