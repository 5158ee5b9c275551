"""The main job in one process: shard a model's training state for 4 ranks, encode each shard to a
blob, decode, reshard to 3 ranks, consolidate, and check the result is bitwise equal.

Run: ``.venv/bin/python examples/demo.py``
"""

from __future__ import annotations

import time
from typing import Any

import torch

import zckpt
from zckpt.testing import assert_states_equal


def training_state(steps: int = 3) -> dict[str, Any]:
    """A small bf16 model trained with AdamW on fp32 master weights, as ZeRO keeps it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 256), torch.nn.GELU(),
        torch.nn.LayerNorm(256), torch.nn.Linear(256, 1000),
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randint(0, 1000, (8, 16))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = [n for n, _ in model.named_parameters()]
    osd = opt.state_dict()
    return {
        "module": {k: v.bfloat16() for k, v in model.state_dict().items()},
        "master": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optimizer": {
            "state": {names[i]: s for i, s in osd["state"].items()},
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]
            ],
        },
        "global_steps": steps,
    }


def main() -> None:
    state = training_state()
    spec4 = zckpt.ZeroSpec(world_size=4, stage=2)
    plan = zckpt.plan_shards(state, spec4)
    t0 = time.perf_counter()
    blobs = [
        zckpt.encode_shard(zckpt.shard_state(state, plan, r), codec="byteplane") for r in range(4)
    ]
    t1 = time.perf_counter()
    shards = [zckpt.decode_shard(b) for b in blobs]
    t2 = time.perf_counter()
    shards3 = zckpt.reshard(shards, zckpt.ZeroSpec(world_size=3, stage=3))
    full = zckpt.consolidate(shards3)
    t3 = time.perf_counter()
    raw = sum(s.nbytes for s in shards)
    print(f"state: {len(plan.skeleton.tensors)} tensors, {raw / 2**20:.2f} MiB")
    print(
        f"4 ranks (stage 2) -> blobs of {[len(b) for b in blobs]} bytes "
        f"(ratio {raw / sum(map(len, blobs)):.3f}) in {t1 - t0:.3f} s"
    )
    print(
        f"decoded in {t2 - t1:.3f} s; resharded to 3 ranks (stage 3) and consolidated "
        f"in {t3 - t2:.3f} s"
    )
    assert_states_equal(full, state)
    print("consolidated state is bitwise equal to the original: True")


if __name__ == "__main__":
    main()
