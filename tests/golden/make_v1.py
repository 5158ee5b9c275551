"""Write the version 1 golden blobs. Run ONCE, then commit tests/golden/v1/; never regenerate.

The blobs are the contract with every reader ever released: tests/test_golden.py decodes these
committed bytes forever, against values it builds on its own. A format change that breaks them
is a new format version (docs/format-evolution.md), with a new tests/golden/vN/ beside this one.

    python tests/golden/make_v1.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import zstandard

import zckpt
from zckpt.format import encode_shard

OUT = Path(__file__).parent / "v1"
CODECS = {"raw": 64, "zstd": 256, "byteplane": 1024}  # codec -> chunk_bytes
WORLD_SIZE = 2


def state() -> dict[str, Any]:
    """Every value is a formula of arange: no RNG, so any torch builds the same bytes."""
    i = torch.arange(512, dtype=torch.float64)
    w = (i % 29) / 256 - 0.05
    return {
        "module": {
            "fc.weight": w.to(torch.bfloat16).reshape(16, 32),
            "fc.bias": (torch.arange(24, dtype=torch.float64) / 8 - 1).to(torch.float16),
        },
        "master": {
            "fc.weight": w.to(torch.float32).reshape(16, 32),
            "fc.bias": (torch.arange(24, dtype=torch.float64) / 8 - 1).to(torch.float32),
        },
        "optimizer": {
            "state": {
                "fc.weight": {
                    "exp_avg": (w * 1e-3).to(torch.float32).reshape(16, 32),
                    "exp_avg_sq": (w * w * 1e-6).to(torch.float32).reshape(16, 32),
                    "step": torch.tensor(7.0),
                },
            },
            "param_groups": [
                {"lr": 0.001, "betas": (0.9, 0.999), "params": ["fc.weight", "fc.bias"]}
            ],
        },
        "counts": torch.arange(-5, 5, dtype=torch.int64),
        "ids": torch.arange(300, dtype=torch.int32) * 7,
        "mask": torch.tensor([True, False, True, True, False]),
        "step": torch.tensor(12345, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "specials": torch.tensor(
            [0x7FC00001, -(2**31), 0x7F800000, 0x00000001, 0xFF800000 - 2**32], dtype=torch.int32
        ).view(torch.float32),
        "values": [None, True, 3, -2.5, "text", b"\x00\x01", (1, (2,)), 2**64 - 1],
    }


def main() -> int:
    OUT.mkdir(exist_ok=True)
    if any(OUT.iterdir()):
        print(f"{OUT} is not empty: golden files are written once and never regenerated")
        return 1
    s = state()
    plan = zckpt.plan_shards(s, zckpt.ZeroSpec(WORLD_SIZE, 2))
    files = {}
    for codec, chunk in CODECS.items():
        for rank in range(WORLD_SIZE):
            extra = {"golden": "v1", "codec": codec}
            blob = encode_shard(
                zckpt.shard_state(s, plan, rank), codec=codec, chunk_bytes=chunk, extra=extra
            )
            name = f"{codec}-rank{rank}.zckpt"
            (OUT / name).write_bytes(blob)
            files[name] = {"codec": codec, "chunk_bytes": chunk, "size": len(blob)}
    manifest = {
        "format_version": 1,
        "world_size": WORLD_SIZE,
        "stage": 2,
        "zstd_version": list(zstandard.ZSTD_VERSION),
        "python_zstandard": zstandard.__version__,
        "torch": torch.__version__,
        "files": files,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
