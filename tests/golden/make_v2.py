"""Write the version 2 golden blobs. Run ONCE, then commit tests/golden/v2/; never regenerate.

Version 2 blobs do not carry their skeleton: it is in their checkpoint's manifest. The golden
set is therefore the blobs plus ``skeleton.msgpack``, the columnar skeleton (docs/format.md,
"Columnar skeleton") exactly as a version 2 manifest stores it, whose digest every blob records.
The state is version 1's (``make_v1.state``), so both versions pin the same values.

    python tests/golden/make_v2.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgpack
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).parent))

import make_v1

import zckpt
from zckpt.format import encode_shard
from zckpt.format._columns import skeleton_digest, skeleton_to_columns

OUT = Path(__file__).parent / "v2"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    if any(OUT.iterdir()):
        print(f"{OUT} is not empty: golden files are written once and never regenerated")
        return 1
    s = make_v1.state()
    plan = zckpt.plan_shards(s, zckpt.ZeroSpec(make_v1.WORLD_SIZE, 2))
    columns = skeleton_to_columns(plan.skeleton)
    (OUT / "skeleton.msgpack").write_bytes(msgpack.packb(columns, use_bin_type=True))
    files = {}
    for codec, chunk in make_v1.CODECS.items():
        for rank in range(make_v1.WORLD_SIZE):
            extra = {"golden": "v2", "codec": codec}
            shard = zckpt.shard_state(s, plan, rank)
            blob = encode_shard(shard, codec=codec, chunk_bytes=chunk, extra=extra, version=2)
            name = f"{codec}-rank{rank}.zckpt"
            (OUT / name).write_bytes(blob)
            files[name] = {"codec": codec, "chunk_bytes": chunk, "size": len(blob)}
    manifest = {
        "format_version": 2,
        "world_size": make_v1.WORLD_SIZE,
        "stage": 2,
        "skeleton_digest": skeleton_digest(columns),
        "zstd_version": list(zstandard.ZSTD_VERSION),
        "python_zstandard": zstandard.__version__,
        "torch": torch.__version__,
        "files": files,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
