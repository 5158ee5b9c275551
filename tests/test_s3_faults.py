"""Faults between a job and the loopback S3 server (the proxy of ``tests/s3_support.py``), beside
those of ``tests/test_s3.py``: a permanent failure of one rank's upload, with the ranks as
threads of one job, raises on every rank a ``SaveError`` naming that rank and the object; a
transient error that never clears is retried for ``retry_for`` seconds and then fails the save
the same way. Either way nothing is committed and the previous checkpoint and ``latest`` stay."""

from __future__ import annotations

import re
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


def _flip_once(target: str, seen: list[str]) -> Any:
    """An on_request hook that flips one bit of the first request body whose path has
    ``target`` (and, for ``partNumber=2``, is that part), as a bad network card would."""

    def flip(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        if method == "PUT" and target in path and not seen and len(body) > 100:
            seen.append(path)
            return body[:50] + bytes([body[50] ^ 0x10]) + body[51:]
        return body

    return flip


@pytest.mark.parametrize("target", ["rank00002", "partNumber=2"])
def test_a_body_corrupted_on_its_way_is_refused_by_the_etag_check(
    proxy: FaultProxy, target: str
) -> None:
    """A bucket whose ETags are MD5s (moto, SSE-S3): one bit flipped in one rank's single PUT or
    in one part of a multipart upload. The store's ETag is then not the MD5 of the bytes sent:
    the upload is not counted, the save fails on every rank, nothing is committed."""
    url, storage = _storage(proxy, retry_for=5)
    fs = storage.fs
    storage = FsspecStorage(fs, part_size=5 << 20, multipart_threshold=10 << 20, retry_for=5)
    assert all(isinstance(s, zckpt.store.Saved) for s in _save_as_ranks(url, storage, OLD))
    seen: list[str] = []
    proxy.on_request = _flip_once(target, seen)
    big = {"w": -torch.arange(4 * 4_000_000.0), "step": 2}  # 16 MB per rank: multipart
    got = _save_as_ranks(url, storage, NEW if target.startswith("rank") else big)
    proxy.on_request = None
    assert len(seen) == 1, seen
    failed = {r for e in got for r in e.errors}
    assert len(failed) == 1 and all("is not the MD5" in str(e) for e in got), got
    assert all(isinstance(e, zckpt.SaveError) and not e.committed for e in got)
    loaded = zckpt.load_checkpoint(url, storage=storage)
    assert_states_equal(loaded.state, OLD)
    assert storage.unfinished_uploads(url) == []


def test_a_store_that_shows_another_size_fails_the_upload(proxy: FaultProxy) -> None:
    """A PUT whose answer has no ETag confirmed nothing: a HEAD must show the size uploaded,
    and a store that answers another one (a truncated object) fails that rank's blob and the
    save. (An answer whose ETag is the MD5 of the bytes sent confirms them all: no HEAD.)"""
    url, storage = _storage(proxy, retry_for=5)
    assert all(isinstance(s, zckpt.store.Saved) for s in _save_as_ranks(url, storage, OLD))

    def short(
        method: str,
        path: str,
        sent: dict[str, str],
        body: bytes,
        answer: list[tuple[str, str]],
        data: bytes,
    ) -> tuple[list[tuple[str, str]], bytes]:
        if method == "PUT" and "rank00002" in path:
            answer = [(k, v) for k, v in answer if k.lower() != "etag"]
        if method == "HEAD" and "rank00002" in path:
            answer = [(k, str(int(v) - 1) if k.lower() == "content-length" else v)
                      for k, v in answer]  # fmt: skip
        return answer, data

    proxy.on_response = short
    got = _save_as_ranks(url, storage, NEW)
    proxy.on_response = None
    assert all(re.search(r"the store holds \d+ bytes, \d+ were uploaded", str(e)) for e in got)
    _every_rank_failed_on_rank_2(url, storage, got)
