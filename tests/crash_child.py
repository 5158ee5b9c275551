"""Child process for tests/test_crash.py: saves checkpoints in a loop until it is killed."""

from __future__ import annotations

import sys
from typing import Any

import torch

import zckpt


def state_of(version: int) -> dict[str, Any]:
    """A deterministic ~2 MiB training state for ``version``."""
    g = torch.Generator().manual_seed(version)
    master = {f"p{i}": torch.randn(61 * (i + 1), 97, generator=g) for i in range(6)}
    return {
        "module": {k: v.bfloat16() for k, v in master.items()},
        "master": master,
        "optimizer": {
            "state": {k: {"exp_avg": torch.randn(v.shape, generator=g)} for k, v in master.items()}
        },
        "version": version,
    }


def main() -> None:
    save_dir, first = sys.argv[1], int(sys.argv[2])
    spec = zckpt.ZeroSpec(4, 2)
    for version in range(first, first + 10_000):
        if version % 3 == 0:  # overwrite one tag again and again
            tag, overwrite = "rolling", True
        else:
            tag, overwrite = f"v{version}", False
        codec = ("raw", "zstd", "byteplane")[version % 3]
        zckpt.save_checkpoint(
            save_dir,
            state_of(version),
            spec,
            tag=tag,
            overwrite=overwrite,
            keep_last=4,
            codec=codec,
        )
        if version == first:
            print("ready", flush=True)


if __name__ == "__main__":
    main()
