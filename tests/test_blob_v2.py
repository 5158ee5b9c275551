"""Blob format version 2 (issue 13): an index without the skeleton, bound to the manifest's.

A version 2 index holds the skeleton's digest and the dtype/shape columns of only the leaves
the blob has fragments of. ``encode_shard`` writes version 1 unless asked; saves write version
2 exactly when the manifest is version 2 (``writes_v2``), forced here by lowering
``V2_MIN_FRAGMENTS`` as ``tests/test_manifest_v2.py`` does. Crafted indexes are re-packed with
a valid checksum, so each refusal below is the parser's or the binding's, not the checksum's.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import zckpt
import zckpt.store._manifest as manifest_mod
from zckpt.cli import main
from zckpt.format import (
    FORMAT_VERSION,
    PREAMBLE_SIZE,
    decode_header,
    decode_shard,
    encode_shard,
    encode_shard_stream,
    iter_problems,
    verify_blob,
)
from zckpt.format._columns import skeleton_digest, skeleton_to_columns
from zckpt.format._index import bind_skeleton
from zckpt.store._manifest import decode_manifest, encode_manifest, writes_v2
from zckpt.testing import assert_states_equal, tensors_bitwise_equal

PRE = struct.Struct("<8sIIQQ")
MAGIC = b"\x89ZCK\r\n\x1a\n"
EXPERTS = (r"experts\.(\d+)\.",)


@pytest.fixture
def v2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "V2_MIN_FRAGMENTS", 0)


def _state(seed: int = 0, n: int = 3, experts: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {f"l{i}.w": (3 + i, 2) for i in range(n)}
    for e in range(experts):
        shapes[f"moe.experts.{e}.w"] = (2, 3)
    master = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return {
        "module": {k: t.bfloat16() for k, t in master.items()},
        "master": master,
        "optimizer": {
            "state": {k: {"exp_avg": torch.randn(t.shape, generator=g)} for k, t in master.items()},
            "param_groups": [{"lr": 0.1, "params": list(master)}],
        },
        "flags": torch.tensor([True, False, True]),
        "global_steps": 5 + seed,
    }


def _shard(state: Any, spec: zckpt.ZeroSpec, rank: int) -> zckpt.Shard:
    return zckpt.shard_state(state, zckpt.plan_shards(state, spec), rank)


def _index(blob: bytes) -> tuple[dict[str, Any], int]:
    _, version, _, n, _ = PRE.unpack_from(blob)
    index = msgpack.unpackb(blob[PRE.size : PRE.size + n], raw=False)
    return index, version


def _repack(blob: bytes, index: dict[str, Any], version: int = 2) -> bytes:
    """The blob with ``index`` re-packed and re-checksummed in place (it must fit)."""
    body = msgpack.packb(index, use_bin_type=True)
    first = min((c["o"] for f in index["fragments"] for c in f["chunks"]), default=len(blob))
    if PRE.size + len(body) > first:
        raise AssertionError("the crafted index does not fit before the first frame")
    head = PRE.pack(MAGIC, version, 0, len(body), xxhash.xxh3_64_intdigest(body)) + body
    return head + bytes(first - len(head)) + blob[first:]


def _blob_versions(tag_dir: Path) -> dict[str, int]:
    return {
        p.name: PRE.unpack_from(p.read_bytes()[:PREAMBLE_SIZE])[1]
        for p in sorted(tag_dir.glob("*.zck"))
    }


# ------------------------------------------------------------------------------ the pure API


def test_encode_shard_writes_version_1_unless_asked() -> None:
    shard = _shard(_state(), zckpt.ZeroSpec(2, 3), 1)
    blob = encode_shard(shard)
    assert _index(blob)[1] == 1 and "skeleton" in _index(blob)[0]
    back = decode_shard(blob)  # no manifest needed
    assert back.skeleton == shard.skeleton and back.fragments == shard.fragments
    assert all(tensors_bitwise_equal(a, b) for a, b in zip(back.data, shard.data, strict=True))
    assert FORMAT_VERSION == 2


@pytest.mark.parametrize("codec", ["raw", "zstd", "byteplane"])
@pytest.mark.parametrize("stream", [False, True])
def test_version_2_round_trips_bitwise_with_its_skeleton(codec: str, stream: bool) -> None:
    state = _state(1)
    shard = _shard(state, zckpt.ZeroSpec(3, 3), 2)
    if stream:
        s = encode_shard_stream(shard, codec=codec, chunk_bytes=16, version=2)
        body = b"".join(s.frames())
        blob = s.head() + body
        assert s.header.skeleton is shard.skeleton
    else:
        blob = encode_shard(shard, codec=codec, chunk_bytes=16, version=2)
    index, version = _index(blob)
    assert version == 2 and index["version"] == 2
    assert "skeleton" not in index and "tensors" not in index
    assert index["skeleton_digest"] == skeleton_digest(skeleton_to_columns(shard.skeleton))
    verify_blob(blob)  # alone: every chunk checked from the blob's own leaf columns
    assert list(iter_problems(blob)) == []
    back = decode_shard(blob, skeleton=shard.skeleton)
    assert back.skeleton is shard.skeleton and back.fragments == shard.fragments
    assert all(tensors_bitwise_equal(a, b) for a, b in zip(back.data, shard.data, strict=True))


def test_the_example_in_format_md() -> None:
    s = {"w": torch.arange(4.0), "step": 3}
    blob = encode_shard(_shard(s, zckpt.ZeroSpec(1, 1), 0), version=2)
    index, version = _index(blob)
    assert (len(blob), PRE.unpack_from(blob)[3], version) == (336, 282, 2)
    assert index["skeleton_digest"] == 1989777196552328313
    assert {k: v.hex() for k, v in index["leaves"].items()} == {
        "leaf": "00000000",
        "dtypes": "00",
        "ndims": "01",
        "dims": "0400000000000000",
    }
    assert index["fragments"][0]["chunks"][0] == {
        "a": 0, "b": 4, "c": 0, "o": 320, "n": 16, "r": 16, "x": 787602748309198206
    }  # fmt: skip
    assert list(index) == [
        "format", "version", "rank", "spec", "skeleton_digest", "leaves", "fragments", "extra",
        "size",
    ]  # fmt: skip


def test_a_lone_version_2_blob_says_where_its_skeleton_is() -> None:
    shard = _shard(_state(), zckpt.ZeroSpec(2, 2), 0)
    blob = encode_shard(shard, version=2)
    with pytest.raises(zckpt.FormatError, match=r"manifest.*decode_shard\(data, skeleton="):
        decode_shard(blob)
    h = decode_header(blob, blob_size=len(blob))
    assert h.skeleton is None and h.version == 2 and h.digest is not None
    assert h.describe(0).startswith("rank 0: tensor leaf ")
    # decode_fragment works on a lone header: dtypes come from the leaf columns.
    e = h.fragments[0]
    got = zckpt.decode_fragment(h, 0, lambda o, n: blob[o : o + n])
    assert (
        tensors_bitwise_equal(got, shard.data[0])
        and h.meta(e.fragment.leaf) == (shard.skeleton.tensors[e.fragment.leaf])
    )


def test_damage_in_a_lone_version_2_blob_is_found() -> None:
    shard = _shard(_state(), zckpt.ZeroSpec(1, 1), 0)
    blob = bytearray(encode_shard(shard, chunk_bytes=32, version=2))
    blob[-3] ^= 1
    problems = list(iter_problems(blob))
    assert [type(p).__name__ for p in problems] == ["ChecksumError"]
    assert "tensor leaf" in str(problems[0])
    with pytest.raises(zckpt.ChecksumError):
        verify_blob(blob)


def test_the_index_grows_with_the_blob_s_own_fragments_not_the_state() -> None:
    small, big = _state(n=2), _state(n=60)

    def index_len(state: Any, version: int) -> int:
        # One fragment of leaf 0 (module/l0.w, the same tensor in both states).
        skel, leaves = zckpt.tree.flatten(state)
        frag = zckpt.Fragment(0, 0, leaves[0].numel())
        shard = zckpt.Shard(0, zckpt.ZeroSpec(1, 1), skel, (frag,), (leaves[0].reshape(-1),))
        n: int = PRE.unpack_from(encode_shard(shard, version=version))[3]
        return n

    assert index_len(small, 2) == index_len(big, 2)  # the digest is 9 bytes either way
    assert index_len(big, 1) > 10 * index_len(big, 2)


def test_encode_refuses_an_unknown_version() -> None:
    shard = _shard(_state(), zckpt.ZeroSpec(1, 1), 0)
    for bad in (0, 3, True, "2"):
        with pytest.raises(ValueError, match="blob version must be 1 or 2"):
            encode_shard(shard, version=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ crafted indexes


def _crafted(mutate: Any) -> tuple[bytes, zckpt.Shard]:
    shard = _shard(_state(2), zckpt.ZeroSpec(2, 3), 1)
    # Room for the crafted index: a stream leaves it (the longest index it could need).
    s = encode_shard_stream(shard, version=2)
    blob = b"".join(s)
    index, _ = _index(blob)
    mutate(index)
    return _repack(blob, index), shard


def _leaves(index: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = index["leaves"]
    return out


def _set_ids(index: dict[str, Any], ids: list[int]) -> None:
    _leaves(index)["leaf"] = np.array(ids, dtype="<u4").tobytes()


def _ids(index: dict[str, Any]) -> list[int]:
    out: list[int] = np.frombuffer(_leaves(index)["leaf"], dtype="<u4").tolist()
    return out


CRAFTED = {
    "no_digest": (lambda ix: ix.pop("skeleton_digest"), "missing field 'skeleton_digest'"),
    "digest_str": (lambda ix: ix.update(skeleton_digest="x"), "'skeleton_digest'"),
    "digest_negative": (lambda ix: ix.update(skeleton_digest=-1), "'skeleton_digest'"),
    "no_leaves": (lambda ix: ix.pop("leaves"), "missing field 'leaves'"),
    "leaves_not_map": (lambda ix: ix.update(leaves=[1, 2]), "'leaves'.*expected a map"),
    "ids_not_bin": (lambda ix: _leaves(ix).update(leaf=[0]), "'leaf' must be bin"),
    "ids_odd_bytes": (lambda ix: _leaves(ix).update(leaf=b"\x00" * 5), "not a multiple of 4"),
    "ids_unsorted": (
        lambda ix: _set_ids(ix, list(reversed(_ids(ix)))),
        "strictly increasing",
    ),
    "ids_repeated": (lambda ix: _set_ids(ix, [_ids(ix)[0]] * len(_ids(ix))), "strictly"),
    "ids_shifted": (
        lambda ix: _set_ids(ix, [i + 1000 for i in _ids(ix)]),
        "names tensor leaf 0, which the index's 'leaves' do not list",
    ),
    "dtype_unknown": (
        lambda ix: _leaves(ix).update(dtypes=b"\xee" * len(_leaves(ix)["dtypes"])),
        "dtype code 238",
    ),
    "dtype_count": (
        lambda ix: _leaves(ix).update(dtypes=_leaves(ix)["dtypes"][:-1]),
        "dtype codes",
    ),
    "ndims_sum": (
        lambda ix: _leaves(ix).update(ndims=b"\x05" * len(_leaves(ix)["ndims"])),
        "the ranks add up to",
    ),
    "dims_past_int64": (
        lambda ix: _leaves(ix).update(dims=b"\xff" * len(_leaves(ix)["dims"])),
        "past int64",
    ),
    "fragment_leaf_unlisted": (
        lambda ix: ix["fragments"][0].update(leaf=10**6),
        "names tensor leaf 1000000",
    ),
    "leaf_without_fragment": (
        lambda ix: ix.update(fragments=ix["fragments"][1:]),
        "of which the blob holds no fragment",
    ),
    "version_mismatch": (lambda ix: ix.update(version=1), "disagrees with the preamble's"),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_version_2_indexes_are_format_errors(kind: str) -> None:
    mutate, match = CRAFTED[kind]
    blob, _ = _crafted(mutate)
    with pytest.raises(zckpt.FormatError, match=match):
        decode_header(blob, blob_size=len(blob))
    with pytest.raises(zckpt.FormatError, match=match):
        verify_blob(blob)


def test_the_skeleton_must_be_the_one_the_blob_was_written_with() -> None:
    blob, shard = _crafted(lambda ix: None)
    h = decode_header(blob, blob_size=len(blob))
    assert bind_skeleton(h, shard.skeleton).skeleton is shard.skeleton
    other = _shard(_state(2, n=4), zckpt.ZeroSpec(2, 3), 1).skeleton
    with pytest.raises(zckpt.FormatError, match="rank 1: the blob's skeleton digest"):
        decode_shard(blob, skeleton=other)
    # A digest that matches but a leaf column that does not: the tensor is named.
    blob2, _ = _crafted(
        lambda ix: _leaves(ix).update(dtypes=b"\x01" + _leaves(ix)["dtypes"][1:])  # -> fp16
    )
    first = min(_ids(_index(blob2)[0]))
    name = shard.skeleton.name(first)
    assert shard.skeleton.tensors[first].dtype == torch.bfloat16
    with pytest.raises(
        zckpt.FormatError, match=rf"rank 1: tensor {name} is .*float16.* in the blob"
    ):
        decode_shard(blob2, skeleton=shard.skeleton)


def test_a_leaf_past_the_skeleton_is_refused_when_bound() -> None:
    shard = _shard(_state(2), zckpt.ZeroSpec(1, 1), 0)
    h = decode_header(encode_shard(shard, version=2))
    fewer = zckpt.tree.flatten({"w": torch.zeros(1)})[0]
    object.__setattr__(h, "digest", skeleton_digest(skeleton_to_columns(fewer)))
    with pytest.raises(zckpt.FormatError, match=r"lists tensor leaf .*, the skeleton has 1"):
        bind_skeleton(h, fewer)


# ------------------------------------------------------------------------------ checkpoints


def test_one_predicate_decides_manifest_and_blobs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = _state()
    spec = zckpt.ZeroSpec(2, 2)
    skel = zckpt.tree.flatten(state)[0]
    n = 2 * len(skel.tensors)
    for threshold, want in ((n + 1, 1), (n, 2)):
        monkeypatch.setattr(manifest_mod, "V2_MIN_FRAGMENTS", threshold)
        assert writes_v2(spec, skel) == (want == 2)
        tag = f"t{want}"
        zckpt.save_checkpoint(tmp_path, state, spec, tag=tag, client_state={"c": 1})
        versions = _blob_versions(tmp_path / tag)
        manifest_version = PRE.unpack_from((tmp_path / tag / "manifest.zckm").read_bytes())[1]
        assert manifest_version == want
        assert {v for k, v in versions.items() if ".client." not in k} == {want}
        assert [v for k, v in versions.items() if ".client." in k] == [1]  # its own skeleton
        assert_states_equal(zckpt.load_checkpoint(tmp_path, tag=tag).state, state)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_version_2_checkpoints_read_everywhere(v2: None, tmp_path: Path, codec: str) -> None:
    ck = tmp_path / "ck"
    state = _state(3, experts=4)
    spec = zckpt.ZeroSpec(4, 3, experts=EXPERTS, expert_parallel_size=2)
    zckpt.save_checkpoint(ck, state, spec, tag="t", codec=codec, client_state={"k": [1]})
    tag_dir = ck / "t"
    versions = _blob_versions(tag_dir)
    assert sum(".expert" in k for k in versions) == 4
    assert {v for k, v in versions.items() if ".client." not in k} == {2}
    # Each blob's index lists only its own leaves.
    skel = zckpt.open_checkpoint(ck).manifest.skeleton
    for name in versions:
        if ".client." in name:
            continue
        h = decode_header((tag_dir / name).read_bytes())
        assert h.leaf_metas is not None
        assert sorted(h.leaf_metas) == sorted({e.fragment.leaf for e in h.fragments})
        assert len(h.leaf_metas) < len(skel.tensors)
    got = zckpt.load_checkpoint(ck)
    assert_states_equal(got.state, state)
    assert got.client_state == {"k": [1]}
    for rank in range(3):  # resharded, lazily read
        zckpt.load_checkpoint(ck, zckpt.ZeroSpec(3, 1, experts=EXPERTS), rank)
    fp32 = zckpt.get_fp32_state_dict_from_zero_checkpoint(ck, lazy_mode=True)
    for k, t in state["master"].items():
        assert tensors_bitwise_equal(fp32[k].contiguous(), t)
    assert all(r.ok for r in zckpt.verify_checkpoint(ck))
    assert main(["verify", str(ck)]) == 0
    assert main(["inspect", str(ck), "--json"]) == 0
    out = tmp_path / "resharded"
    assert main(["reshard", str(ck), str(out), "--world-size", "6", "-q"]) == 0
    assert_states_equal(zckpt.load_checkpoint(out).state, state)
    assert main(["consolidate", str(ck), str(tmp_path / "w.safetensors"), "-q"]) == 0


def test_inspect_reports_blob_version_2(
    v2: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zckpt.save_checkpoint(tmp_path, _state(), zckpt.ZeroSpec(2, 1), tag="t")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["blob_format_version"] == 2
    assert len(doc["tensors"]) == len(zckpt.tree.flatten(_state())[0].tensors)


def test_async_and_object_store_saves_write_version_2(v2: None, tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    from zckpt.store import FsspecStorage

    state = _state(4)
    pending = zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(2, 2), tag="a", async_=True)
    pending.wait()
    assert set(_blob_versions(tmp_path / "a").values()) == {2}
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, state)
    fs = fsspec.filesystem("memory")
    st_ = FsspecStorage(fs)
    url = "memory://zckpt-tests/blob-v2"
    zckpt.save_checkpoint(url, state, zckpt.ZeroSpec(2, 3), tag="t", storage=st_, codec="zstd")
    names = [n for n in st_.listdir(f"{url}/t") if n.endswith(".zck")]
    assert names and all(st_.read(f"{url}/t/{n}", 8, 4) == b"\x02\x00\x00\x00" for n in names)
    assert_states_equal(zckpt.load_checkpoint(url, storage=st_).state, state)
    assert all(r.ok for r in zckpt.verify_checkpoint(url, storage=st_))


def test_version_2_blobs_under_a_version_1_manifest_load(v2: None, tmp_path: Path) -> None:
    """A save whose files v2 cannot record falls back to a version 1 manifest; its blobs
    are version 2 all the same, checked against the v1 manifest's skeleton."""
    state = _state(5)
    zckpt.save_checkpoint(tmp_path, state, zckpt.ZeroSpec(3, 3), tag="t")
    path = tmp_path / "t" / "manifest.zckm"
    m = decode_manifest(path.read_bytes())
    path.write_bytes(encode_manifest(m, version=1))
    assert PRE.unpack_from(path.read_bytes())[1] == 1
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, state)
    assert all(r.ok for r in zckpt.verify_checkpoint(tmp_path))


def _rebind(tag_dir: Path, name: str) -> None:
    """Make the manifest's record of ``name`` match the file as it is (a v2 manifest)."""
    path = tag_dir / "manifest.zckm"
    data = path.read_bytes()
    body = msgpack.unpackb(data[PRE.size :], raw=False, strict_map_key=False)
    blob = (tag_dir / name).read_bytes()
    rank = int(name.split(".rank")[1][:5])
    ranks = body["ranks"]
    for key, value in (
        ("size", len(blob)),
        ("xxh3", xxhash.xxh3_64_intdigest(blob)),
        ("index_xxh3", PRE.unpack_from(blob)[4]),
    ):
        col = np.frombuffer(ranks[key], dtype="<u8").copy()
        col[rank] = value
        ranks[key] = col.tobytes()
    raw = msgpack.packb(body, use_bin_type=True)
    head = PRE.pack(b"\x89ZCKMAN\n", 2, 0, len(raw), xxhash.xxh3_64_intdigest(raw))
    path.write_bytes(head + raw)


def test_a_rebound_blob_of_another_state_is_refused_naming_file_and_rank(
    v2: None, tmp_path: Path
) -> None:
    """Even bound by its index checksum (a rewritten manifest), a blob written for another
    skeleton fails its digest: the file and rank are named."""
    a, b = tmp_path / "a", tmp_path / "b"
    spec = zckpt.ZeroSpec(2, 1)
    zckpt.save_checkpoint(a, _state(1), spec, tag="t")
    other = _state(1)
    other["global_steps"] = 99  # another skeleton (a value), the same tensors and layout
    zckpt.save_checkpoint(b, other, spec, tag="t")
    ma, mb = zckpt.open_checkpoint(a).manifest, zckpt.open_checkpoint(b).manifest
    (a / "t" / ma.files[1].name).write_bytes((b / "t" / mb.files[1].name).read_bytes())
    _rebind(a / "t", ma.files[1].name)
    msg = rf"{ma.files[1].name}: rank 1: the blob's skeleton digest"
    with pytest.raises(zckpt.FormatError, match=msg):
        zckpt.load_checkpoint(a)
    with pytest.raises(zckpt.FormatError, match=msg):
        zckpt.load_checkpoint(a, zckpt.ZeroSpec(2, 1), 1)
    reports = zckpt.verify_checkpoint(a)
    assert not reports[0].ok and any("skeleton digest" in p for p in reports[0].problems)


def test_a_rebound_blob_whose_leaf_column_lies_names_the_tensor(v2: None, tmp_path: Path) -> None:
    spec = zckpt.ZeroSpec(2, 3)
    zckpt.save_checkpoint(tmp_path, _state(6), spec, tag="t", chunk_bytes=64)
    m = zckpt.open_checkpoint(tmp_path).manifest
    rec = m.files[0]
    path = tmp_path / "t" / rec.name
    blob = path.read_bytes()
    index, _ = _index(blob)
    codes = bytearray(_leaves(index)["dtypes"])
    leaf = _ids(index)[0]
    codes[0] = 1 if codes[0] == 2 else 2  # bf16 <-> fp16 (same item size)
    _leaves(index)["dtypes"] = bytes(codes)
    path.write_bytes(_repack(blob, index))
    _rebind(tmp_path / "t", rec.name)
    name = m.skeleton.name(leaf)
    with pytest.raises(zckpt.FormatError, match=rf"{rec.name}: rank 0: tensor {name} is"):
        zckpt.load_checkpoint(tmp_path)
    assert not zckpt.verify_checkpoint(tmp_path)[0].ok


# ------------------------------------------------------------------------------ properties


@st.composite
def _cases(draw: st.DrawFn) -> tuple[dict[str, Any], zckpt.ZeroSpec, zckpt.ZeroSpec]:
    experts = draw(st.sampled_from([0, 2, 4]))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 1000))
    ws = draw(st.integers(1, 8))
    ep = draw(st.sampled_from([e for e in (1, 2, 4) if ws % e == 0 and experts % e == 0]))
    ep = ep if experts else 1
    ex = EXPERTS if experts else ()
    spec = zckpt.ZeroSpec(ws, draw(st.integers(1, 3)), experts=ex, expert_parallel_size=ep)
    new_ws = draw(st.integers(1, 8))
    new = zckpt.ZeroSpec(new_ws, draw(st.integers(1, 3)), experts=ex)
    return _state(seed, n, experts), spec, new


@settings(
    max_examples=max(5, settings.default.max_examples // 20),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(_cases())
@example(
    (_state(0, 1, 4), zckpt.ZeroSpec(8, 3, experts=EXPERTS, expert_parallel_size=4),
     zckpt.ZeroSpec(3, 2, experts=EXPERTS))
)  # fmt: skip
def test_save_load_consolidate_round_trips_with_version_2_blobs(
    v2: None, tmp_path_factory: pytest.TempPathFactory, case: Any
) -> None:
    state, spec, new = case
    d = tmp_path_factory.mktemp("prop")
    zckpt.save_checkpoint(d, state, spec, tag="t", client_state={"s": 1})
    versions = _blob_versions(d / "t")
    assert {v for k, v in versions.items() if ".client." not in k} == {2}
    assert_states_equal(zckpt.load_checkpoint(d).state, state)  # consolidated
    plan = zckpt.plan_shards(state, new)
    _, leaves = zckpt.tree.flatten(state)
    for rank in range(new.world_size):
        loaded = zckpt.load_checkpoint(d, new, rank)
        _, got = zckpt.tree.flatten(loaded.state)
        for f in plan.holds(rank):
            want = leaves[f.leaf].reshape(-1)[f.start : f.stop]
            assert tensors_bitwise_equal(got[f.leaf].reshape(-1), want)
