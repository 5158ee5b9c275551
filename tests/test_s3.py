"""Checkpoints in an object store: a real S3 server on loopback (moto's server mode, started by
the ``s3_server`` fixture), and ``memory://`` as a second fsspec backend where it makes sense.

The same kinds of tests as on local disk: saves and loads at other world sizes, stages and
codecs, overwrites, retention, async saves, fp32 consolidation, verify, the CLI with s3://
URLs, two writers, failed uploads (a proxy between client and server fails chosen requests),
and SIGKILL at random instants.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import zckpt
from zckpt.testing import assert_states_equal

s3fs = pytest.importorskip("s3fs", reason="needs s3fs: pip install 'zckpt[test-s3]'")
fsspec = pytest.importorskip("fsspec", reason="needs fsspec: pip install 'zckpt[s3]'")

from s3_support import BUCKET, KEY, SECRET, FaultProxy  # noqa: E402

from zckpt.store import FsspecStorage  # noqa: E402

SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))
MiB = 1 << 20


@dataclass
class Where:
    """A fresh save_dir URL, its storage, and the storage_options that reach it by URL."""

    url: str
    storage: FsspecStorage
    options: dict[str, Any] | None
    s3: bool


def _s3_fs(endpoint: str, **kw: Any) -> Any:
    return s3fs.S3FileSystem(
        endpoint_url=endpoint, key=KEY, secret=SECRET, skip_instance_cache=True, **kw
    )


@pytest.fixture(params=["s3", "memory"])
def where(request: pytest.FixtureRequest) -> Where:
    run = uuid.uuid4().hex[:12]
    if request.param == "memory":
        fs = fsspec.filesystem("memory")
        return Where(f"memory://zckpt-tests/{run}", FsspecStorage(fs, lease=5), None, False)
    server = request.getfixturevalue("s3_server")
    st = FsspecStorage(
        _s3_fs(server.endpoint), part_size=5 * MiB, multipart_threshold=10 * MiB, lease=5
    )
    return Where(f"s3://{BUCKET}/{run}", st, server.options, True)


@pytest.fixture
def s3(s3_server: Any) -> Where:
    run = uuid.uuid4().hex[:12]
    st = FsspecStorage(
        _s3_fs(s3_server.endpoint), part_size=5 * MiB, multipart_threshold=10 * MiB, lease=5
    )
    return Where(f"s3://{BUCKET}/{run}", st, s3_server.options, True)


def state_of(seed: int, n: int = 1000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    master = {
        "emb": torch.randn(n // 10 + 7, 13, generator=g),
        "fc.weight": torch.randn(37, 11, generator=g),
        "fc.bias": torch.randn(37, generator=g),
    }
    return {
        "module": {k: v.bfloat16() for k, v in master.items()},
        "master": master,
        "optimizer": {
            "state": {k: {"exp_avg": torch.randn(v.shape, generator=g)} for k, v in master.items()}
        },
        "lr_scheduler": {"last_epoch": seed},
        "global_steps": seed,
    }


def spec(ws: int, stage: int) -> zckpt.ZeroSpec:
    return zckpt.ZeroSpec(ws, stage)


# -- saves and loads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ws_save", "ws_load", "stage", "codec"),
    [
        (1, 8, 1, "raw"),
        (8, 1, 2, "zstd"),
        (3, 5, 3, "byteplane"),
        (4, 4, 2, "raw"),
        (2, 7, 3, "zstd"),
        (5, 2, 1, "byteplane"),
        (6, 3, 2, "raw"),
    ],
)
def test_save_load_other_world_sizes(
    where: Where, tmp_path: Path, ws_save: int, ws_load: int, stage: int, codec: str
) -> None:
    """Every rank at another world size reads what a local checkpoint of the same save reads."""
    state = state_of(ws_save * 10 + stage)
    sp = spec(ws_save, stage)
    saved = zckpt.save_checkpoint(
        where.url, state, sp, tag="t", codec=codec, chunk_bytes=4096, storage=where.storage
    )
    assert saved.path == f"{where.url}/t"
    zckpt.save_checkpoint(tmp_path, state, sp, tag="t", codec=codec, chunk_bytes=4096)
    for rank in range(ws_load):
        got = zckpt.load_checkpoint(where.url, world_size=ws_load, rank=rank, storage=where.storage)
        want = zckpt.load_checkpoint(tmp_path, world_size=ws_load, rank=rank)
        assert got.load_path == f"{where.url}/t"
        assert_states_equal(got.state, want.state)
    whole = zckpt.load_checkpoint(where.url, storage=where.storage)
    assert_states_equal(whole.state, state)


def test_urls_with_storage_options(where: Where) -> None:
    """The URL alone (with storage_options the fsspec way) reaches the same store."""
    state = state_of(3)
    zckpt.save_checkpoint(
        where.url + "/", state, spec(2, 2), tag="a", storage_options=where.options
    )
    assert [c.tag for c in zckpt.list_tags(where.url, storage_options=where.options)] == ["a"]
    got = zckpt.load_checkpoint(where.url, storage_options=where.options)
    assert_states_equal(got.state, state)
    ck = zckpt.open_checkpoint(where.url, storage_options=where.options)
    assert ck.path == f"{where.url}/a" and ck.manifest.spec.world_size == 2


def test_multipart_threshold_decides_one_put_or_parts(s3: Where) -> None:
    """Raw blobs under ``multipart_threshold`` are one PUT, others ``part_size`` parts; both
    read back as written. The defaults: 16 MiB parts, one PUT under 100 MiB."""
    default = FsspecStorage(s3.storage.fs)
    assert (default._backend.part_size, default._backend.multipart_threshold) == (
        16 * MiB,
        100 * MiB,
    )
    with pytest.raises(ValueError, match="multipart_threshold"):
        FsspecStorage(s3.storage.fs, multipart_threshold=-1)
    st = FsspecStorage(s3.storage.fs, part_size=5 * MiB, multipart_threshold=12 * MiB)
    backend, calls = st._backend, []
    real_parts, real_put = backend._multipart, backend._put_hashing

    def parts(path: str, chunks: Any, *args: Any, **kwargs: Any) -> str:
        chunks = list(chunks)
        calls.append(("parts", [sum(v.nbytes for v in c) for c in chunks]))
        return real_parts(path, iter(chunks), *args, **kwargs)

    def put(path: str, views: list[memoryview], hasher: Any) -> str:
        calls.append(("put", [sum(v.nbytes for v in views)]))
        return real_put(path, views, hasher)

    backend._multipart, backend._put_hashing = parts, put
    rng = np.random.default_rng(3)
    for n in (12 * MiB - 1, 12 * MiB):
        data = rng.bytes(n)
        path = f"{s3.url}/threshold/{n}.bin"
        assert st.write_atomic(path, [data[:1000], memoryview(data)[1000:]])[0] == n
        assert st.read(path, 0, n) == data
    assert calls == [("put", [12 * MiB - 1]), ("parts", [5 * MiB, 5 * MiB, 2 * MiB])]


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_large_blobs_go_up_in_parts(s3: Where, codec: str) -> None:
    """Blobs past two parts are multipart uploads (raw: views of tensor memory; compressed: the
    head is part 1, sent last); they load bitwise and verify (whole-file xxh3 included)."""
    g = torch.Generator().manual_seed(7)
    state = {"master": {"w": torch.randn(7_000_000, generator=g)}}  # 28 MB: 5+ parts of 5 MiB
    zckpt.save_checkpoint(s3.url, state, spec(1, 2), tag="big", codec=codec, storage=s3.storage)
    got = zckpt.load_checkpoint(s3.url, world_size=3, rank=1, storage=s3.storage)
    n = 7_000_000
    part = -(-n // 3)
    assert torch.equal(got.state["master"]["w"], state["master"]["w"][part : 2 * part])
    (report,) = zckpt.verify_checkpoint(s3.url, storage=s3.storage)
    assert report.ok, report.problems
    assert s3.storage.unfinished_uploads(s3.url) == []


def test_overwrite_replaces_a_tag_atomically(where: Where) -> None:
    first, second = state_of(1), state_of(2)
    zckpt.save_checkpoint(where.url, first, spec(3, 1), tag="t", storage=where.storage)
    with pytest.raises(zckpt.TagError, match="overwrite=True"):
        zckpt.save_checkpoint(where.url, second, spec(3, 1), tag="t", storage=where.storage)
    zckpt.save_checkpoint(
        where.url, second, spec(2, 3), tag="t", overwrite=True, storage=where.storage
    )
    got = zckpt.load_checkpoint(where.url, storage=where.storage)
    assert_states_equal(got.state, second)
    gen = zckpt.open_checkpoint(where.url, storage=where.storage).manifest.generation
    names = where.storage.listdir(f"{where.url}/t")
    assert names == sorted(["manifest.zckm", *(f"{gen}.rank0000{r}-of-00002.zck" for r in (0, 1))])


def test_retention_keep_last(where: Where) -> None:
    for step in range(1, 6):
        zckpt.save_checkpoint(
            where.url, state_of(step), spec(2, 2), keep_last=2, storage=where.storage
        )
    assert [c.tag for c in zckpt.list_tags(where.url, storage=where.storage)] == [
        "global_step4",
        "global_step5",
    ]
    assert sorted(where.storage.listdir(where.url)) == ["global_step4", "global_step5", "latest"]
    assert_states_equal(zckpt.load_checkpoint(where.url, storage=where.storage).state, state_of(5))
    assert zckpt.apply_retention(where.url, keep_last=1, storage=where.storage) == ["global_step4"]


def test_async_save(where: Where) -> None:
    state = state_of(4)
    with zckpt.store.AsyncSaver() as saver:
        pending = zckpt.save_checkpoint(
            where.url, state, spec(4, 2), tag="a", async_=saver, storage=where.storage
        )
        before = {k: v.clone() for k, v in state["master"].items()}
        for v in state["master"].values():
            v.add_(1.0)  # training goes on
        assert pending.wait().path == f"{where.url}/a"
    got = zckpt.load_checkpoint(where.url, storage=where.storage).state
    assert_states_equal(got["master"], before)


def test_fp32_state_dict(where: Where) -> None:
    state = state_of(5)
    zckpt.save_checkpoint(where.url, state, spec(3, 3), tag="t", storage=where.storage)
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(where.url, storage=where.storage)
    assert_states_equal(sd, state["master"])
    lazy = zckpt.get_fp32_state_dict_from_zero_checkpoint(
        where.url, lazy_mode=True, storage=where.storage
    )
    assert torch.equal(lazy["fc.bias"].contiguous(), state["master"]["fc.bias"])


def test_verify_finds_damage(where: Where) -> None:
    zckpt.save_checkpoint(where.url, state_of(6), spec(2, 1), tag="t", storage=where.storage)
    (report,) = zckpt.verify_checkpoint(where.url, storage=where.storage)
    assert report.ok and report.files == 2
    blob = next(n for n in where.storage.listdir(f"{where.url}/t") if "rank00001" in n)
    path = f"{where.url}/t/{blob}"
    data = bytearray(where.storage.read(path, 0, where.storage.size(path)))
    data[-3] ^= 0xFF
    where.storage.fs.pipe_file(where.storage._key(path), bytes(data))
    (report,) = zckpt.verify_checkpoint(where.url, storage=where.storage)
    assert not report.ok
    assert any(path in p for p in report.problems), report.problems


def test_reading_a_directory_or_nothing_is_a_storage_error(where: Where) -> None:
    zckpt.save_checkpoint(where.url, state_of(1), spec(1, 1), tag="t", storage=where.storage)
    with pytest.raises(zckpt.StorageError, match="is a directory"):
        where.storage.read(f"{where.url}/t", 0, 10)
    with pytest.raises(zckpt.StorageError, match="no such file"):
        where.storage.size(f"{where.url}/nothing")
    assert where.storage.listdir(f"{where.url}/nothing") == []
    assert where.storage.is_dir(f"{where.url}/t") and not where.storage.is_dir(f"{where.url}/x")


def test_nothing_to_load_is_said_precisely(where: Where) -> None:
    got = zckpt.load_checkpoint(where.url, storage=where.storage)
    assert got.load_path is None  # an empty prefix: a fresh run, logged, no warning
    zckpt.save_checkpoint(
        where.url, state_of(1), spec(1, 1), tag="t", save_latest=False, storage=where.storage
    )
    with pytest.warns(UserWarning, match="committed tags are t"):
        zckpt.load_checkpoint(where.url, storage=where.storage)
    with pytest.raises(zckpt.CheckpointNotFoundError, match="no such tag"):
        zckpt.load_checkpoint(where.url, tag="u", storage=where.storage)


# -- the CLI with s3:// URLs --------------------------------------------------------------


def test_cli_with_s3_urls(s3: Where, s3_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from zckpt.cli import main

    opts = [
        f"--storage-option=endpoint_url={s3_server.endpoint}",
        f"--storage-option=key={KEY}",
        f"--storage-option=secret={SECRET}",
    ]
    state = state_of(8)
    zckpt.save_checkpoint(s3.url, state, spec(2, 2), tag="t", storage=s3.storage)
    out = f"{s3.url}-resharded"
    assert main(["reshard", s3.url, out, "--world-size", "3", "--stage", "3", *opts]) == 0
    for rank in range(3):
        got = zckpt.load_checkpoint(out, world_size=3, stage=3, rank=rank, storage=s3.storage)
        want = zckpt.load_checkpoint(s3.url, world_size=3, stage=3, rank=rank, storage=s3.storage)
        assert_states_equal(got.state, want.state)
    assert zckpt.open_checkpoint(out, storage=s3.storage).manifest.spec.world_size == 3
    assert main(["reshard", s3.url, out, "--world-size", "2", *opts]) == 1  # OUT holds a run
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["verify", out, *opts]) == 0
    assert main(["inspect", out, "--json", *opts]) == 0
    assert '"latest": "t"' in capsys.readouterr().out
    zckpt.save_checkpoint(out, state, spec(1, 1), tag="u", storage=s3.storage)
    assert main(["prune", out, "--keep-last", "1", *opts]) == 0
    assert "deleted t" in capsys.readouterr().out
    assert main(["clean", out, *opts]) == 0
    assert main(["prune", f"s3://{BUCKET}/nothing-{uuid.uuid4().hex}", "--keep-last", "1", *opts])
    assert main(["verify", out, "--storage-option", "endpoint_url"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


# -- two writers ---------------------------------------------------------------------------


def _other_job(where: Where) -> FsspecStorage:
    """Another process's view of the same store: its own storage, locks and lease."""
    fs = where.storage.fs
    return FsspecStorage(
        fs, lease=where.storage.lease, part_size=5 * MiB, multipart_threshold=10 * MiB
    )


def test_second_writer_of_a_tag_is_refused(where: Where) -> None:
    zckpt.save_checkpoint(where.url, state_of(1), spec(2, 1), tag="t", storage=where.storage)
    other = _other_job(where)
    held = other.try_lock(f"{where.url}/.t.zckpt-lock", "pid 4242 on elsewhere since then")
    assert held is not None
    try:
        with pytest.raises(
            zckpt.store._save_result.ConcurrentSaveError, match="pid 4242 on elsewhere"
        ):
            zckpt.save_checkpoint(
                where.url, state_of(2), spec(2, 1), tag="t", overwrite=True, storage=where.storage
            )
        # A different tag proceeds side by side.
        zckpt.save_checkpoint(where.url, state_of(3), spec(2, 1), tag="u", storage=where.storage)
        # Retention never deletes a tag whose save is running.
        assert zckpt.apply_retention(where.url, 1, storage=where.storage) == []
    finally:
        held.release()
    got = zckpt.load_checkpoint(where.url, tag="t", storage=where.storage)
    assert_states_equal(got.state, state_of(1))  # the refused save wrote nothing
    assert len(where.storage.listdir(f"{where.url}/t")) == 3


def test_a_held_lock_is_renewed_and_a_dead_ones_lapses(where: Where) -> None:
    path = f"{where.url}/.lock-test"
    quick = FsspecStorage(where.storage.fs, lease=1.0)
    held = quick.try_lock(path, "holder")
    assert held is not None
    time.sleep(2.0)  # twice the lease: only renewal keeps it
    assert where.storage.try_lock(path, "taker") is None
    assert held.intact()
    # The holder dies: nothing renews it any more (its renewal thread is gone with it).
    quick._forget(held)  # type: ignore[arg-type]
    time.sleep(3.2)  # the lease, and a second of slack for HTTP dates' whole seconds
    taken = where.storage.try_lock(path, "taker")
    assert taken is not None and where.storage.lock_owner(path) == "taker"
    assert not held.intact()  # the old holder learns it lost the lock
    held.release()  # and letting go does not remove the new holder's lock
    assert where.storage.lock_owner(path) == "taker"
    taken.release()
    assert not where.storage.exists(path)


def test_a_killed_saves_tag_lock_is_taken_over_after_its_lease(s3_server: Any) -> None:
    """A save SIGKILLed mid-save leaves its tag's lock object behind (no kernel frees it). The
    next save of the tag was refused as concurrent until the lease ran out (30 s by default; a
    local flock frees at once); now it waits for the lock to lapse (it is not renewed any more)
    and takes it over."""
    lease = 5.0  # longer than the 3 s a save used to wait: without the takeover, refused
    url = f"s3://{BUCKET}/killed-{uuid.uuid4().hex[:12]}"
    st = FsspecStorage(
        _s3_fs(s3_server.endpoint), part_size=5 * MiB, multipart_threshold=10 * MiB, lease=lease
    )
    zckpt.save_checkpoint(url, state_of(1), spec(1, 2), tag="t", storage=st)
    lock_path = f"{url}/.t.zckpt-lock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child_py = Path(__file__).parent / "s3_lock_child.py"
    for _ in range(5):  # until the kill lands while the child holds the lock (nearly always)
        child = subprocess.Popen(
            [sys.executable, str(child_py), s3_server.endpoint, url, str(lease)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 30
        while not st.lock_owner(lock_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        if f"pid {child.pid} " in st.lock_owner(lock_path):
            break
    assert f"pid {child.pid} " in st.lock_owner(lock_path), st.lock_owner(lock_path)
    zckpt.save_checkpoint(url, state_of(7), spec(1, 2), tag="t", overwrite=True, storage=st)
    assert_states_equal(zckpt.load_checkpoint(url, tag="t", storage=st).state, state_of(7))
    assert st.lock_owner(lock_path) == ""  # the taken-over lock was released after the save


def test_waiters_for_a_dead_holders_tag_lock_one_wins(s3: Where) -> None:
    """Several saves wait for the same lapsed lock: the takeover is a conditional write on the
    stale lock's ETag, so exactly one gets it; the others see it renewed by its new holder and
    are refused as concurrent. A live holder (renewing a lease shorter than the wait) keeps its
    lock against all of them."""
    from zckpt.store._prepare import tag_lock
    from zckpt.store._save_result import ConcurrentSaveError

    lease = 3.0
    dead = FsspecStorage(s3.storage.fs, lease=lease)
    held = dead.try_lock(f"{s3.url}/.t.zckpt-lock", "pid 1 on a dead node")
    assert held is not None
    dead._forget(held)  # type: ignore[arg-type]  # its holder died: nobody renews it
    live = FsspecStorage(s3.storage.fs, lease=1.0)
    alive = live.try_lock(f"{s3.url}/.u.zckpt-lock", "pid 2 on a live node")
    assert alive is not None
    waiters = [FsspecStorage(s3.storage.fs, lease=lease) for _ in range(4)]
    got: dict[str, list[Any]] = {"t": [None] * 4, "u": [None] * 4}
    go = threading.Barrier(8)

    def wait(tag: str, i: int) -> None:
        go.wait()
        try:
            got[tag][i] = tag_lock(waiters[i], s3.url, tag)
        except ConcurrentSaveError as e:
            got[tag][i] = e

    threads = [threading.Thread(target=wait, args=(t, i)) for t in ("t", "u") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [g for g in got["t"] if not isinstance(g, ConcurrentSaveError)]
    assert len(winners) == 1, got["t"]
    assert all(isinstance(g, ConcurrentSaveError) for g in got["u"]), got["u"]
    assert "pid 2 on a live node" in str(got["u"][0]) and alive.intact()
    winners[0].release()
    alive.release()


@pytest.mark.parametrize("conditional", [True, False])
def test_release_racing_a_renewal_leaves_no_lock(
    s3: Where, monkeypatch: Any, conditional: bool
) -> None:
    """A renewal already past its checks when the lock was released, its PUT landing between
    the release's read of the lock and its delete: the delete (if-match the old ETag) failed, or
    on a store without conditional writes the PUT wrote the lock back. Either way a live lock
    stayed behind and the next save of the tag was refused as concurrent until the lease ran
    out (seen in CI under load, with a 5 s lease). A release now waits for a renewal in flight."""
    st = FsspecStorage(s3.storage.fs, lease=60)
    st._conditional = conditional
    path = f"{s3.url}/.race-lock"
    held = st.try_lock(path, "me")
    assert held is not None
    backend = st._backend
    put_small, delete = backend.put_small, backend.delete
    renewing, read_done, put_done = threading.Event(), threading.Event(), threading.Event()

    def gated_put(key: str, body: bytes, **kw: Any) -> Any:
        renewing.set()
        read_done.wait(3)  # the release has read the lock (or, fixed, waits for us: 3 s)
        try:
            return put_small(key, body, **kw)
        finally:
            put_done.set()

    def gated_delete(key: str, if_match: str | None = None) -> None:
        read_done.set()
        put_done.wait(3)  # the renewal's PUT lands between the release's read and delete
        delete(key, if_match=if_match)

    monkeypatch.setattr(backend, "put_small", gated_put)
    monkeypatch.setattr(backend, "delete", gated_delete)
    renewal = threading.Thread(target=held.renew_if_due, args=(time.monotonic() + 3600, 1.0))
    renewal.start()
    assert renewing.wait(10)  # the renewal is past its checks, its PUT about to go
    held.release()
    renewal.join()
    monkeypatch.setattr(backend, "put_small", put_small)
    monkeypatch.setattr(backend, "delete", delete)
    assert not st.exists(path), st.lock_owner(path)
    assert st.try_lock(path, "next") is not None


def test_concurrent_takers_get_one_lock(s3: Where) -> None:
    """Conditional writes: of several processes racing for one lock, exactly one wins."""
    import threading

    path = f"{s3.url}/.race"
    takers = [_other_job(s3) for _ in range(6)]
    got: list[Any] = [None] * len(takers)
    go = threading.Barrier(len(takers))

    def take(i: int) -> None:
        go.wait()
        got[i] = takers[i].try_lock(path, f"taker {i}")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(takers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [g for g in got if g is not None]
    assert len(winners) == 1
    winners[0].release()


def test_a_lock_on_a_store_with_conditional_writes_costs_no_read_back(
    proxied: tuple[Where, FaultProxy],
) -> None:
    """A conditional PUT that succeeded is the object there: taking a lock is one GET (absent)
    and one PUT (plus, once per storage, a second create that the store must refuse), and once
    the store has refused a create, one PUT; a renewal one PUT, a release one GET and one
    DELETE. (Each read back was a round trip of a save's fixed cost: two locks per save.)"""
    where, proxy = proxied
    path = f"{where.url}/.count-lock"
    key = path.removeprefix("s3://" + BUCKET)
    st = FsspecStorage(where.storage.fs, lease=60)

    def requests() -> list[str | int]:
        return [m for m, p, _ in proxy.seen if p.split("?")[0].endswith(key)]

    first = st.try_lock(path, "me")
    assert first is not None and requests() == ["GET", "PUT", "PUT"]
    assert [s[2] for s in proxy.seen if s[0] == "PUT"] == [200, 412]
    first.release()
    proxy.seen.clear()
    held = st.try_lock(path, "me")
    assert held is not None and requests() == ["PUT"] and held.intact()
    proxy.seen.clear()
    held.renew_if_due(time.monotonic() + 3600, 1.0)  # type: ignore[attr-defined]
    assert requests() == ["PUT"] and held.intact()
    proxy.seen.clear()
    assert st.try_lock(path, "other") is None  # held: a refused create, one GET to see it
    assert requests() == ["PUT", "GET"]
    proxy.seen.clear()
    held.release()
    assert requests() == ["GET", "DELETE"] and not st.exists(path)
    # A store without conditional writes (check-then-write) still reads its write back.
    plain = FsspecStorage(where.storage.fs, lease=60, conditional_writes=False)
    proxy.seen.clear()
    again = plain.try_lock(path, "me")
    assert again is not None and requests() == ["GET", "GET", "PUT", "GET"]
    again.release()


def test_a_store_that_ignores_if_none_match_gets_check_then_write(
    proxied: tuple[Where, FaultProxy],
) -> None:
    """A store that answers a create of an existing object with 200 (it ignores
    ``If-None-Match``, as S3 did before 2024) is found out by the first lock's second create:
    locks then read their writes back, and a live holder's lock is never overwritten."""
    where, proxy = proxied

    def strip(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        for k in [k for k in headers if k.lower() in ("if-none-match", "if-match")]:
            del headers[k]
        return body

    proxy.on_request = strip
    st = FsspecStorage(where.storage.fs, lease=60)
    path = f"{where.url}/.ignoring-lock"
    held = st.try_lock(path, "me")
    assert held is not None and held.intact() and not st._atomic_conditions()
    assert st.try_lock(path, "other") is None and st.lock_owner(path) == "me"
    other = FsspecStorage(where.storage.fs, lease=60)
    assert other.try_lock(path, "other") is None and st.lock_owner(path) == "me"
    held.release()
    assert not st.exists(path)


def test_reading_a_streamed_blob_back_holds_a_bounded_number_of_bytes(s3: Where) -> None:
    """The whole-file hash of a compressed blob is read back in ranged GETs; with 50 MiB parts
    and 8 in flight they held 400 MiB (a 1 GiB zstd save peaked 510 MiB above its state). Now
    at most READ_BACK_FLIGHT GETs of READ_BACK_STEP bytes are outstanding, whatever the part
    size."""
    import xxhash

    from zckpt.store._s3 import READ_BACK_FLIGHT, READ_BACK_STEP, S3Backend

    st = FsspecStorage(
        s3.storage.fs, part_size=50 * MiB, multipart_threshold=100 * MiB, max_concurrency=8
    )
    backend = st._backend
    assert isinstance(backend, S3Backend)
    data = os.urandom(3 * MiB) * 22  # 66 MiB: two 50 MiB parts' worth
    path = f"{s3.url}/blob.bin"
    st.write_atomic(path, [data])
    get, outstanding, most = backend._get, [0], [0]

    async def counting(key: str, offset: int, length: int) -> bytes:
        outstanding[0] += length
        most[0] = max(most[0], outstanding[0])
        try:
            return await get(key, offset, length)
        finally:
            outstanding[0] -= length

    backend._get = counting  # type: ignore[method-assign]
    digest = backend._hash_back(st._key(path), len(data))
    assert digest == xxhash.xxh3_64_intdigest(data)
    assert most[0] <= READ_BACK_FLIGHT * READ_BACK_STEP < 50 * MiB, most[0] / MiB


def test_a_streamed_blobs_parts_in_flight_are_bounded_by_bytes(s3: Where, monkeypatch: Any) -> None:
    """A compressed save streams frames into parts, and each part in flight holds its frames:
    with 50 MiB parts, 4 in flight and two held for part 1, a 1 GiB zstd save peaked 392 MiB
    above its state. Streamed parts are now at most STREAM_PART bytes whatever ``part_size``,
    and at most STREAM_FLIGHT bytes of them are in flight."""
    from zckpt.store import _s3

    monkeypatch.setattr(_s3, "STREAM_FLIGHT", 16 * MiB)
    st = FsspecStorage(
        s3.storage.fs, part_size=50 * MiB, multipart_threshold=100 * MiB, max_concurrency=8
    )
    backend = st._backend
    part, outstanding, most, sizes = backend._part, [0], [0], []

    async def counting(*args: Any, **kw: Any) -> Any:
        n = sum(v.nbytes for v in args[-1])
        sizes.append(n)
        outstanding[0] += n
        most[0] = max(most[0], outstanding[0])
        try:
            return await part(*args, **kw)
        finally:
            outstanding[0] -= n

    monkeypatch.setattr(backend, "_part", counting)
    g = torch.Generator().manual_seed(5)
    state = {"w": torch.randint(0, 256, (40 * MiB,), dtype=torch.uint8, generator=g)}
    zckpt.save_checkpoint(s3.url, state, spec(1, 1), tag="t", codec="zstd", storage=st)
    assert len(sizes) >= 4 and max(sizes) <= _s3.STREAM_PART, sizes
    assert most[0] <= 16 * MiB, most[0] / MiB
    assert_states_equal(zckpt.load_checkpoint(s3.url, storage=st).state, state)


def test_streamed_parts_grow_to_stay_within_s3s_part_count(monkeypatch: Any) -> None:
    from zckpt.store import _parts

    monkeypatch.setattr(_parts, "GROW_EVERY", 2)
    data = bytes(range(256)) * 4
    parts = list(_parts.growing_parts([data[:100], data[100:]], 16))
    assert [sum(v.nbytes for v in p) for p in parts] == [
        16,
        16,
        32,
        32,
        64,
        64,
        128,
        128,
        256,
        256,
        32,
    ]
    assert b"".join(bytes(v) for p in parts for v in p) == data


def _counting(st: FsspecStorage) -> list[tuple[str, str, str]]:
    """Every request ``st`` makes from now on, as (operation, key, range)."""
    backend, calls = st._backend, []
    real = backend._call

    async def counting(what: str, method: str, **kw: Any) -> Any:
        calls.append((method, str(kw.get("Key", kw.get("Prefix", ""))), str(kw.get("Range", ""))))
        return await real(what, method, **kw)

    backend._call = counting
    return calls


def test_a_load_reads_latest_once_and_each_header_with_one_get(s3: Where) -> None:
    """A load's requests: the save_dir's manifest probed and ``latest`` read once (one GET
    each), the manifest in one GET, and each blob the rank needs opened with one GET of its
    first HEAD_PREFIX bytes (its size taken from that GET's Content-Range): no HEAD, no LIST,
    and no blob opened that the rank does not read (the skeleton is checked against the first
    header it reads). Was 15 requests per rank before the first blob (``latest`` three times)."""
    from zckpt.store._fsspec import HEAD_PREFIX

    state = {"master": {"w": torch.arange(30_000.0)}, "optimizer": {"v": torch.ones(9_000)}}
    zckpt.save_checkpoint(s3.url, state, spec(3, 3), tag="t", storage=s3.storage)
    ck = zckpt.open_checkpoint(s3.url, storage=s3.storage)
    index = ck.source_index()
    for ws, rank in ((2, 0), (2, 1), (3, 2), (1, 0), (5, 4)):
        plan = zckpt.plan_shards(ck.manifest.skeleton, ck.manifest.spec.with_world_size(ws))
        needed = {s.record.name for f in plan.holds(rank) for s, _, _ in index.overlapping(f)}
        st = FsspecStorage(s3.storage.fs)
        calls = _counting(st)
        got = zckpt.load_checkpoint(s3.url, world_size=ws, rank=rank, storage=st)
        want = zckpt.load_checkpoint(s3.url, world_size=ws, rank=rank, storage=s3.storage)
        assert_states_equal(got.state, want.state)
        assert {m for m, _, _ in calls} == {"get_object"}, calls
        small = [k.rsplit("/", 2)[-2:] for _, k, _ in calls if not k.endswith(".zck")]
        assert small == [[s3.url.rsplit("/", 1)[-1], "manifest.zckm"],
                         [s3.url.rsplit("/", 1)[-1], "latest"], ["t", "manifest.zckm"]]  # fmt: skip
        heads = [(k.rsplit("/", 1)[-1], r) for _, k, r in calls if r.startswith("bytes=0-")]
        wanted = [(name, f"bytes=0-{HEAD_PREFIX - 1}") for name in sorted(needed)]
        assert len(needed) == {2: 2, 3: 1, 1: 3, 5: 1}[ws]  # partitioned: only overlapping files
        assert sorted(h for h in heads if h[0].endswith(".zck")) == wanted, calls


@pytest.mark.parametrize("when", ["manifest", "blob"])
def test_a_load_whose_tag_is_deleted_meanwhile_follows_latest_once(s3: Where, when: str) -> None:
    """``latest`` is read once per load. When retention (another job's save with keep_last=1)
    deletes the tag it named before the load read that tag's manifest, or after the manifest
    but before its blobs, the load reads ``latest`` once more and loads the new tag whole: one
    checkpoint, never a mix of two."""
    url = f"{s3.url}/{when}"
    zckpt.save_checkpoint(url, state_of(1), spec(2, 2), tag="a", storage=s3.storage)
    other = FsspecStorage(s3.storage.fs)
    moved: list[int] = []

    def move() -> None:
        moved.append(len([k for _, k, _ in calls if k.endswith("/latest")]))
        zckpt.save_checkpoint(url, state_of(2), spec(2, 2), tag="b", keep_last=1, storage=other)

    class Racing(FsspecStorage):
        def read_whole(self, path: str, limit: int) -> bytes | None:
            if when == "manifest" and path.endswith("/a/manifest.zckm") and not moved:
                move()
            return super().read_whole(path, limit)

        def read(self, path: str, offset: int, length: int) -> bytes:
            if when == "blob" and path.endswith(".zck") and not moved:
                move()
            return super().read(path, offset, length)

    st = Racing(s3.storage.fs)
    calls = _counting(st)
    got = zckpt.load_checkpoint(url, world_size=3, rank=1, storage=st)
    assert moved and got.load_path == f"{url}/b"
    want = zckpt.load_checkpoint(url, tag="b", world_size=3, rank=1, storage=s3.storage)
    assert_states_equal(got.state, want.state)
    assert got.client_state == want.client_state
    assert moved == [1]  # latest was read once before the load failed and followed it
    assert not s3.storage.exists(f"{url}/a")


def test_a_load_checks_the_skeleton_when_it_reads_no_header(s3: Where) -> None:
    """A rank that holds nothing from any blob (more ranks than elements: only replicated
    plain values) still has the manifest's skeleton checked against a file's."""
    state = {"w": torch.arange(2.0), "step": 7}
    zckpt.save_checkpoint(s3.url, state, spec(2, 3), tag="t", storage=s3.storage)
    st = FsspecStorage(s3.storage.fs)
    calls = _counting(st)
    got = zckpt.load_checkpoint(s3.url, world_size=4, rank=3, storage=st)
    assert got.state["step"] == 7 and got.state["w"].numel() == 0
    assert (
        [k for _, k, r in calls if k.endswith(".zck")]
        == [k for _, k, _ in calls if "rank00000" in k]
        != []
    )


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_a_fragments_chunks_come_in_a_few_large_gets(
    s3: Where, monkeypatch: Any, codec: str
) -> None:
    """will_need names a fragment's span: its chunks are fetched in PREFETCH_PIECE-byte GETs,
    not one GET per chunk, and the load is bitwise the same."""
    import zckpt.store._fsspec as fsspec_storage

    monkeypatch.setattr(fsspec_storage, "PREFETCH_PIECE", 256 << 10)
    g = torch.Generator().manual_seed(5)
    state = {"w": torch.randn(600_000, generator=g), "b": torch.randn(333_333, generator=g)}
    zckpt.save_checkpoint(
        s3.url, state, spec(2, 2), tag="t", storage=s3.storage, codec=codec, chunk_bytes=64 << 10
    )
    st = FsspecStorage(s3.storage.fs)
    get, chunk_gets = st._backend._get, []

    async def counting(key: str, offset: int, length: int) -> bytes:
        if offset > 0 and key.endswith(".zck"):  # not a blob's head (at 0)
            chunk_gets.append(length)
        data: bytes = await get(key, offset, length)
        return data

    st._backend._get = counting
    got = [zckpt.load_checkpoint(s3.url, world_size=3, rank=r, storage=st).state for r in range(3)]
    want = [
        zckpt.load_checkpoint(s3.url, world_size=3, rank=r, storage=s3.storage).state
        for r in range(3)
    ]
    for a, b in zip(got, want, strict=True):
        assert_states_equal(a, b)
    stored = sum(
        st.size(f"{s3.url}/t/{n}") for n in st.listdir(f"{s3.url}/t") if n.endswith(".zck")
    )
    chunks = -(-stored // (64 << 10))
    assert chunk_gets and len(chunk_gets) < chunks / 2  # one GET per chunk: >= chunks
    assert max(chunk_gets) > 64 << 10
    assert not st._spans  # every span was read to its end and let go


def test_a_failed_prefetch_falls_back_to_the_read_itself(
    proxied: tuple[Where, FaultProxy], monkeypatch: Any
) -> None:
    """A piece fetched ahead that fails permanently is no error: the chunk reads it would have
    served go to the store themselves."""
    import zckpt.store._fsspec as fsspec_storage

    monkeypatch.setattr(fsspec_storage, "PREFETCH_PIECE", 256 << 10)
    where, proxy = proxied
    state = {"w": torch.randn(400_000, generator=torch.Generator().manual_seed(6))}
    zckpt.save_checkpoint(where.url, state, spec(1, 2), tag="t", storage=where.storage,
                          chunk_bytes=64 << 10)  # fmt: skip
    gets = [0]

    def second_blob_get_fails(method: str, path: str) -> int | None:
        if method == "GET" and path.split("?")[0].endswith(".zck"):
            gets[0] += 1
            return 403 if gets[0] == 2 else None  # the first is the blob's head
        return None

    proxy.faults = [second_blob_get_fails]
    got = zckpt.load_checkpoint(where.url, storage=where.storage).state
    assert_states_equal(got, state)
    assert [s for s in proxy.seen if s[2] == 403] and gets[0] > 3


# -- integrity headers -------------------------------------------------------------------


def test_http_urls_send_no_crc32_unless_asked(s3_server: Any) -> None:
    """An s3:// URL on an http endpoint: botocore's CRC32 request checksum is off (the payload's
    SHA-256 is still signed, the ETags still checked); asked for in storage_options, it is sent."""
    proxy = FaultProxy(s3_server.endpoint).start()
    try:
        opts = {"endpoint_url": proxy.endpoint, "key": KEY, "secret": SECRET}
        state = state_of(3)
        for asked in (None, "when_supported"):
            extra = (
                {} if asked is None else {"config_kwargs": {"request_checksum_calculation": asked}}
            )
            url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
            proxy.headers.clear()
            zckpt.save_checkpoint(
                url, state, spec(2, 1), tag="t", storage_options={**opts, **extra}
            )
            puts = [h for m, p, h in proxy.headers if m == "PUT" and ".zck" in p]
            assert len(puts) >= 3  # two blobs and the manifest
            assert all(len(h["x-amz-content-sha256"]) == 64 for h in puts)  # signed payloads
            assert [("x-amz-checksum-crc32" in h) for h in puts] == [asked is not None] * len(puts)
            got = zckpt.load_checkpoint(url, storage_options={**opts, **extra}).state
            assert_states_equal(got, state)
    finally:
        proxy.stop()


def test_default_options_leave_https_and_the_users_choice_alone(monkeypatch: Any) -> None:
    from zckpt.store._s3 import default_options

    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    off = {"request_checksum_calculation": "when_required"}
    assert default_options({}) == {}  # AWS itself: https
    assert default_options({"client_kwargs": {"endpoint_url": "https://x"}})["client_kwargs"]
    assert "config_kwargs" not in default_options({"client_kwargs": {"endpoint_url": "https://x"}})
    got = default_options(
        {"client_kwargs": {"endpoint_url": "http://x"}, "config_kwargs": {"a": 1}}
    )
    assert got["config_kwargs"] == {"a": 1, **off}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "HTTP://minio:9000")
    assert default_options({})["config_kwargs"] == off
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    assert default_options({}) == {}


class SseKms:
    """What a bucket encrypting with SSE-KMS answers, played by the proxy in front of moto (which
    says ``aws:kms`` but answers MD5 ETags and echoes no checksums): every answer says
    ``aws:kms`` and carries ETags that are not MD5s (the same opaque one for an object
    wherever it is shown); an upload sent with a CRC32 is answered with the CRC32 of the bytes
    the server received (a part's too), and a completed upload with the composite of its
    parts'. ``corrupt``: the next body PUT to a path containing it has one bit flipped on the
    way, after the client computed its checksums."""

    def __init__(self) -> None:
        self.parts: dict[tuple[str, int], int] = {}
        self.real: dict[bytes, bytes] = {}  # opaque ETag -> moto's
        self.corrupt: str | None = None
        self.corrupted = 0

    def _opaque(self, text: bytes) -> bytes:
        def swap(m: Any) -> bytes:
            fake = hashlib.sha256(m.group()).hexdigest()[:32].encode()
            self.real[fake] = m.group()
            return fake

        return re.sub(rb"[0-9a-f]{32}", swap, text)

    def _moto(self, text: bytes) -> bytes:
        return re.sub(rb"[0-9a-f]{32}", lambda m: self.real.get(m.group(), m.group()), text)

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        for k in list(headers):
            if k.lower() in ("if-match", "if-none-match"):
                headers[k] = self._moto(headers[k].encode()).decode()
        if method == "POST" and "uploadId=" in path:  # the parts' ETags, as moto knows them
            body = self._moto(body)
        if method == "PUT" and self.corrupt is not None and self.corrupt in path and body:
            self.corrupt, self.corrupted = None, self.corrupted + 1
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0x10
            body = bytes(flipped)
        return body

    def response(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        answer: list[tuple[str, str]],
        data: bytes,
    ) -> tuple[list[tuple[str, str]], bytes]:
        from urllib.parse import parse_qs, urlsplit

        from zckpt.store._s3 import composite_crc32, crc32_b64

        out = [
            (k, self._opaque(v.encode()).decode() if k.lower() == "etag" else v)
            for k, v in answer
            if not k.lower().startswith("x-amz-checksum")
        ]
        out.append(("x-amz-server-side-encryption", "aws:kms"))
        q = parse_qs(urlsplit(path).query)
        if method == "PUT" and "x-amz-checksum-crc32" in headers:
            crc = zlib.crc32(body)
            if "partNumber" in q:
                self.parts[(q["uploadId"][0], int(q["partNumber"][0]))] = crc
            out.append(("x-amz-checksum-crc32", crc32_b64(crc)))
        if method == "POST" and "uploadId" in q and b"<ETag>" in data:  # completed
            upload = q["uploadId"][0]
            crcs = [c for (u, _), c in sorted(self.parts.items()) if u == upload]
            tag = f"<ChecksumCRC32>{composite_crc32(crcs)}</ChecksumCRC32>".encode()
            data = data.replace(b"</ETag>", b"</ETag>" + tag, 1)
        if b"<ETag>" in data:
            data = self._opaque(data)
        return out, data


@pytest.fixture
def sse_kms(s3_server: Any) -> Iterator[tuple[Where, FaultProxy, SseKms]]:
    kms = SseKms()
    proxy = FaultProxy(s3_server.endpoint, on_request=kms.request, on_response=kms.response)
    proxy.start()
    fs = _s3_fs(
        proxy.endpoint,
        config_kwargs={
            "retries": {"max_attempts": 1},
            "request_checksum_calculation": "when_required",
        },
    )
    st = FsspecStorage(fs, part_size=5 * MiB, multipart_threshold=10 * MiB, lease=5, retry_for=5)
    yield Where(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", st, None, True), proxy, kms
    proxy.stop()


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_sse_kms_buckets_are_checked_by_crc32(
    sse_kms: tuple[Where, FaultProxy, SseKms], codec: str
) -> None:
    """On a bucket whose ETags are not MD5s (SSE-KMS), saves succeed and load bitwise: the
    first answer that says ``aws:kms`` switches the storage to CRC32s the server checks on
    receipt, and every PUT, part and completed upload is checked by the CRC32 it echoes."""
    where, proxy, _ = sse_kms
    g = torch.Generator().manual_seed(8)
    big = {"master": {"w": torch.randn(4_000_000, generator=g)}, "step": 3}  # parts of 5 MiB
    small = state_of(5)
    for tag, state, sp in (("a", small, spec(2, 2)), ("b", big, spec(1, 2))):
        zckpt.save_checkpoint(where.url, state, sp, tag=tag, codec=codec, storage=where.storage)
        assert_states_equal(
            zckpt.load_checkpoint(where.url, tag=tag, storage=where.storage).state, state
        )
    assert where.storage._backend.checksums
    blobs = (".zck", "manifest.zckm", "latest")  # all but the lock whose answer showed SSE
    uploads = [h for m, p, h in proxy.headers if m == "PUT" and p.split("?")[0].endswith(blobs)]
    assert uploads and all("x-amz-checksum-crc32" in h for h in uploads)
    assert any("partNumber=" in p for m, p, _ in proxy.headers if m == "PUT")
    (report,) = zckpt.verify_checkpoint(where.url, tag="b", storage=where.storage)
    assert report.ok, report.problems
    fresh = zckpt.load_checkpoint(where.url, storage=FsspecStorage(where.storage.fs))
    assert_states_equal(fresh.state, big)


@pytest.mark.parametrize("target", ["rank00001", "partNumber=2"])
def test_sse_kms_a_body_corrupted_in_flight_is_refused(
    sse_kms: tuple[Where, FaultProxy, SseKms], target: str
) -> None:
    """A bit flipped on the way to an SSE-KMS bucket (one rank's single PUT, one part of a
    multipart upload): the server's CRC32 is not the one sent, so the save fails on every rank,
    nothing is committed, and the previous checkpoint and ``latest`` load as they were."""
    where, _, kms = sse_kms
    old = state_of(1)
    zckpt.save_checkpoint(where.url, old, spec(2, 1), tag="t", storage=where.storage)
    new = state_of(2, n=2_500_000 if "part" in target else 1000)  # a multipart rank 1 blob
    kms.corrupt = target
    with pytest.raises(zckpt.SaveError, match="CRC32") as e:
        zckpt.save_checkpoint(
            where.url, new, spec(2, 1), tag="t", overwrite=True, storage=where.storage
        )
    assert kms.corrupted == 1 and not e.value.committed
    got = zckpt.load_checkpoint(where.url, storage=where.storage)
    assert got.load_path == f"{where.url}/t"
    assert_states_equal(got.state, old)
    assert where.storage.unfinished_uploads(where.url) == []


def test_sse_requested_by_the_filesystem_sends_crc32s_from_the_first_put(
    sse_kms: tuple[Where, FaultProxy, SseKms],
) -> None:
    """``s3_additional_kwargs`` asking for SSE-KMS reach zckpt's own requests, and uploads carry
    a CRC32 from the first one (no PUT sent twice)."""
    where, proxy, _ = sse_kms
    fs = where.storage.fs
    kms_fs = _s3_fs(
        proxy.endpoint,
        config_kwargs={"request_checksum_calculation": "when_required"},
        s3_additional_kwargs={"ServerSideEncryption": "aws:kms"},
    )
    assert fs is not kms_fs
    st = FsspecStorage(kms_fs)
    assert st._backend.checksums
    proxy.headers.clear()
    state = state_of(6)
    zckpt.save_checkpoint(where.url, state, spec(2, 2), tag="t", storage=st)
    puts = [(p, h) for m, p, h in proxy.headers if m == "PUT"]
    assert all(h.get("x-amz-server-side-encryption") == "aws:kms" for _, h in puts)
    assert all("x-amz-checksum-crc32" in h for _, h in puts)
    # Each object PUT once (no PUT sent again for want of a CRC32); the first lock is created
    # twice, the second create refused: the storage's check that the store honours it.
    twice = [p for p in {p for p, _ in puts} if [q for q, _ in puts].count(p) > 1]
    assert len(puts) == len({p for p, _ in puts}) + 1 and twice == [puts[0][0]]
    assert [s[2] for s in proxy.seen if s[0] == "PUT" and s[1] == twice[0]] == [200, 412]
    assert_states_equal(zckpt.load_checkpoint(where.url, storage=st).state, state)


# -- failures ------------------------------------------------------------------------------


@pytest.fixture
def proxied(s3_server: Any) -> Iterator[tuple[Where, FaultProxy]]:
    proxy = FaultProxy(s3_server.endpoint).start()
    # botocore's own retries off: the storage's retries are the ones under test.
    fs = _s3_fs(proxy.endpoint, config_kwargs={"retries": {"max_attempts": 1}})
    st = FsspecStorage(fs, part_size=5 * MiB, multipart_threshold=10 * MiB, lease=5, retry_for=20)
    run = uuid.uuid4().hex[:12]
    yield Where(f"s3://{BUCKET}/{run}", st, None, True), proxy
    proxy.stop()


def _once(match: str, answer: int | str, times: int = 1) -> Any:
    left = [times]

    def fault(method: str, path: str) -> int | str | None:
        if match in path and method in ("PUT", "POST") and left[0] > 0:
            left[0] -= 1
            return answer
        return None

    return fault


@pytest.mark.parametrize("answer", [503, 500, "drop"])
def test_transient_errors_are_retried(proxied: tuple[Where, FaultProxy], answer: int | str) -> None:
    where, proxy = proxied
    proxy.faults = [_once("rank00001", answer, times=2), _once("manifest.zckm", answer)]
    state = state_of(9)
    zckpt.save_checkpoint(where.url, state, spec(2, 2), tag="t", storage=where.storage)
    assert [s for s in proxy.seen if s[2] == answer] and len(proxy.seen) > 3
    assert_states_equal(zckpt.load_checkpoint(where.url, storage=where.storage).state, state)


@pytest.mark.parametrize("big", [False, True])
def test_failed_upload_keeps_the_previous_checkpoint(
    proxied: tuple[Where, FaultProxy], big: bool
) -> None:
    """A permanent failure (403) of one rank's upload: SaveError naming the rank and the object,
    nothing committed, the previous checkpoint and latest intact, the save's objects removed and
    its multipart upload aborted."""
    where, proxy = proxied
    old = state_of(1)
    zckpt.save_checkpoint(where.url, old, spec(2, 1), tag="t", storage=where.storage)
    new = state_of(2, n=2_500_000 if big else 1000)  # big: rank 1's blob is a multipart upload
    proxy.faults = [lambda m, p: 403 if "rank00001" in p and m == "PUT" else None]
    with pytest.raises(zckpt.SaveError) as e:
        zckpt.save_checkpoint(
            where.url, new, spec(2, 1), tag="t", overwrite=True, storage=where.storage
        )
    assert not e.value.committed and list(e.value.errors) == [1]
    assert f"{where.url}/t/" in str(e.value) and "rank00001" in str(e.value)
    multipart = [s for s in proxy.seen if "rank00001" in s[1] and "partNumber=" in s[1]]
    assert bool(multipart) == big
    proxy.faults = []
    got = zckpt.load_checkpoint(where.url, storage=where.storage)
    assert got.load_path == f"{where.url}/t"
    assert_states_equal(got.state, old)
    gen = zckpt.open_checkpoint(where.url, storage=where.storage).manifest.generation
    assert all(
        n == "manifest.zckm" or n.startswith(gen) for n in where.storage.listdir(f"{where.url}/t")
    )
    assert where.storage.unfinished_uploads(where.url) == []
    assert not where.storage.exists(f"{where.url}/.t.zckpt-lock")


def test_failed_write_on_memory_keeps_the_previous_checkpoint(monkeypatch: Any) -> None:
    """memory://: an fs method that fails for one rank's blob."""
    fs = fsspec.filesystem("memory")
    st = FsspecStorage(fs)
    url = f"memory://zckpt-tests/{uuid.uuid4().hex}"
    zckpt.save_checkpoint(url, state_of(1), spec(2, 1), tag="t", storage=st)
    real = fs.open

    def failing_open(path: str, mode: str = "rb", **kw: Any) -> Any:
        if "rank00001" in path and "w" in mode:
            raise OSError(28, "No space left on device")
        return real(path, mode, **kw)

    monkeypatch.setattr(fs, "open", failing_open)
    with pytest.raises(zckpt.SaveError, match="rank 1") as e:
        zckpt.save_checkpoint(url, state_of(2), spec(2, 1), tag="t", overwrite=True, storage=st)
    assert "No space left" in str(e.value) and f"{url}/t/" in str(e.value)
    monkeypatch.setattr(fs, "open", real)
    assert_states_equal(zckpt.load_checkpoint(url, storage=st).state, state_of(1))
    assert len(st.listdir(f"{url}/t")) == 3


def test_permanent_errors_name_the_object(proxied: tuple[Where, FaultProxy]) -> None:
    where, proxy = proxied
    zckpt.save_checkpoint(where.url, state_of(1), spec(1, 1), tag="t", storage=where.storage)
    proxy.faults = [lambda m, p: 403 if m == "GET" and p.split("?")[0].endswith(".zck") else None]
    with pytest.raises(zckpt.ZckptError, match=r"s3://.*\.rank00000-of-00001\.zck"):
        zckpt.load_checkpoint(where.url, storage=where.storage)


# -- crash safety --------------------------------------------------------------------------


def _check_store(url: str, st: FsspecStorage) -> int:
    from s3_crash_child import big_state as expected

    latest = zckpt.load_checkpoint(url, storage=st)
    assert latest.load_path is not None, "latest must name a complete checkpoint"
    assert_states_equal(latest.state, expected(latest.state["version"]))
    newest = latest.state["version"]
    for c in zckpt.list_tags(url, storage=st):
        if f"{url}/{c.tag}" == latest.load_path:
            continue  # loaded and compared just above
        got = zckpt.load_checkpoint(url, tag=c.tag, storage=st)
        assert_states_equal(got.state, expected(got.state["version"]))
        newest = max(newest, got.state["version"])
    for name in st.listdir(url):
        torn = st.is_dir(f"{url}/{name}") and not st.exists(f"{url}/{name}/manifest.zckm")
        if not name.startswith(".") and torn:
            with pytest.raises(zckpt.CheckpointNotFoundError):
                zckpt.load_checkpoint(url, tag=name, storage=st)
    return int(newest)


def _crash_trials(s3_server: Any, trials: int, seed: int) -> None:
    from fork_server import fork_server
    from s3_crash_child import big_state, storage

    rng = random.Random(seed)
    url = f"s3://{BUCKET}/crash-{uuid.uuid4().hex[:12]}"
    st = storage(s3_server.endpoint)
    zckpt.save_checkpoint(url, big_state(1), zckpt.ZeroSpec(1, 2), tag="v1", storage=st)
    version = 1
    with fork_server("s3_crash_child") as server:  # a child per trial, forked: no 2 s start-up
        for _ in range(trials):
            server.start([s3_server.endpoint, url, str(version + 1)])
            line = server.readline()
            assert line == "ready", line
            time.sleep(rng.uniform(0.0, 2.0))
            assert os.WTERMSIG(server.kill()) == signal.SIGKILL
            version = max(version + 1, _check_store(url, st))
            zckpt.clean(url, storage=st)  # waits out a dead commit's lock: its lease is 2 s
            # A dead save's tag lock also stands until its lease ends; clean leaves that tag
            # alone until then (docs/layout.md), so its unfinished upload may need a second clean.
            deadline = time.monotonic() + 10
            while st.unfinished_uploads(url) and time.monotonic() < deadline:
                time.sleep(0.5)
                zckpt.clean(url, storage=st)
            assert st.unfinished_uploads(url) == []
            _check_store(url, st)


def test_sigkill_during_saves_to_s3_never_loses_a_checkpoint(s3_server: Any) -> None:
    _crash_trials(s3_server, trials=3, seed=0)


@pytest.mark.slow
def test_sigkill_s3_many_trials(s3_server: Any) -> None:
    _crash_trials(s3_server, trials=max(3, int(20 * SCALE)), seed=1)
