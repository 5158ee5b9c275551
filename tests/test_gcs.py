"""``gs://`` URLs against a GCS-protocol server on loopback (gcp-storage-emulator, from PyPI),
through gcsfs: saves at world size 2 (ranks as threads), loads at another world size, an
overwrite, retention, the fp32 state dict and ``zckpt verify``. gcsfs is a non-S3 fsspec
filesystem (``_fsbackend.py``): no conditional writes, so its locks are the advisory
check-then-write kind (``docs/layout.md``). Skipped unless the ``test-gcs`` extra is installed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.store._resolve import listdir, storage_options_scope
from zckpt.testing import assert_states_equal, run_ranks

# gcsfs's experimental layer asks a gRPC control plane for each bucket's type (60 s per call
# before it gives up against a server without one): off, before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
pytest.importorskip("gcsfs", reason="needs gcsfs: pip install 'zckpt[test-gcs]'")
pytest.importorskip("gcp_storage_emulator", reason="needs pip install 'zckpt[test-gcs]'")

BUCKET = "zckpt-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gcs() -> Iterator[dict[str, Any]]:
    """The emulator on 127.0.0.1 (a free port, in memory, one bucket), stopped after; the
    storage_options that reach it."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.1)
        yield {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "token": "anon",
            "project": "zckpt",
            "skip_instance_cache": True,
        }
    finally:
        server.terminate()
        server.wait(10)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    master = {"w": torch.randn(4001, generator=g), "b": torch.randn(7, 3, generator=g)}
    return {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}


def _save(url: str, state: Any, opts: dict[str, Any], tag: str, **kw: Any) -> None:
    def rank(comm: Any) -> None:
        zckpt.save_checkpoint(
            url,
            state,
            zckpt.ZeroSpec(2, 2),
            tag=tag,
            comm=comm,
            storage_options=opts or None,
            **kw,
        )

    run_ranks(rank, 2)


def test_save_load_reshard_overwrite_and_retention_on_gs(
    gcs: dict[str, Any], tmp_path: Path
) -> None:
    url = f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
    _save(url, _state(1), gcs, "a")
    got = zckpt.load_checkpoint(url, storage_options=gcs)
    assert got.load_path == f"{url}/a"
    assert_states_equal(got.state, _state(1))
    local = tmp_path / "same"  # the same save on local disk: what each new rank must get
    _save(str(local), _state(1), {}, "a")
    for r in range(3):
        part = zckpt.load_checkpoint(url, world_size=3, stage=3, rank=r, storage_options=gcs)
        want = zckpt.load_checkpoint(local, world_size=3, stage=3, rank=r)
        assert_states_equal(part.state, want.state)
    _save(url, _state(2), gcs, "a", overwrite=True)
    assert_states_equal(zckpt.load_checkpoint(url, storage_options=gcs).state, _state(2))
    gen = zckpt.open_checkpoint(url, storage_options=gcs).manifest.generation
    with storage_options_scope(gcs):
        names = listdir(f"{url}/a")
    assert all(n == "manifest.zckm" or n.startswith(gen) for n in names), names
    _save(url, _state(3), gcs, "b", keep_last=1)
    assert [c.tag for c in zckpt.list_tags(url, storage_options=gcs)] == ["b"]
    fp32 = zckpt.get_fp32_state_dict_from_zero_checkpoint(url, storage_options=gcs)
    assert_states_equal(fp32, _state(3)["master"])


def test_the_cli_verifies_and_inspects_gs(gcs: dict[str, Any]) -> None:
    from zckpt.cli import main

    url = f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
    _save(url, _state(4), gcs, "t")
    opts = [f"--storage-option={k}={v}" for k, v in gcs.items() if k != "skip_instance_cache"]
    assert main(["verify", url, *opts]) == 0
    assert main(["inspect", url, "--json", *opts]) == 0
