"""Checkpoint directories: save at N, load at M, flags, tags, retention, failures."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

import zckpt
from zckpt.assemble import index_sources
from zckpt.format import decode_header, iter_problems
from zckpt.format._codecs import RAW
from zckpt.store import _storage, _write
from zckpt.testing import assert_states_equal, tensors_bitwise_equal


def model_state(seed: int = 0, frozen: bool = True) -> dict[str, Any]:
    """A training state shaped like DeepSpeed's: odd sizes, two param groups, a tied weight."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (11, 5), "fc.weight": (7, 5), "fc.bias": (7,), "norm.weight": (7,)}
    master = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    module: dict[str, Any] = {n: t.bfloat16() for n, t in master.items()}
    module["head.weight"] = module["embed.weight"]  # tied
    if frozen:
        module["frozen.weight"] = torch.randn(3, 5, generator=g).bfloat16()
    module["num_batches"] = torch.tensor(3)
    opt = {
        n: {"exp_avg": torch.randn(s, generator=g), "exp_avg_sq": torch.rand(s, generator=g),
            "step": torch.tensor(3.0)}
        for n, s in shapes.items()
    }  # fmt: skip
    return {
        "module": module,
        "master": master,
        "optimizer": {"state": opt, "param_groups": [{"lr": 0.005, "betas": (0.9, 0.999)}]},
        "lr_scheduler": {"last_batch_iteration": 2},
        "global_steps": 3,
    }


GROUPS = (("embed.weight", "fc.weight"), ("fc.bias", "norm.weight"))


def spec(ws: int, stage: int) -> zckpt.ZeroSpec:
    return zckpt.ZeroSpec(ws, stage, param_groups=GROUPS)


def expected_holdings(state: Any, target: zckpt.ZeroSpec, rank: int) -> list[torch.Tensor]:
    """What ``rank`` must hold under ``target``, leaf by leaf, cut from the full state."""
    plan = zckpt.plan_shards(state, target)
    _, full = zckpt.tree.flatten(state)
    held = {f.leaf: f for f in plan.holds(rank)}
    out = []
    for leaf, t in enumerate(full):
        f = held.get(leaf)
        if t.numel() == 0:
            out.append(t)
        elif f is None:
            out.append(torch.empty(0, dtype=t.dtype))
        elif f.numel == t.numel():
            out.append(t)
        else:
            out.append(t.reshape(-1)[f.start : f.stop])
    return out


@pytest.mark.parametrize("save_ws", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("save_stage", [1, 2, 3])
def test_save_at_n_load_at_m_is_bitwise(tmp_path: Path, save_ws: int, save_stage: int) -> None:
    state = model_state()
    zckpt.save_checkpoint(tmp_path, state, spec(save_ws, save_stage), tag="t")
    got = zckpt.load_checkpoint(tmp_path)
    assert got.load_path == str(tmp_path / "t")
    assert_states_equal(got.state, state)
    assert got.state["module"]["head.weight"] is got.state["module"]["embed.weight"]
    for load_ws, load_stage in [(1, 3), (2, 1), (3, 2), (5, 3), (8, 1)]:
        target = spec(load_ws, load_stage)
        for rank in range(load_ws):
            got = zckpt.load_checkpoint(tmp_path, target, rank)
            _, leaves = zckpt.tree.flatten(got.state)
            want = expected_holdings(state, target, rank)
            assert len(leaves) == len(want)
            for leaf, (a, b) in enumerate(zip(leaves, want)):
                assert tensors_bitwise_equal(a, b), (load_ws, load_stage, rank, leaf)


def test_fp32_state_dict_equals_masters_and_handles_ties(tmp_path: Path) -> None:
    state = model_state()
    zckpt.save_checkpoint(tmp_path, state, spec(4, 2), tag="t", frozen=["frozen.weight"])
    for path in (tmp_path, tmp_path / "t"):
        sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(path)
        assert list(sd) == list(state["module"])
        for name, w in state["master"].items():
            assert tensors_bitwise_equal(sd[name], w)
        assert sd["head.weight"] is sd["embed.weight"]
        assert tensors_bitwise_equal(sd["frozen.weight"], state["module"]["frozen.weight"].float())
        assert sd["num_batches"].dtype == torch.int64
    ex = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path, exclude_frozen_parameters=True)
    assert "frozen.weight" not in ex and "fc.weight" in ex


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(13, 6)
        self.fc = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 13, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor(4))


def test_fp32_state_dict_loads_into_the_model(tmp_path: Path) -> None:
    model = TiedLM()
    names = [n for n, _ in model.named_parameters()]
    lowp: dict[int, torch.Tensor] = {}  # convert each storage once, so ties stay ties
    module = {
        k: lowp.setdefault(v.data_ptr(), v.bfloat16() if v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    state = {
        "module": module,
        "master": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    assert "head.weight" not in names  # named_parameters lists a tied weight once
    zckpt.save_checkpoint(
        tmp_path, state, zckpt.ZeroSpec(3, 3, param_groups=(tuple(names),)), tag="t"
    )
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path)
    fresh = TiedLM()
    fresh.load_state_dict(sd, strict=True)
    for (n, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert tensors_bitwise_equal(a, b), n
    assert fresh.head.weight is fresh.embed.weight


def test_lazy_mode_reads_on_materialisation(tmp_path: Path) -> None:
    state = model_state()
    zckpt.save_checkpoint(tmp_path, state, spec(3, 3), tag="t")
    lazy = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path, lazy_mode=True)
    assert isinstance(lazy["fc.weight"], zckpt.LazyTensor)
    assert lazy["fc.weight"].shape == torch.Size([7, 5])
    assert tensors_bitwise_equal(lazy["fc.weight"].contiguous(), state["master"]["fc.weight"])
    assert lazy["head.weight"] is lazy["embed.weight"]


def test_exclude_frozen_parameters_at_save(tmp_path: Path) -> None:
    state = model_state()
    zckpt.save_checkpoint(
        tmp_path,
        state,
        spec(2, 2),
        tag="t",
        frozen=["frozen.weight"],
        exclude_frozen_parameters=True,
    )
    got = zckpt.load_checkpoint(tmp_path)
    assert "frozen.weight" not in got.state["module"]
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path)
    assert "frozen.weight" not in sd


def test_load_flags(tmp_path: Path) -> None:
    state = model_state()
    zckpt.save_checkpoint(
        tmp_path, state, spec(2, 2), tag="t", client_state={"epoch": 2, "t": torch.ones(2)}
    )
    keys = list(state["module"])

    got = zckpt.load_checkpoint(tmp_path, module_keys=keys)
    assert got.client_state["epoch"] == 2 and torch.equal(got.client_state["t"], torch.ones(2))
    assert got.missing_keys == () and got.unexpected_keys == ()

    renamed = [*keys[:-1], "renamed"]
    with pytest.raises(
        zckpt.LoadError, match=r"missing \['renamed'\], unexpected \['num_batches'\]"
    ):
        zckpt.load_checkpoint(tmp_path, module_keys=renamed)
    got = zckpt.load_checkpoint(tmp_path, module_keys=renamed, load_module_strict=False)
    assert got.missing_keys == ("renamed",) and got.unexpected_keys == ("num_batches",)
    assert "num_batches" not in got.state["module"]

    got = zckpt.load_checkpoint(tmp_path, load_module_only=True)
    assert list(got.state) == ["module"] and got.client_state["epoch"] == 2

    got = zckpt.load_checkpoint(tmp_path, load_optimizer_states=False)
    assert (
        "optimizer" not in got.state and "master" not in got.state and "lr_scheduler" in got.state
    )

    got = zckpt.load_checkpoint(tmp_path, load_lr_scheduler_states=False)
    assert "lr_scheduler" not in got.state and "optimizer" in got.state

    seen: list[Any] = []
    got = zckpt.load_checkpoint(tmp_path, custom_load_fn=lambda m: seen.append(m) or {"mine": 1})
    assert got.state["module"] == {"mine": 1}
    assert_states_equal(seen[0], state["module"])


def test_missing_latest_returns_none_with_warning(tmp_path: Path, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="zckpt"):
        got = zckpt.load_checkpoint(tmp_path)
    assert got.load_path is None and got.state is None
    assert "is empty: no checkpoint saved there yet" in caplog.text


def test_named_missing_or_torn_tag_raises(tmp_path: Path) -> None:
    with pytest.raises(zckpt.CheckpointNotFoundError, match="nope"):
        zckpt.load_checkpoint(tmp_path, tag="nope")
    state = model_state()
    zckpt.save_checkpoint(tmp_path, state, spec(2, 1), tag="t")
    blob = next(p for p in (tmp_path / "t").iterdir() if p.name.endswith("rank00001-of-00002.zck"))
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x10
    blob.write_bytes(bytes(data))
    with pytest.raises(zckpt.FormatError, match=blob.name):
        zckpt.load_checkpoint(tmp_path, tag="t")
    blob.write_bytes(bytes(data[:-100]))
    with pytest.raises(zckpt.FormatError, match=r"bytes on disk, the manifest says"):
        zckpt.load_checkpoint(tmp_path, tag="t")
    (tmp_path / "t" / "manifest.zckm").write_bytes(b"\x89ZCKMAN\n" + b"\0" * 10)
    with pytest.raises(zckpt.FormatError, match=r"t/manifest.zckm: 18 bytes is too short"):
        zckpt.load_checkpoint(tmp_path, tag="t")
    (tmp_path / "t" / "manifest.zckm").unlink()
    with pytest.raises(zckpt.CheckpointNotFoundError, match="no committed checkpoint"):
        zckpt.load_checkpoint(tmp_path, tag="t")


def test_tags(tmp_path: Path) -> None:
    state = model_state()
    assert zckpt.save_checkpoint(tmp_path, state, spec(2, 1)).tag == "global_step3"
    assert (
        zckpt.save_checkpoint(tmp_path, {"w": torch.ones(1)}, spec(1, 1), global_step=7).tag
        == "global_step7"
    )
    for bad in ["", "a/b", "..", ".hidden", "x\n", "a\\b", "latest", "x" * 201]:
        with pytest.raises(zckpt.TagError):
            zckpt.save_checkpoint(tmp_path, state, spec(2, 1), tag=bad)
    with pytest.raises(zckpt.TagError, match="no tag given"):
        zckpt.save_checkpoint(tmp_path, {"w": torch.ones(1)}, spec(1, 1))
    with pytest.raises(zckpt.TagError, match="already holds a committed checkpoint"):
        zckpt.save_checkpoint(tmp_path, state, spec(2, 1), tag="global_step3")
    assert not list(tmp_path.rglob(".*tmp*"))


def test_save_latest_false_leaves_latest_alone(tmp_path: Path) -> None:
    zckpt.save_checkpoint(tmp_path, model_state(0), spec(2, 1), tag="a")
    zckpt.save_checkpoint(tmp_path, model_state(1), spec(2, 1), tag="b", save_latest=False)
    assert (tmp_path / "latest").read_text() == "a"
    assert_states_equal(zckpt.load_checkpoint(tmp_path, tag="b").state, model_state(1))


def test_overwrite_replaces_generation(tmp_path: Path) -> None:
    zckpt.save_checkpoint(tmp_path, model_state(0), spec(2, 1), tag="a")
    zckpt.save_checkpoint(tmp_path, model_state(1), spec(3, 2), tag="a", overwrite=True)
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, model_state(1))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 3 + 1  # three rank files of the new generation and the manifest


def test_keep_last_never_deletes_latest(tmp_path: Path) -> None:
    for i, t in enumerate(["a", "b", "c"]):
        zckpt.save_checkpoint(tmp_path, model_state(i), spec(2, 1), tag=t, keep_last=2)
    assert [c.tag for c in zckpt.list_tags(str(tmp_path))] == ["b", "c"]
    zckpt.save_checkpoint(
        tmp_path, model_state(3), spec(2, 1), tag="d", save_latest=False, keep_last=1
    )
    assert (tmp_path / "latest").read_text() == "c"
    assert [c.tag for c in zckpt.list_tags(str(tmp_path))] == ["c", "d"]


def test_client_state_is_namespaced_and_checked(tmp_path: Path) -> None:
    state = model_state()
    client = {"module": "not the library's", "global_steps": -1, "nested": {"x": [1, 2.5, None]}}
    zckpt.save_checkpoint(tmp_path, state, spec(2, 1), tag="t", client_state=client)
    got = zckpt.load_checkpoint(tmp_path)
    assert got.client_state == client
    assert_states_equal(got.state, state)
    with pytest.raises(zckpt.StateError, match=r"client_state: sched/fn: cannot store .*function"):
        zckpt.save_checkpoint(
            tmp_path, state, spec(2, 1), tag="u", client_state={"sched": {"fn": print}}
        )
    assert not (tmp_path / "u" / "manifest.zckm").exists()


@pytest.mark.parametrize("codec", ["raw", "byteplane"])  # written whole / streamed
def test_failed_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    good = model_state(0)
    zckpt.save_checkpoint(tmp_path, good, spec(4, 2), tag="good")
    real_writev = os.writev
    calls = {"n": 0}

    def failing_writev(fd: int, buffers: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 3:  # the third file: some ranks' files are already durable
            real_writev(fd, [memoryview(buffers[0])[:10]])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(_storage.os, "writev", failing_writev)
    with pytest.raises(
        zckpt.SaveError, match=r"rank 2: StorageError: .*No space left on device"
    ) as info:
        zckpt.save_checkpoint(tmp_path, model_state(1), spec(4, 2), tag="bad", codec=codec)
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "good"
    assert not (tmp_path / "bad" / "manifest.zckm").exists()
    assert not (tmp_path / "bad").exists()  # a failed save removes everything it wrote
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, good)
    with pytest.raises(zckpt.CheckpointNotFoundError):
        zckpt.load_checkpoint(tmp_path, tag="bad")


def test_failed_fsync_of_manifest_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = model_state(0)
    zckpt.save_checkpoint(tmp_path, good, spec(2, 2), tag="good")
    real_fsync = os.fsync

    def eio(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".manifest.zckm.tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(_storage.os, "fsync", eio)
    with pytest.raises(
        zckpt.SaveError, match=r"committing .* failed, nothing was committed: .*Input/output error"
    ) as info:
        zckpt.save_checkpoint(tmp_path, model_state(1), spec(2, 2), tag="good", overwrite=True)
    assert not info.value.committed
    # The failed generation's blobs are gone too: only the committed one's remain.
    gens = {p.name.split(".")[0] for p in (tmp_path / "good").iterdir() if p.suffix == ".zck"}
    assert gens == {zckpt.open_checkpoint(tmp_path).manifest.generation}
    monkeypatch.undo()
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, good)
    assert not [p for p in (tmp_path / "good").iterdir() if ".tmp." in p.name]


def test_clean_removes_only_what_no_commit_references(tmp_path: Path) -> None:
    zckpt.save_checkpoint(tmp_path, model_state(0), spec(2, 1), tag="a")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "0123456789abcdef.rank00000-of-00002.zck").write_bytes(b"x")
    (tmp_path / "users_dir").mkdir()
    (tmp_path / "users_dir" / "notes.txt").write_text("keep me")
    (tmp_path / "a" / "fedcba9876543210.rank00000-of-00002.zck").write_bytes(b"stale")
    removed = zckpt.clean(str(tmp_path))
    assert sorted(removed) == ["a/fedcba9876543210.rank00000-of-00002.zck", "torn"]
    assert (tmp_path / "users_dir" / "notes.txt").exists()
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, model_state(0))


class CountingStorage(zckpt.store.LocalStorage):
    """Counts the bytes read from blob files."""

    def __init__(self) -> None:
        self.blob_bytes = 0
        self.calls: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()  # read_into runs in decoding threads
        self.hints: list[tuple[str, int, int]] = []

    def _count(self, path: str, offset: int, n: int) -> None:
        if path.endswith(".zck"):
            with self.lock:
                self.blob_bytes += n
                self.calls.append((os.path.basename(path), offset, n))

    def read(self, path: str, offset: int, length: int) -> bytes:
        data = super().read(path, offset, length)
        self._count(path, offset, len(data))
        return data

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        n = super().read_into(path, offset, out)
        self._count(path, offset, n)
        return n

    def will_need(self, path: str, offset: int, length: int) -> None:
        self.hints.append((os.path.basename(path), offset, length))
        super().will_need(path, offset, length)


@pytest.mark.parametrize(("save", "load"), [((4, 2), (3, 2)), ((2, 3), (5, 1)), ((8, 1), (1, 3))])
def test_load_reads_only_overlapping_ranges(
    tmp_path: Path, save: tuple[int, int], load: tuple[int, int]
) -> None:
    g = torch.Generator().manual_seed(0)
    master = {f"p{i}": torch.randn(256, 129, generator=g) for i in range(8)}
    state = {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}
    chunk = 16 << 10
    zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(*save), tag="t", chunk_bytes=chunk)
    files = sum(p.stat().st_size for p in (tmp_path / "t").glob("*.zck"))
    target = zckpt.ZeroSpec(*load)
    plan = zckpt.plan_shards(state, target)
    ck = zckpt.open_checkpoint(tmp_path)
    index = index_sources(ck.manifest.skeleton, ck.sources())
    headers = sum(len(ck.storage.read(ck.file_path(r), 0, 4096)) for r in ck.manifest.files)
    total = 0
    for rank in range(target.world_size):
        storage = CountingStorage()
        zckpt.load_checkpoint(tmp_path, target, rank, storage=storage)
        held = plan.holds(rank)
        wanted = sum(f.numel * plan.skeleton.tensors[f.leaf].itemsize for f in held)
        overlaps = sum(1 for f in held for _ in index.overlapping(f))
        # What the rank holds, at most one chunk of slack at each end of each overlap, and the
        # headers of the files it opens.
        assert storage.blob_bytes <= wanted + overlaps * 2 * chunk + headers, rank
        assert storage.blob_bytes >= wanted, rank  # every byte read was counted
        # Each fragment's chunks were announced (read-ahead) before being read, and no more.
        for name, off, n in storage.calls:
            if off >= 4096:  # not a header read
                assert any(h == name and o <= off and off + n <= o + k for h, o, k in storage.hints)
        assert sum(k for _, _, k in storage.hints) <= storage.blob_bytes
        total += storage.blob_bytes
    replicated = sum(t.numel() * 2 for t in state["module"].values()) if load[1] < 3 else 0
    # No N-fold amplification: all ranks together read about the checkpoint once (+ replicas).
    assert total <= 1.3 * files + replicated * (target.world_size - 1)


def test_latest_universal_is_understood(tmp_path: Path) -> None:
    """DeepSpeed users point ``latest_universal`` at a checkpoint any world size can load: with
    zckpt every checkpoint is one, so the pointer is honoured when ``latest`` is absent."""
    state = model_state()
    zckpt.save_checkpoint(tmp_path, state, spec(2, 2), tag="u", save_latest=False)
    (tmp_path / "latest_universal").write_text("u")
    got = zckpt.load_checkpoint(tmp_path, world_size=3, rank=0)
    assert got.load_path == str(tmp_path / "u")
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, state)


def test_fp32_of_a_state_without_module_is_a_clear_error(tmp_path: Path) -> None:
    zckpt.save_checkpoint(tmp_path, {"w": torch.ones(3)}, spec(1, 1), tag="t")
    with pytest.raises(zckpt.LoadError, match="no tensors under 'module'"):
        zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path)


@given(
    sizes=st.lists(st.integers(0, 300), max_size=12),
    window=st.integers(1, 257),
    short=st.lists(st.integers(1, 50), max_size=8),
)
def test_windowed_writes_are_exact_and_start_writeback_in_order(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], window: int, short: list[int]
) -> None:
    """Buffers are cut into windows; short writes resume where they stopped; each window's
    write-back starts once it is written, and the windows tile the file in order."""
    data = bytes(range(256)) * 2
    buffers = [memoryview(data[:n]) for n in sizes]
    caps = iter(short)
    started: list[tuple[int, int]] = []
    real_writev = os.writev

    def writev(fd: int, bufs: Sequence[memoryview]) -> int:
        assert sum(b.nbytes for b in bufs) <= window and len(bufs) <= _write._IOV_MAX
        cap = next(caps, None)  # the kernel may write less than asked
        if cap is None:
            return real_writev(fd, bufs)
        return os.write(fd, b"".join(bytes(b) for b in bufs)[:cap])

    path = tmp_path_factory.mktemp("w") / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    real = _write._start_writeback
    try:
        _storage.os.writev = writev  # type: ignore[assignment]
        _write._start_writeback = lambda f, o, n: started.append((o, n))
        total = _write._writev_all(fd, _write.views(buffers), window)
    finally:
        _storage.os.writev = real_writev  # type: ignore[assignment]
        _write._start_writeback = real
        os.close(fd)
    want = b"".join(bytes(b) for b in buffers)
    assert total == len(want) and path.read_bytes() == want
    assert [o for o, _ in started] == list(itertools.accumulate([0] + [n for _, n in started]))[:-1]
    assert sum(n for _, n in started) == len(want)
    assert all(0 < n <= window for _, n in started)


class Materializing(zckpt.store.LocalStorage):
    """A storage that can only write its buffers in order (as an object store's PUT would)."""

    def __init__(self) -> None:
        self.streams = 0

    def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
        self.streams += isinstance(buffers, zckpt.format.BlobStream)
        return super().write_atomic(path, [b"".join(bytes(b) for b in buffers)])


@pytest.mark.parametrize("codec", ["zstd", "byteplane"])
def test_compressed_saves_stream_and_record_the_file_hash(tmp_path: Path, codec: str) -> None:
    """A compressed blob is written while it is encoded (LocalStorage) or whole, in order (any
    other storage): both are valid blobs that load bitwise and match the manifest's hashes."""
    g = torch.Generator().manual_seed(3)
    master = {f"p{i}": torch.randn(40_000 + i, generator=g) for i in range(4)}
    state = {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}
    other = Materializing()
    for where, storage in (("local", None), ("in-order", other)):
        zckpt.save_checkpoint(
            tmp_path / where, state, spec(3, 2), tag="t", codec=codec, chunk_bytes=16 << 10,
            storage=storage,
        )  # fmt: skip
        ck = zckpt.open_checkpoint(tmp_path / where)
        for rec in ck.manifest.files:
            data = (tmp_path / where / "t" / rec.name).read_bytes()
            assert len(data) == rec.size and xxhash.xxh3_64_intdigest(data) == rec.xxh3
            assert list(iter_problems(data)) == []
            assert {c.codec for e in decode_header(data).fragments for c in e.chunks} != {RAW}
        assert_states_equal(zckpt.load_checkpoint(tmp_path / where).state, state)
    assert other.streams == 3


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_failed_fsync_of_a_blob_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    """fsync follows the write pass that hashes (raw) or the read-back hash (streamed): its error
    still fails the save, and nothing half-written is left."""
    good = model_state(0)
    zckpt.save_checkpoint(tmp_path, good, spec(2, 2), tag="good")
    real_fsync = os.fsync

    def eio(fd: int) -> None:
        if ".rank00001" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(_storage.os, "fsync", eio)
    with pytest.raises(zckpt.SaveError, match=r"rank 1: StorageError: .*Input/output error"):
        zckpt.save_checkpoint(tmp_path, model_state(1), spec(2, 2), tag="bad", codec=codec)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "good"
    assert not (tmp_path / "bad").exists()  # a failed save removes what it wrote
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, good)


@pytest.mark.parametrize("codec", ["raw", "byteplane"])
def test_device_tensors_stream_chunk_by_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    """Tensors whose bytes are not in host memory (GPU) are copied to the host one chunk at a
    time as the blob streams, raw codec included; here every tensor is treated as one."""
    from zckpt.format import _encode

    copied: list[int] = []
    real_host = _encode._DeviceSlice.host

    def host(self: Any) -> Any:
        copied.append(len(self))
        return real_host(self)

    monkeypatch.setattr(_encode, "on_host", lambda t: False)
    monkeypatch.setattr(_encode._DeviceSlice, "host", host)
    state = model_state(0)
    zckpt.save_checkpoint(tmp_path, state, spec(2, 2), tag="t", codec=codec, chunk_bytes=256)
    assert copied and max(copied) <= 256  # chunk by chunk, never a whole tensor
    monkeypatch.undo()
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, state)
    for rec in zckpt.open_checkpoint(tmp_path).manifest.files:
        data = (tmp_path / "t" / rec.name).read_bytes()
        assert xxhash.xxh3_64_intdigest(data) == rec.xxh3 and list(iter_problems(data)) == []


@pytest.mark.parametrize("piece", [16, 1 << 20])
def test_local_reads_in_pieces_check_every_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    """From a local file, raw chunks read from the page cache a piece at a time (each piece
    hashed after its read) come back whole; a flipped byte anywhere in a chunk is caught."""
    import zckpt.store._checkpoint as read_mod

    monkeypatch.setattr(read_mod, "READ_PIECE", piece)
    state = {"w": torch.arange(4096.0), "v": torch.arange(100, dtype=torch.int64)}
    zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(2, 2), tag="t")
    into = {k: torch.zeros_like(v) for k, v in state.items()}
    zckpt.load_checkpoint(tmp_path, into=into)
    assert_states_equal(into, state)
    ck = zckpt.open_checkpoint(tmp_path)
    rec = ck.manifest.files[0]
    c = ck.header(rec).fragments[0].chunks[0]
    path = ck.file_path(rec)
    raw = bytearray(Path(path).read_bytes())
    raw[c.offset + c.length // 2] ^= 0x01
    with open(path, "r+b") as f:
        f.write(raw)
    with pytest.raises(zckpt.ChecksumError, match=f"offset {c.offset}"):
        zckpt.load_checkpoint(tmp_path, into={k: torch.zeros_like(v) for k, v in state.items()})


def _saved_in_fragments(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    state = {f"w{i}": torch.arange(3000.0) + i for i in range(4)}
    zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(1, 1), tag="t", chunk_bytes=2048)
    return state, tmp_path


def test_a_load_opens_each_blob_once_and_reads_it_from_one_disk_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold load (the page cache said not to hold the bytes) goes through one descriptor for
    the disk per blob, in file order, for all its fragments (one stream for the kernel's
    read-ahead), not one open per fragment or chunk; every byte is still checked."""
    state, path = _saved_in_fragments(tmp_path)
    monkeypatch.setattr(_storage, "cached", lambda fd, offset, length: False)
    monkeypatch.setattr(_storage, "DISK_STEP", 1000)  # several steps per span, across chunks
    opened: list[str] = []
    disk: list[int] = []
    real_open, real_pread = _storage.open_regular, _storage._pread_fully

    def counting_open(p: str, *, follow: bool = False) -> int:
        opened.append(p)
        return real_open(p, follow=follow)

    def counting_pread(fd: int, p: str, offset: int, view: memoryview) -> int:
        if p.endswith(".zck"):
            disk.append(offset)
        return real_pread(fd, p, offset, view)

    monkeypatch.setattr(_storage, "open_regular", counting_open)
    monkeypatch.setattr(_storage, "_pread_fully", counting_pread)
    into = {k: torch.zeros_like(v) for k, v in state.items()}
    zckpt.load_checkpoint(path, into=into)
    assert_states_equal(into, state)
    blob_opens = [p for p in opened if p.endswith(".zck")]
    header_opens = 2  # the preamble, then the index (LocalStorage.read)
    assert len(blob_opens) == header_opens + 2  # + the load's descriptor and its disk one
    assert disk == sorted(disk) and len(disk) > 4  # in file order, DISK_STEP at a time
    ck = zckpt.open_checkpoint(path)
    rec = ck.manifest.files[0]
    frag = ck.header(rec).fragments[2]
    c = frag.chunks[1]
    raw = bytearray(Path(ck.file_path(rec)).read_bytes())
    raw[c.offset + 1500] ^= 0x01
    Path(ck.file_path(rec)).write_bytes(raw)
    with pytest.raises(zckpt.ChecksumError, match=f"offset {c.offset}"):
        zckpt.load_checkpoint(path, into={k: torch.zeros_like(v) for k, v in state.items()})


def test_cached_says_what_the_page_cache_holds(tmp_path: Path) -> None:
    """``cached`` answers from the page cache and starts no read: after DONTNEED it says no,
    and a read of the range after it still finds the pages missing until it reads them."""
    p = tmp_path / "f"
    p.write_bytes(os.urandom(1 << 20))
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        first = _storage.cached(fd, 0, 1 << 20)
        if first is None:
            pytest.skip("this kernel has no cachestat(2)")
        if first:
            pytest.skip("this filesystem keeps the pages (tmpfs)")
        assert _storage.cached(fd, 0, 1 << 20) is False  # asking did not read them
        os.pread(fd, 1 << 20, 0)
        assert _storage.cached(fd, 0, 1 << 20) is True
        assert _storage.cached(fd, 4096 * 3 + 5, 100) is True
    finally:
        os.close(fd)
