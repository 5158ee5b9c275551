"""Child process for tests/test_s3.py's lock takeover test: saves one tag to an S3 server over
and over (``overwrite=True``) until it is killed, so a SIGKILL lands while it holds the tag's
lock.

argv: endpoint, save_dir URL, lease seconds.
"""

from __future__ import annotations

import sys

import s3fs
from s3_crash_child import big_state
from s3_support import KEY, SECRET

import zckpt
from zckpt.store import FsspecStorage


def main() -> None:
    endpoint, save_dir, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET)
    st = FsspecStorage(fs, part_size=5 << 20, multipart_threshold=10 << 20, lease=lease)
    for version in range(2, 10_000):
        zckpt.save_checkpoint(
            save_dir, big_state(version), zckpt.ZeroSpec(1, 2), tag="t", overwrite=True,
            storage=st,
        )  # fmt: skip
        if version == 2:
            print("ready", flush=True)


if __name__ == "__main__":
    main()
