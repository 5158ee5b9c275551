"""A save's requests to the object store beside its blobs' own, counted against the real
moto server on loopback, and what the save protocol still promises with fewer of them: a
committed tag is refused without ``overwrite``, an overwrite removes the old generation, a
killed save's leftovers are removed by the next commit of the tag, and a failed save removes
the tag directory it created (and only that)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import torch

import zckpt
from zckpt.testing import assert_states_equal

s3fs = pytest.importorskip("s3fs", reason="needs s3fs: pip install 'zckpt[test-s3]'")
fsspec = pytest.importorskip("fsspec", reason="needs fsspec: pip install 'zckpt[s3]'")

from s3_support import BUCKET, KEY, SECRET, record_requests  # noqa: E402

from zckpt.store import FsspecStorage  # noqa: E402


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3000, generator=g), "b": torch.randn(17, generator=g)}


def _spec() -> zckpt.ZeroSpec:
    return zckpt.ZeroSpec(2, 2)


@pytest.fixture
def s3(s3_server: Any) -> tuple[str, FsspecStorage]:
    fs = s3fs.S3FileSystem(
        endpoint_url=s3_server.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True
    )
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", FsspecStorage(fs, lease=30)


@pytest.fixture(params=["s3", "memory"])
def store(request: pytest.FixtureRequest) -> tuple[str, FsspecStorage]:
    if request.param == "memory":
        url = f"memory://zckpt-save-requests/{uuid.uuid4().hex[:12]}"
        return url, FsspecStorage(fsspec.filesystem("memory"), lease=30)
    got: tuple[str, FsspecStorage] = request.getfixturevalue("s3")
    return got


def _beside_blobs(calls: list[tuple[str, str]], run: str) -> list[tuple[str, str]]:
    """The requests that are not a blob's own, keys relative to the save_dir."""
    prefix = f"{run}/"
    return [(m, k.removeprefix(prefix)) for m, k in calls if not k.endswith(".zck")]


def _lock_release(tag: str) -> list[tuple[str, str]]:
    return [
        ("get_object", ".zckpt.lock"),
        ("delete_object", ".zckpt.lock"),
        ("get_object", f".{tag}.zckpt-lock"),
        ("delete_object", f".{tag}.zckpt-lock"),
    ]


def test_a_new_tags_save_lists_the_tag_once_and_asks_nothing_else_about_it(
    s3: tuple[str, FsspecStorage],
) -> None:
    """Before its blobs, a save of a new tag takes the tag lock and lists the tag (one LIST:
    not committed, nothing older in it); no GET of a manifest the listing does not show, no
    HEAD or LIST asking whether the tag's directory exists, and after the commit no listing
    of older generations (was: GET, HEAD, LIST before the blobs and a LIST after the
    manifest, 4 requests where there is now 1). The check that the save still holds its tag
    lock (a GET) runs while the save_dir's lock is taken (a PUT). No HEAD follows a PUT (of
    a blob, the manifest, ``latest``) whose answer's ETag is the MD5 of the bytes sent: it is
    the MD5 of what the store received, so it confirms every byte and their count (was: a
    HEAD after each, the size check; 3 round trips in series on the save's path)."""
    url, st = s3
    run = url.removeprefix(f"s3://{BUCKET}/")
    zckpt.save_checkpoint(url, _state(0), _spec(), tag="a", storage=st)  # the first lock's probe
    calls = record_requests(st)
    zckpt.save_checkpoint(url, _state(1), _spec(), tag="b", storage=st)
    seen = _beside_blobs(calls, run)
    assert seen[:2] == [("put_object", ".b.zckpt-lock"), ("list_objects_v2", "b/")], calls
    # the tag lock's check goes while the save_dir's lock is taken, side by side
    assert sorted(seen[2:4]) == [("get_object", ".b.zckpt-lock"), ("put_object", ".zckpt.lock")]
    assert seen[4:-4] == [("put_object", "b/manifest.zckm"), ("put_object", "latest")], calls
    assert sorted(seen[-4:]) == sorted(_lock_release("b"))  # the two locks go side by side
    blobs = [(m, k.rsplit(".", 2)[-2]) for m, k in calls if k.endswith(".zck")]
    ranks = ("rank00000-of-00002", "rank00001-of-00002")
    assert blobs == [("put_object", r) for r in ranks]
    assert_states_equal(zckpt.load_checkpoint(url, storage=st).state, _state(1))


def test_an_overwrite_reads_the_manifest_it_lists_and_removes_the_old_generation(
    s3: tuple[str, FsspecStorage],
) -> None:
    """An overwrite's listing shows the manifest, which is read to tell a committed tag; the
    old generation's blobs it listed are deleted after the commit, without listing again."""
    url, st = s3
    run = url.removeprefix(f"s3://{BUCKET}/")
    zckpt.save_checkpoint(url, _state(1), _spec(), tag="t", storage=st)
    old = [n for n in st.listdir(f"{url}/t") if n.endswith(".zck")]
    calls = record_requests(st)
    with pytest.raises(zckpt.ZckptError, match="already holds a committed checkpoint"):
        zckpt.save_checkpoint(url, _state(2), _spec(), tag="t", storage=st)
    assert _beside_blobs(calls, run)[:3] == [
        ("put_object", ".t.zckpt-lock"),
        ("list_objects_v2", "t/"),
        ("get_object", "t/manifest.zckm"),
    ]
    calls.clear()
    zckpt.save_checkpoint(url, _state(2), _spec(), tag="t", overwrite=True, storage=st)
    seen = _beside_blobs(calls, run)
    assert seen[:3] == [
        ("put_object", ".t.zckpt-lock"),
        ("list_objects_v2", "t/"),
        ("get_object", "t/manifest.zckm"),
    ]
    assert [k for m, k in seen if m == "list_objects_v2"] == ["t/"]
    deletes = [i for i, (m, k) in enumerate(calls) if m == "delete_object" and k.endswith(".zck")]
    assert sorted(calls[i][1].rsplit("/", 1)[-1] for i in deletes) == sorted(old)
    assert min(deletes) > calls.index(("put_object", f"{run}/t/manifest.zckm"))  # after the commit
    gen = zckpt.open_checkpoint(url, storage=st).manifest.generation
    assert all(n == "manifest.zckm" or n.startswith(gen) for n in st.listdir(f"{url}/t"))
    assert_states_equal(zckpt.load_checkpoint(url, storage=st).state, _state(2))


def test_a_killed_saves_leftovers_go_with_the_next_commit_and_nothing_written_later(
    store: tuple[str, FsspecStorage],
) -> None:
    """Blobs of an older generation in the tag before the save (a killed save's) are removed
    once it commits; a blob of another generation that appears while it runs (another job's,
    on a store whose locks are only advisory) is left alone: the save removes only what it
    listed under its lock, before it wrote anything."""
    url, st = store
    leftover = "00000000000000aa.rank00000-of-00002.zck"
    st.write_atomic(f"{url}/t/{leftover}", [b"a killed save's bytes"])
    later = "00000000000000bb.rank00001-of-00002.zck"
    real = st.write_atomic

    def writing(path: str, buffers: Any) -> tuple[int, int]:
        if path.endswith("rank00001-of-00002.zck") and not path.endswith(later):
            real(f"{url}/t/{later}", [b"another job's bytes"])
        return real(path, buffers)

    st.write_atomic = writing  # type: ignore[method-assign]
    zckpt.save_checkpoint(url, _state(3), _spec(), tag="t", storage=st)
    names = st.listdir(f"{url}/t")
    assert leftover not in names and later in names
    assert_states_equal(zckpt.load_checkpoint(url, storage=st).state, _state(3))


class _FailingBlobs(FsspecStorage):
    def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
        if path.endswith(".zck"):
            raise OSError(28, "No space left on device")
        return super().write_atomic(path, buffers)


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_save_removes_the_tag_directory_it_created_only(existed: bool) -> None:
    """memory:// has directories of its own: a failed save of a new tag removes the directory
    it made; one that was there before (empty) stays."""
    fs = fsspec.filesystem("memory")
    url = f"memory://zckpt-save-requests/{uuid.uuid4().hex[:12]}"
    st = _FailingBlobs(fs)
    assert not st.dirs_are_prefixes
    if existed:
        fs.makedirs(f"{url}/t", exist_ok=True)
    with pytest.raises(zckpt.SaveError, match="No space left"):
        zckpt.save_checkpoint(url, _state(4), _spec(), tag="t", storage=st)
    assert fs.isdir(f"{url}/t") == existed
    assert st.listdir(f"{url}/t") == []


def test_a_failed_save_on_s3_leaves_no_object_under_the_tag(
    s3: tuple[str, FsspecStorage],
) -> None:
    """On S3 a directory is a name prefix: nothing to make or remove, and the failed save's
    tag holds no object afterwards."""
    url, st = s3
    failing = _FailingBlobs(st.fs)
    assert failing.dirs_are_prefixes
    with pytest.raises(zckpt.SaveError, match="No space left"):
        zckpt.save_checkpoint(url, _state(5), _spec(), tag="t", storage=failing)
    assert not st.exists(f"{url}/t") and st.listdir(url) == []


def test_the_tag_lock_goes_while_the_save_dirs_lock_goes(s3: tuple[str, FsspecStorage]) -> None:
    """Both locks are released at once at the end of a save (each a GET and a DELETE): the
    save_dir's lock is not let go until the tag lock's release has begun."""
    url, st = s3
    began = threading.Event()
    overlapped: list[bool] = []
    real = st._drop_lock

    def dropping(lock: Any) -> None:
        if lock.path.endswith(".t.zckpt-lock"):
            began.set()
        elif lock.path.endswith("/.zckpt.lock"):
            overlapped.append(began.wait(timeout=10))
        real(lock)

    st._drop_lock = dropping  # type: ignore[method-assign]
    zckpt.save_checkpoint(url, _state(6), _spec(), tag="t", storage=st)
    assert overlapped == [True]
    assert not st.exists(f"{url}/.t.zckpt-lock") and not st.exists(f"{url}/.zckpt.lock")


def test_retention_deletes_a_tags_manifest_before_its_blobs(s3: tuple[str, FsspecStorage]) -> None:
    """keep_last on S3: the deleted tag is uncommitted (its manifest deleted) before any of its
    blobs goes, so a load never finds a manifest whose blobs are gone."""
    url, st = s3
    run = url.removeprefix(f"s3://{BUCKET}/")
    zckpt.save_checkpoint(url, _state(7), _spec(), tag="a", storage=st)
    calls = record_requests(st)
    zckpt.save_checkpoint(url, _state(8), _spec(), tag="b", keep_last=1, storage=st)
    deletes = [k.removeprefix(f"{run}/") for m, k in calls if m == "delete_object"]
    gone = [k for k in deletes if k.startswith("a/")]
    assert gone[0] == "a/manifest.zckm" and len(gone) == 3, deletes
    assert [c.tag for c in zckpt.list_tags(url, storage=st)] == ["b"]


def test_a_put_answered_without_an_etag_is_confirmed_by_a_head(
    s3: tuple[str, FsspecStorage],
) -> None:
    """Where the answer confirms nothing (no ETag), the store is asked: a HEAD of that object
    checks its size (and the save goes on when it is right)."""
    url, st = s3
    backend = st._backend
    real = backend._call

    async def no_etag(what: str, method: str, **kw: Any) -> Any:
        r = await real(what, method, **kw)
        if method == "put_object" and str(kw.get("Key", "")).endswith("rank00001-of-00002.zck"):
            r = {k: v for k, v in r.items() if k != "ETag"}
        return r

    backend._call = no_etag
    calls = record_requests(st)
    zckpt.save_checkpoint(url, _state(9), _spec(), tag="t", storage=st)
    heads = [k.rsplit("/", 1)[-1] for m, k in calls if m == "head_object"]
    assert len(heads) == 1 and heads[0].endswith("rank00001-of-00002.zck"), calls
    assert_states_equal(zckpt.load_checkpoint(url, storage=st).state, _state(9))


@pytest.mark.parametrize("fresh", [True, False])
def test_a_tag_lock_removed_before_the_commit_fails_the_save(
    s3: tuple[str, FsspecStorage], monkeypatch: pytest.MonkeyPatch, fresh: bool
) -> None:
    """The tag lock deleted by another process once the blobs are up: the check beside the
    save_dir lock's PUT (or, when that lock took longer than the check may be old, the check
    asked again after it) sees it, and nothing is committed; the tag holds what it held."""
    import zckpt.store._commit as commit

    url, st = s3
    zckpt.save_checkpoint(url, _state(10), _spec(), tag="t", storage=st)
    # Pinned either way: with the real 1 s a loaded machine (CI on 2 cores, pytest -n 2) can
    # take longer than that over the save_dir lock's PUT and ask again, a third GET.
    monkeypatch.setattr(commit, "_CHECK_FRESH", 1e9 if fresh else -1.0)
    real = st.write_atomic
    other = FsspecStorage(st.fs, lease=30)

    def writing(path: str, buffers: Any) -> tuple[int, int]:
        got = real(path, buffers)
        if path.endswith("rank00001-of-00002.zck"):
            other.remove(f"{url}/.t.zckpt-lock")
        return got

    st.write_atomic = writing  # type: ignore[method-assign]
    calls = record_requests(st)
    with pytest.raises(zckpt.SaveError, match="lock on the tag was removed while it ran") as e:
        zckpt.save_checkpoint(url, _state(11), _spec(), tag="t", overwrite=True, storage=st)
    assert not e.value.committed
    checks = [k for m, k in calls if m == "get_object" and k.endswith("/.t.zckpt-lock")]
    assert len(checks) == (2 if fresh else 3), calls  # the check(s), and the release's read
    st.write_atomic = real  # type: ignore[method-assign]
    assert_states_equal(zckpt.load_checkpoint(url, storage=st).state, _state(10))
