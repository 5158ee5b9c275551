"""Child process for tests/test_s3.py's crash test: saves to an S3 server in a loop until killed.

argv: endpoint, save_dir URL, first version. Odd versions save at world size 1, so their blob
(about 13 MB) goes up as a multipart upload of 5 MiB parts; even ones at world size 4 (single
PUTs). Every third version overwrites the tag ``rolling``; codecs rotate.
"""

from __future__ import annotations

import sys
from typing import Any

import s3fs
import torch
from crash_child import state_of
from s3_support import KEY, SECRET

import zckpt
from zckpt.store import FsspecStorage

LEASE = 2.0  # seconds: a lock the killed child held is stale this long after


def big_state(version: int) -> dict[str, Any]:
    state = state_of(version)
    g = torch.Generator().manual_seed(10_000 + version)
    state["master"]["big"] = torch.randn(2_700_000, generator=g)
    return state


def storage(endpoint: str) -> FsspecStorage:
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET)
    return FsspecStorage(fs, part_size=5 << 20, multipart_threshold=10 << 20, lease=LEASE)


def main() -> None:
    endpoint, save_dir, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    st = storage(endpoint)
    for version in range(first, first + 10_000):
        if version % 3 == 0:
            tag, overwrite = "rolling", True
        else:
            tag, overwrite = f"v{version}", False
        zckpt.save_checkpoint(
            save_dir,
            big_state(version),
            zckpt.ZeroSpec(1 if version % 2 else 4, 2),
            tag=tag,
            overwrite=overwrite,
            keep_last=4,
            codec=("raw", "zstd", "byteplane")[version % 3],
            storage=st,
        )
        if version == first:
            print("ready", flush=True)


if __name__ == "__main__":
    main()
