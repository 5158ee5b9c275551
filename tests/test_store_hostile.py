"""The store against hostile or unlucky directories: each test fails without its fix.

Crafted manifests are re-packed with a valid checksum, so every check below is the manifest
validator's or the loader's, not the body checksum's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import xxhash

import zckpt
import zckpt.cli
import zckpt.store._manifest as manifest_mod
from zckpt.store import _storage
from zckpt.store._layout import try_tag_lock
from zckpt.testing import assert_states_equal

PRE = struct.Struct("<8sIIQQ")


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "module": {
            "w": torch.randn(40, 8, generator=g).bfloat16(),
            "b": torch.randn(8, generator=g),
        },
        "master": {"w": torch.randn(40, 8, generator=g)},
        "global_steps": seed,
    }


def _save(d: Path, seed: int, tag: str, **kw: Any) -> zckpt.Saved:
    return zckpt.save_checkpoint(
        d, _state(seed), zckpt.ZeroSpec(2, 2), tag=tag, client_state={"seed": seed}, **kw
    )


def _manifest(d: Path) -> tuple[int, int, dict[str, Any]]:
    data = (d / "manifest.zckm").read_bytes()
    _, version, flags, _, _ = PRE.unpack_from(data)
    return version, flags, msgpack.unpackb(data[PRE.size :], raw=False, strict_map_key=False)


def _write_manifest(d: Path, body: Any, version: int = 1, flags: int = 0) -> None:
    raw = msgpack.packb(body, use_bin_type=True)
    head = PRE.pack(b"\x89ZCKMAN\n", version, flags, len(raw), xxhash.xxh3_64_intdigest(raw))
    (d / "manifest.zckm").write_bytes(head + raw)


def _loads(d: Path | str) -> None:
    zckpt.load_checkpoint(d)


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def fmt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The format the saves of a test write: 2 forces the version 2 manifest and blobs (what
    zckpt writes from world size x tensors >= 65536)."""
    if request.param == 2:
        monkeypatch.setattr(manifest_mod, "V2_MIN_FRAGMENTS", 0)
    version: int = request.param
    return version


def _blob_version(path: Path) -> int:
    return int(PRE.unpack_from(path.read_bytes()[: PRE.size])[1])


# ------------------------------------------------------------------------------ binding


def test_blob_from_another_checkpoint_with_the_same_layout_is_detected(
    tmp_path: Path, fmt: int
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _save(a, 1, "t")
    _save(b, 2, "t")
    ma, mb = zckpt.open_checkpoint(a).manifest, zckpt.open_checkpoint(b).manifest
    assert _blob_version(a / "t" / ma.files[1].name) == fmt
    # Rank 1's file of b, renamed to a's name for it: valid chunk checksums, other tensors.
    shutil.copy(b / "t" / mb.files[1].name, a / "t" / ma.files[1].name)
    for load in (
        lambda: zckpt.load_checkpoint(a),
        lambda: zckpt.load_checkpoint(a, world_size=3, rank=2),
        lambda: zckpt.get_fp32_state_dict_from_zero_checkpoint(a),
        lambda: [
            v.contiguous()
            for v in zckpt.get_fp32_state_dict_from_zero_checkpoint(a, lazy_mode=True).values()
        ],
    ):
        with pytest.raises(zckpt.FormatError, match="not the file this manifest committed"):
            load()
    assert not all(r.ok for r in zckpt.verify_checkpoint(a))


def test_client_state_swapped_between_tags_is_detected(tmp_path: Path, fmt: int) -> None:
    _save(tmp_path, 1, "one")
    _save(tmp_path, 2, "two")
    c1 = zckpt.open_checkpoint(tmp_path, "one").manifest.client
    c2 = zckpt.open_checkpoint(tmp_path, "two").manifest.client
    assert c1 is not None and c2 is not None and c1.size == c2.size
    shutil.copy(tmp_path / "two" / c2.name, tmp_path / "one" / c1.name)
    with pytest.raises(zckpt.FormatError, match="one/"):
        zckpt.load_checkpoint(tmp_path, tag="one")
    assert [r.ok for r in zckpt.verify_checkpoint(tmp_path)] == [False, True]


# ------------------------------------------------------------------------------ crafted manifests


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "a\x00b.zck",
        "manifest.zckm",
        "{gen}.rank00000-of-00002.zck/../x",
    ],
)
def test_manifest_file_names_outside_what_zckpt_writes_are_refused(
    tmp_path: Path, name: str
) -> None:
    _save(tmp_path, 1, "t")
    _, _, body = _manifest(tmp_path / "t")
    body["files"][0]["name"] = name.format(gen=body["generation"])
    _write_manifest(tmp_path / "t", body)
    with pytest.raises(zckpt.FormatError, match="not a zckpt blob name"):
        _loads(tmp_path)
    assert not zckpt.verify_checkpoint(tmp_path)[0].ok


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("files", 0, "size"), float("inf"), "size"),
        (("files", 0, "size"), 0, "too small"),
        (("files", 0, "size"), -5, "size"),
        (("files", 0, "rank"), 7, "outside world size"),
        (("files", 0, "rank"), True, "rank"),
        (("files", 0, "fragments", 0, 0), 99, "tensor leaf 99"),
        (("files", 0, "fragments", 0, 1), 10**6, "outside its"),
        (("generation",), "../x", "16 hex digits"),
        (("committed_at",), float("nan"), "not a time"),
        (("spec",), {"world_size": 0}, "spec"),
        (("frozen",), [1], "frozen"),
        (("excluded_frozen",), "yes", "excluded_frozen"),
    ],
)
def test_crafted_manifest_fields_are_format_errors(
    tmp_path: Path, path: tuple[Any, ...], value: Any, match: str
) -> None:
    _save(tmp_path, 1, "t")
    _, _, body = _manifest(tmp_path / "t")
    node = body
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    _write_manifest(tmp_path / "t", body)
    with pytest.raises(zckpt.FormatError, match=match):
        _loads(tmp_path)
    assert not zckpt.verify_checkpoint(tmp_path)[0].ok


def test_deep_nesting_in_a_manifest_is_a_format_error(tmp_path: Path) -> None:
    _save(tmp_path, 1, "t")
    _, _, body = _manifest(tmp_path / "t")
    deep: Any = "x"
    for _ in range(1000):
        deep = [deep]
    for key in ("tag", "frozen"):
        crafted = dict(body, **{key: deep})
        _write_manifest(tmp_path / "t", crafted)
        with pytest.raises(zckpt.FormatError):
            _loads(tmp_path)


@pytest.mark.parametrize(("version", "flags"), [(0, 0), (1, 1)])
def test_manifest_version_zero_and_unknown_flags_are_refused(
    tmp_path: Path, version: int, flags: int
) -> None:
    _save(tmp_path, 1, "t")
    _, _, body = _manifest(tmp_path / "t")
    _write_manifest(tmp_path / "t", body, version, flags)
    with pytest.raises(zckpt.FormatError):
        _loads(tmp_path)


def test_v2_skeleton_changed_in_the_manifest_is_refused_by_the_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version 2 manifest rewritten (valid checksum) with another dtype, shape or value:
    each blob's skeleton digest no longer matches, and the file, rank and digest are named."""
    monkeypatch.setattr(manifest_mod, "V2_MIN_FRAGMENTS", 0)
    _save(tmp_path, 1, "t")
    version, _, body = _manifest(tmp_path / "t")
    assert version == 2
    for edit in ("dtype", "shape", "value"):
        _, _, body = _manifest(tmp_path / "t")
        skel = body["skeleton"]
        if edit == "dtype":  # bf16 -> fp16: same size, so every byte count still agrees
            codes = bytearray(skel["dtypes"])
            codes[0] = 1 if codes[0] == 2 else 2
            skel["dtypes"] = bytes(codes)
        elif edit == "shape":  # (40, 8) -> (8, 40)
            dims = bytearray(skel["dims"])
            dims[:16] = dims[8:16] + dims[:8]
            skel["dims"] = bytes(dims)
        else:
            skel["values"] = [v + 1 if type(v) is int else v for v in skel["values"]]
        _write_manifest(tmp_path / "t", body, version=2)
        with pytest.raises(zckpt.FormatError, match=r"rank00000-of-00002\.zck: rank 0: the blob's"):
            _loads(tmp_path)
        report = zckpt.verify_checkpoint(tmp_path)[0]
        assert not report.ok and any("skeleton digest" in p for p in report.problems), edit


def test_skeleton_dtype_changed_under_a_fragment_is_refused(tmp_path: Path) -> None:
    _save(tmp_path, 1, "t")
    _, _, body = _manifest(tmp_path / "t")
    code, shape = body["skeleton"]["tensors"][0]
    # Same element count, another dtype of another size: the files no longer match.
    body["skeleton"]["tensors"][0] = [0 if code != 0 else 3, shape]
    _write_manifest(tmp_path / "t", body)
    with pytest.raises(zckpt.FormatError):
        _loads(tmp_path)


def test_overlapping_or_missing_fragments_are_refused(tmp_path: Path) -> None:
    _save(tmp_path, 1, "t")
    _, _, body = _manifest(tmp_path / "t")
    body["files"][1]["fragments"] = body["files"][0]["fragments"]
    _write_manifest(tmp_path / "t", body)
    with pytest.raises(zckpt.FormatError, match=r"overlap|gap"):
        _loads(tmp_path)


# ------------------------------------------------------------------------------ file types


@pytest.mark.parametrize("which", ["latest", "manifest", "blob", "client"])
def test_fifos_never_block(tmp_path: Path, which: str, fmt: int) -> None:
    _save(tmp_path, 1, "t", keep_last=3)
    m = zckpt.open_checkpoint(tmp_path).manifest
    assert m.client is not None
    target = {
        "latest": tmp_path / "latest",
        "manifest": tmp_path / "t" / "manifest.zckm",
        "blob": tmp_path / "t" / m.files[0].name,
        "client": tmp_path / "t" / m.client.name,
    }[which]
    target.unlink()
    os.mkfifo(target)
    done: list[BaseException | None] = []

    def calls() -> None:
        try:
            for call in (
                lambda: zckpt.load_checkpoint(tmp_path, tag="t" if which == "latest" else None),
                lambda: zckpt.load_checkpoint(tmp_path),
                lambda: zckpt.list_tags(tmp_path),
                lambda: zckpt.verify_checkpoint(tmp_path),
                lambda: zckpt.cli.main(["inspect", str(tmp_path)]),
            ):
                with contextlib.suppress(zckpt.ZckptError):
                    call()
            done.append(None)
        except BaseException as e:
            done.append(e)

    t = threading.Thread(target=calls, daemon=True)
    t.start()
    t.join(60)
    assert done, f"a call blocked on the FIFO at {target}"
    assert done[0] is None, repr(done[0])
    assert not all(r.ok for r in zckpt.verify_checkpoint(tmp_path)) or which == "latest"


def test_a_stray_fifo_manifest_does_not_hang_retention(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    os.mkfifo(tmp_path / "junk" / "manifest.zckm")
    done: list[bool] = []
    t = threading.Thread(
        target=lambda: done.append(bool(_save(tmp_path, 1, "t", keep_last=1))), daemon=True
    )
    t.start()
    t.join(60)
    assert done == [True]


def test_blob_replaced_by_a_directory_or_a_symlink_is_a_zckpt_error(
    tmp_path: Path, fmt: int
) -> None:
    _save(tmp_path, 1, "t")
    m = zckpt.open_checkpoint(tmp_path).manifest
    blob = tmp_path / "t" / m.files[0].name
    outside = tmp_path / "outside.zck"
    shutil.move(blob, outside)
    blob.mkdir()
    with pytest.raises(zckpt.StorageError, match="is a directory"):
        _loads(tmp_path)
    blob.rmdir()
    blob.symlink_to(outside)  # the very bytes, but through a link: refused
    with pytest.raises(zckpt.StorageError, match="symbolic link"):
        _loads(tmp_path)
    assert not zckpt.verify_checkpoint(tmp_path)[0].ok


# ------------------------------------------------------------------------------ deletion


def test_retention_never_follows_a_symlinked_tag(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _save(elsewhere, 1, "precious")
    run = tmp_path / "run"
    _save(run, 1, "a")
    os.symlink(elsewhere / "precious", run / "old")
    for i in range(3):
        _save(run, i, f"b{i}", keep_last=1)
    zckpt.cli.main(["prune", str(run), "--keep-last", "1"])
    zckpt.clean(str(run))
    assert (elsewhere / "precious" / "manifest.zckm").exists()
    assert_states_equal(zckpt.load_checkpoint(elsewhere).state, _state(1))
    assert [c.tag for c in zckpt.list_tags(run)] == ["b2"]


def test_retention_deletes_only_files_zckpt_wrote(tmp_path: Path) -> None:
    _save(tmp_path, 1, "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    _save(tmp_path, 2, "b", keep_last=1)
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "a" / "manifest.zckm").exists()
    assert [c.tag for c in zckpt.list_tags(tmp_path)] == ["b"]


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kw",
    [
        {"keep_last": 0},
        {"codec": "zstdd"},
        {"level": 99},
        {"chunk_bytes": 0},
        {"save_latest": 1},
        {"tag_validation": "x"},
    ],
)
def test_arguments_are_checked_before_the_disk(tmp_path: Path, kw: dict[str, Any]) -> None:
    with pytest.raises(zckpt.ZckptError):
        zckpt.save_checkpoint(tmp_path / "d", _state(1), zckpt.ZeroSpec(2, 2), tag="t", **kw)
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------ two writers


def test_a_second_writer_of_the_same_tag_gets_a_clear_error(tmp_path: Path) -> None:
    _save(tmp_path, 1, "t")
    held = try_tag_lock(zckpt.LocalStorage(), str(tmp_path), "t")  # a save of "t" in flight
    assert held is not None
    try:
        with pytest.raises(
            zckpt.store.SaveError, match="another save of this tag is running"
        ) as info:
            _save(tmp_path, 2, "t", overwrite=True)
        assert f"pid {os.getpid()}" in str(info.value)
    finally:
        held.release()
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, _state(1))
    _save(tmp_path, 3, "t", overwrite=True)  # the lock is gone with its holder
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, _state(3))


def test_clean_and_retention_leave_a_save_in_flight_alone(tmp_path: Path) -> None:
    """A save paused after its first blob (before its commit step takes the save_dir's commit
    lock): ``clean`` runs to the end at once, removing a torn tag but not the save's files, and
    another job's save with retention commits beside it; the paused save then commits."""
    _save(tmp_path, 1, "old")
    gate, release = threading.Event(), threading.Event()
    written: list[str] = []

    class Paused(zckpt.LocalStorage):
        def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
            if os.path.basename(os.path.dirname(path)) == "new" and len(written) == 1:
                gate.set()
                release.wait(30)
            written.append(os.path.basename(path))
            return super().write_atomic(path, buffers)

    result: list[Any] = []
    t = threading.Thread(
        target=lambda: result.append(_save(tmp_path, 2, "new", storage=Paused())), daemon=True
    )
    t.start()
    try:
        assert gate.wait(30)
        # One blob of the save is durable, its other files and its manifest are not written yet:
        # an uncommitted tag to clean, held by the save's tag lock.
        first = tmp_path / "new" / written[0]
        assert first.is_file() and not (tmp_path / "new" / "manifest.zckm").exists()
        (tmp_path / "torn").mkdir()  # a dead save's tag: clean must still remove it
        assert zckpt.clean(str(tmp_path)) == ["torn"]
        _save(tmp_path, 3, "other", keep_last=1)  # retention: "old" goes, not the save in flight
        assert sorted(c.tag for c in zckpt.list_tags(str(tmp_path))) == ["other"]
        assert first.is_file()
        assert not result  # still paused: everything above ran beside it
    finally:
        release.set()
        t.join(30)
    assert result and result[0].tag == "new"
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, _state(2))
    assert_states_equal(zckpt.load_checkpoint(tmp_path, tag="other").state, _state(3))


# ------------------------------------------------------------------------------ full disk


def test_latest_failing_after_the_commit_says_the_tag_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path, 1, "a")
    real = _storage.LocalStorage.write_atomic

    def full(self: Any, path: str, buffers: Any) -> tuple[int, int]:
        if os.path.basename(path) == "latest":
            raise zckpt.StorageError(errno.ENOSPC, f"writing {path}: No space left on device")
        return real(self, path, buffers)

    monkeypatch.setattr(_storage.LocalStorage, "write_atomic", full)
    with pytest.raises(
        zckpt.SaveError, match=r"committed and loads by name.*still names 'a'"
    ) as info:
        _save(tmp_path, 2, "b")
    monkeypatch.undo()
    assert info.value.committed
    assert (tmp_path / "latest").read_text() == "a"
    assert_states_equal(zckpt.load_checkpoint(tmp_path, tag="b").state, _state(2))


def test_latest_is_re_resolved_when_retention_removed_its_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path, 1, "a")
    real = zckpt.store._read.read_manifest
    calls = []

    def racing(storage: Any, tag_dir: str) -> Any:
        if not calls:  # between resolving latest and reading its manifest, a job moves on
            calls.append(tag_dir)
            _save(tmp_path, 2, "b", keep_last=1)
        return real(storage, tag_dir)

    monkeypatch.setattr(zckpt.store._read, "read_manifest", racing)
    got = zckpt.load_checkpoint(tmp_path)
    assert got.load_path == str(tmp_path / "b")
    assert_states_equal(got.state, _state(2))


@pytest.mark.parametrize("ws", [1, 99_999, 100_000, 2_000_000])
def test_blob_names_and_their_patterns_agree_at_every_world_size(ws: int) -> None:
    from zckpt.store._layout import blob_name, expert_name, generation_of

    gen = "0123456789abcdef"
    for rank in {0, ws // 2, ws - 1}:
        assert generation_of(blob_name(gen, rank, ws)) == gen
    assert generation_of(expert_name(gen, ws)) == gen


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize(
    "pointer",
    [b"../other", b"/etc", b"", b"  \n", b".hidden", b"a\x01b", b"x" * 300, b"\xff\xfe", b"latest"],
)
def test_a_hostile_latest_pointer_is_an_error_naming_the_file(
    tmp_path: Path, where: str, pointer: bytes
) -> None:
    """``latest`` naming no safe tag was a TagError about "tag '../other'" with no file in it:
    the user could not tell it came from the pointer, not from an argument they passed."""
    root = (
        str(tmp_path / "ckpt")
        if where == "local"
        else f"memory://hostile-{os.getpid()}-{id(pointer)}/ckpt"
    )
    zckpt.save_checkpoint(root, _state(0), zckpt.ZeroSpec(1, 2), tag="step1")
    storage, base = zckpt.store.storage_for(root)
    storage.write_atomic(f"{base}/latest", [pointer])
    latest = f"{root}/latest"
    readers = {
        "load_checkpoint": lambda: zckpt.load_checkpoint(root, world_size=1, rank=0),
        "fp32": lambda: zckpt.get_fp32_state_dict_from_zero_checkpoint(root),
    }
    for what, read in readers.items():
        with pytest.raises(zckpt.ZckptError) as e:
            read()
        assert latest in str(e.value), (what, str(e.value))
    assert str(zckpt.load_checkpoint(root, tag="step1", world_size=1).load_path).endswith("step1")
