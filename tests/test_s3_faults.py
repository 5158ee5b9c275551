"""Faults between a job and the loopback S3 server (the proxy of ``tests/s3_support.py``), beside
those of ``tests/test_s3.py``: a permanent failure of one rank's upload, with the ranks as
threads of one job, raises on every rank a ``SaveError`` naming that rank and the object; a
transient error that never clears is retried for ``retry_for`` seconds and then fails the save
the same way. Either way nothing is committed and the previous checkpoint and ``latest`` stay."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import zckpt
from zckpt.testing import assert_states_equal, run_ranks

s3fs = pytest.importorskip("s3fs", reason="needs s3fs: pip install 'zckpt[test-s3]'")

from s3_support import BUCKET, KEY, SECRET, FaultProxy  # noqa: E402

from zckpt.store import FsspecStorage  # noqa: E402

SPEC = zckpt.ZeroSpec(4, 2)
OLD = {"w": torch.arange(4000.0), "step": 1}
NEW = {"w": -torch.arange(4000.0), "step": 2}


@pytest.fixture
def proxy(s3_server: Any) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_server.endpoint).start()
    yield p
    p.stop()


def _storage(proxy: FaultProxy, retry_for: float) -> tuple[str, FsspecStorage]:
    fs = s3fs.S3FileSystem(
        endpoint_url=proxy.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True,
        config_kwargs={"retries": {"max_attempts": 1}},  # the storage's retries only
    )  # fmt: skip
    return f"s3://{BUCKET}/faults-{uuid.uuid4().hex[:12]}", FsspecStorage(fs, retry_for=retry_for)


def _save_as_ranks(url: str, storage: FsspecStorage, state: Any) -> list[Any]:
    def rank(comm: Any) -> Any:
        try:
            return zckpt.save_checkpoint(url, state, SPEC, tag="t", overwrite=True, comm=comm,
                                         storage=storage)  # fmt: skip
        except zckpt.SaveError as e:
            return e

    return run_ranks(rank, SPEC.world_size)


def _every_rank_failed_on_rank_2(url: str, storage: FsspecStorage, got: list[Any]) -> None:
    assert all(isinstance(e, zckpt.SaveError) and not e.committed for e in got), got
    for e in got:
        assert list(e.errors) == [2], e.errors
        assert "rank 2" in str(e) and f"{url}/t/" in str(e) and "rank00002-of-00004" in str(e)
    loaded = zckpt.load_checkpoint(url, storage=storage)
    assert loaded.load_path == f"{url}/t"
    assert_states_equal(loaded.state, OLD)
    gen = zckpt.open_checkpoint(url, storage=storage).manifest.generation
    assert all(n == "manifest.zckm" or n.startswith(gen) for n in storage.listdir(f"{url}/t"))


def test_a_permanent_failure_of_one_ranks_upload_fails_every_rank(proxy: FaultProxy) -> None:
    """Four ranks as threads (one job): rank 2's blob is refused (403), which is not retried."""
    url, storage = _storage(proxy, retry_for=30)
    assert all(isinstance(s, zckpt.store.Saved) for s in _save_as_ranks(url, storage, OLD))
    proxy.faults = [lambda m, p: 403 if m == "PUT" and "rank00002" in p else None]
    got = _save_as_ranks(url, storage, NEW)
    proxy.faults = []
    assert len([s for s in proxy.seen if s[2] == 403]) == 1  # refused once, not retried
    _every_rank_failed_on_rank_2(url, storage, got)


def test_a_transient_error_that_never_clears_fails_after_retry_for(proxy: FaultProxy) -> None:
    """Rank 2's blob is answered 503 SlowDown on every attempt: retried (more than once), then
    the save fails on every rank, the message saying how long it was retried."""
    url, storage = _storage(proxy, retry_for=1.5)
    assert all(isinstance(s, zckpt.store.Saved) for s in _save_as_ranks(url, storage, OLD))
    proxy.faults = [lambda m, p: 503 if m == "PUT" and "rank00002" in p else None]
    got = _save_as_ranks(url, storage, NEW)
    proxy.faults = []
    assert len([s for s in proxy.seen if s[2] == 503]) > 1
    assert all("retried for up to 1.5 s" in str(e) for e in got), got
    _every_rank_failed_on_rank_2(url, storage, got)
