"""Property tests on the object store, as on local disk: any state hypothesis draws, saved at
any spec (world size 1-8, every stage, alignment, param groups) and codec to the loopback S3
server (and ``memory://``), loads at any other world size exactly as the same save on local
disk does (``tests/test_s3_faults.py`` has the faults)."""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.testing import assert_states_equal, specs, states

s3fs = pytest.importorskip("s3fs", reason="needs s3fs: pip install 'zckpt[test-s3]'")
fsspec = pytest.importorskip("fsspec", reason="needs fsspec: pip install 'zckpt[s3]'")

from s3_support import BUCKET, KEY, SECRET  # noqa: E402

from zckpt.store import FsspecStorage  # noqa: E402

SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))
MiB = 1 << 20


@st.composite
def saves(draw: st.DrawFn) -> tuple[Any, zckpt.ZeroSpec, str, int]:
    state = draw(states())
    return (
        state,
        draw(specs(state)),
        draw(st.sampled_from(["raw", "zstd", "byteplane"])),
        draw(st.integers(1, 8)),
    )


def _storage(server: Any, kind: str) -> tuple[str, FsspecStorage]:
    run = uuid.uuid4().hex[:12]
    if kind == "memory":
        return f"memory://zckpt-props/{run}", FsspecStorage(fsspec.filesystem("memory"))
    fs = s3fs.S3FileSystem(
        endpoint_url=server.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True
    )
    return f"s3://{BUCKET}/props-{run}", FsspecStorage(fs, part_size=5 * MiB)


def _same_as_local(
    url: str, st_: FsspecStorage, case: tuple[Any, zckpt.ZeroSpec, str, int]
) -> None:
    state, spec, codec, ws_load = case
    with tempfile.TemporaryDirectory() as local:
        zckpt.save_checkpoint(local, state, spec, tag="t", codec=codec, chunk_bytes=256)
        zckpt.save_checkpoint(url, state, spec, tag="t", codec=codec, chunk_bytes=256, storage=st_)
        for rank in range(ws_load):
            got = zckpt.load_checkpoint(url, world_size=ws_load, rank=rank, storage=st_)
            want = zckpt.load_checkpoint(local, world_size=ws_load, rank=rank)
            assert_states_equal(got.state, want.state)
        assert_states_equal(zckpt.load_checkpoint(url, storage=st_).state, state)


_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


@pytest.mark.parametrize("kind", ["s3", "memory"])
def test_any_save_loads_at_any_world_size_as_on_local_disk(s3_server: Any, kind: str) -> None:
    examples = max(3, int((12 if kind == "s3" else 40) * SCALE))

    @settings(max_examples=examples, deadline=None, suppress_health_check=_SLOW)
    @given(saves())
    def check(case: tuple[Any, zckpt.ZeroSpec, str, int]) -> None:
        url, st_ = _storage(s3_server, kind)
        _same_as_local(url, st_, case)

    check()


def test_a_load_from_s3_lands_in_the_callers_tensors(s3_server: Any) -> None:
    """``into=`` destinations on a load of a ws-3 save from S3 (the fsspec filesystem
    passed as ``storage=`` as it is): the bytes land in the tensors given, bitwise."""
    fs = s3fs.S3FileSystem(
        endpoint_url=s3_server.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True
    )
    url = f"s3://{BUCKET}/into-{uuid.uuid4().hex[:12]}"
    g = torch.Generator().manual_seed(9)
    state = {"master": {"w": torch.randn(5000, generator=g), "v": torch.randn(33, generator=g)}}
    zckpt.save_checkpoint(url, state, zckpt.ZeroSpec(3, 3), tag="t", storage=fs)
    into = {"master": {k: torch.empty_like(v) for k, v in state["master"].items()}}
    kept = {k: v.data_ptr() for k, v in into["master"].items()}
    zckpt.load_checkpoint(url, into=into, storage=fs)
    assert_states_equal(into, state)
    assert {k: v.data_ptr() for k, v in into["master"].items()} == kept
