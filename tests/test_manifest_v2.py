"""Manifest version 2 (issue 13): derived fragments, packed per-file arrays, strict validation.

Saves here force version 2 (``V2_MIN_FRAGMENTS = 0``); zckpt writes it by itself from world
size x tensors >= 65536. Crafted bodies are re-packed with a valid checksum, so every refusal
below is the validator's, not the checksum's.
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

import zckpt
import zckpt.store._manifest as manifest_mod
from zckpt.spec import Fragment
from zckpt.store._manifest import DerivedFragments, decode_manifest
from zckpt.testing import assert_states_equal, tensors_bitwise_equal

PRE = struct.Struct("<8sIIQQ")
EXPERTS = (r"experts\.(\d+)\.",)


@pytest.fixture
def v2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "V2_MIN_FRAGMENTS", 0)


def _state(seed: int = 0, experts: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"a.w": (5, 3), "b.w": (7,), "c.w": (2, 2, 3)}
    for e in range(experts):
        shapes[f"moe.experts.{e}.w"] = (3, 4)
    master = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return {
        "module": {k: t.bfloat16() for k, t in master.items()},
        "master": master,
        "optimizer": {
            "state": {
                k: {"exp_avg": torch.randn(t.shape, generator=g), "step": torch.tensor(3.0)}
                for k, t in master.items()
            },
            "param_groups": [{"lr": 0.1, "params": list(master)}],
        },
        "global_steps": 5 + seed,
    }


def _version(tag_dir: Path) -> int:
    return int(PRE.unpack_from((tag_dir / "manifest.zckm").read_bytes())[1])


def _body(tag_dir: Path) -> dict[str, Any]:
    data = (tag_dir / "manifest.zckm").read_bytes()
    out: dict[str, Any] = msgpack.unpackb(data[PRE.size :], raw=False, strict_map_key=False)
    return out


def _write(tag_dir: Path, body: Any, version: int = 2) -> None:
    raw = msgpack.packb(body, use_bin_type=True)
    head = PRE.pack(b"\x89ZCKMAN\n", version, 0, len(raw), xxhash.xxh3_64_intdigest(raw))
    (tag_dir / "manifest.zckm").write_bytes(head + raw)


def _expected(state: Any, spec: zckpt.ZeroSpec, rank: int) -> list[torch.Tensor]:
    plan = zckpt.plan_shards(state, spec)
    _, leaves = zckpt.tree.flatten(state)
    out = []
    for f in plan.holds(rank):
        flat = leaves[f.leaf].reshape(-1)
        out.append(flat[f.start : f.stop])
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize(("ws", "experts", "ep"), [(4, 0, 1), (4, 4, 2), (3, 0, 1)])
def test_v2_checkpoints_load_at_any_world_size_and_stage(
    v2: None, tmp_path: Path, stage: int, ws: int, experts: int, ep: int
) -> None:
    state = _state(1, experts)
    ex = EXPERTS if experts else ()
    spec = zckpt.ZeroSpec(ws, stage, experts=ex, expert_parallel_size=ep)
    zckpt.save_checkpoint(tmp_path, state, spec, tag="t", client_state={"k": 1})
    assert _version(tmp_path / "t") == 2
    ck = zckpt.open_checkpoint(tmp_path)
    assert ck.manifest.derived
    assert all(isinstance(f.fragments, DerivedFragments) for f in ck.manifest.files)
    assert sorted(f.expert for f in ck.manifest.files if f.expert >= 0) == list(range(experts))
    got = zckpt.load_checkpoint(tmp_path)
    assert_states_equal(got.state, state)
    assert got.client_state == {"k": 1}
    for new_ws, new_stage in ((ws + 1, 3), (2, 1), (5, stage)):
        target = zckpt.ZeroSpec(
            new_ws, new_stage, experts=ex, expert_parallel_size=ep if new_ws % ep == 0 else 1
        )
        if experts and (experts % target.expert_parallel_size):
            continue
        for rank in range(new_ws):
            loaded = zckpt.load_checkpoint(tmp_path, target, rank)
            _, leaves = zckpt.tree.flatten(loaded.state)
            plan = loaded.plan
            assert plan is not None
            want = {f.leaf: w for f, w in zip(plan.holds(rank), _expected(state, target, rank))}
            for leaf, w in want.items():
                assert tensors_bitwise_equal(leaves[leaf].reshape(-1), w)
    assert all(r.ok for r in zckpt.verify_checkpoint(tmp_path))


def test_v2_manifest_matches_v1_record_for_record(v2: None, tmp_path: Path) -> None:
    state = _state(2, 4)
    spec = zckpt.ZeroSpec(4, 3, experts=EXPERTS, expert_parallel_size=2)
    zckpt.save_checkpoint(tmp_path, state, spec, tag="t")
    m2 = zckpt.open_checkpoint(tmp_path).manifest
    m1 = decode_manifest(manifest_mod.encode_manifest(m2, version=1))
    assert m1.skeleton == m2.skeleton and m1.spec == m2.spec
    assert [(f.name, f.rank, f.size, f.xxh3, f.expert, f.index_xxh3) for f in m1.files] == [
        (f.name, f.rank, f.size, f.xxh3, f.expert, f.index_xxh3) for f in m2.files
    ]
    assert [tuple(f.fragments) for f in m1.files] == [tuple(f.fragments) for f in m2.files]
    # Re-encoding a decoded v2 manifest gives the same bytes.
    again = decode_manifest(manifest_mod.encode_manifest(m2, version=2))
    assert manifest_mod.encode_manifest(again, version=2) == manifest_mod.encode_manifest(
        m2, version=2
    )


def test_small_checkpoints_stay_version_1(tmp_path: Path) -> None:
    zckpt.save_checkpoint(tmp_path, _state(), zckpt.ZeroSpec(2, 2), tag="t")
    assert _version(tmp_path / "t") == 1


def test_a_blob_from_another_checkpoint_is_refused(v2: None, tmp_path: Path) -> None:
    spec = zckpt.ZeroSpec(2, 3)
    zckpt.save_checkpoint(tmp_path / "a", _state(1), spec, tag="t")
    zckpt.save_checkpoint(tmp_path / "b", _state(2), spec, tag="t")
    a, b = tmp_path / "a" / "t", tmp_path / "b" / "t"
    ma = zckpt.open_checkpoint(a).manifest
    mb = zckpt.open_checkpoint(b).manifest
    # Same layout, same sizes: b's rank 1 file copied over a's under a's name.
    (a / ma.files[1].name).write_bytes((b / mb.files[1].name).read_bytes())
    with pytest.raises(zckpt.FormatError, match="not the file this manifest committed"):
        zckpt.load_checkpoint(a, world_size=2, rank=1)
    assert not all(r.ok for r in zckpt.verify_checkpoint(a))


def _saved(tmp_path: Path, experts: int = 0) -> Path:
    ex = EXPERTS if experts else ()
    spec = zckpt.ZeroSpec(4, 3, experts=ex, expert_parallel_size=2 if experts else 1)
    zckpt.save_checkpoint(tmp_path, _state(3, experts), spec, tag="t")
    return tmp_path / "t"


def _u8(values: list[int]) -> bytes:
    return np.array(values, dtype="<u8").tobytes()


def _set(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node = body
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("ranks", "size"), _u8([100, 100, 100]), "must be 4 packed"),
        (("ranks", "size"), _u8([100, 100, 100, 5]), "size 5 is out of range"),
        (("ranks", "xxh3"), "not bin", "must be 4 packed"),
        (("ranks", "index_xxh3"), _u8([1, 2, 3]), "must be 4 packed"),
        (("ranks",), [], "expected a map"),
        (("experts", "expert"), np.array([0, 1, 2], "<u4").tobytes(), "experts"),
        (("explicit",), {"x.zck": _u8([0, 0, 1])}, "not files of it"),
        (("explicit",), {"NAME0": b"\x00" * 7}, "packed"),
        (("explicit",), {"NAME0": _u8([999, 0, 1])}, "tensor leaf 999"),
        (("explicit",), {"NAME0": _u8([0, 0, 10**6])}, "outside its"),
        (("explicit",), {"NAME0": _u8([0, 0, 1])}, "leave a gap|overlap"),
        (("skeleton", "tags"), b"\x09", "unknown tag"),
        (("skeleton",), {"tensors": [], "skeleton": [4, 1]}, "columnar form"),
        (("spec", "world_size"), 3, "must be 3 packed"),
        (("format",), 1, "'format' is 1, the preamble says 2"),
    ],
)
def test_crafted_v2_manifests_are_format_errors(
    v2: None, tmp_path: Path, path: tuple[Any, ...], value: Any, message: str
) -> None:
    tag_dir = _saved(tmp_path)
    body = _body(tag_dir)
    name0 = zckpt.open_checkpoint(tag_dir).manifest.files[0].name
    if isinstance(value, dict) and "NAME0" in value:
        value = {name0: value["NAME0"]}
    _set(body, path, value)
    _write(tag_dir, body)
    with pytest.raises(zckpt.FormatError, match=message):
        zckpt.open_checkpoint(tmp_path)
    assert not all(r.ok for r in zckpt.verify_checkpoint(tmp_path))


def test_crafted_expert_tables_are_refused(v2: None, tmp_path: Path) -> None:
    tag_dir = _saved(tmp_path, experts=4)
    body = _body(tag_dir)
    ranks = np.frombuffer(body["experts"]["rank"], "<u4").copy()
    ranks[0] = (ranks[0] + 1) % 4
    body["experts"]["rank"] = ranks.tobytes()
    _write(tag_dir, body)
    with pytest.raises(zckpt.FormatError, match="its writer is"):
        zckpt.open_checkpoint(tmp_path)
    body = _body(tag_dir)
    body["experts"] = {k: v[: len(v) - len(v) // 4] for k, v in body["experts"].items()}
    _write(tag_dir, body)
    with pytest.raises(zckpt.FormatError, match="files for experts"):
        zckpt.open_checkpoint(tmp_path)


def test_derived_records_in_a_v1_manifest_are_refused(v2: None, tmp_path: Path) -> None:
    tag_dir = _saved(tmp_path)
    m = zckpt.open_checkpoint(tag_dir).manifest
    body = msgpack.unpackb(
        manifest_mod.encode_manifest(m, version=1)[PRE.size :], raw=False, strict_map_key=False
    )
    del body["files"][0]["fragments"]
    body["files"][0]["derived"] = True
    _write(tag_dir, body, version=1)
    with pytest.raises(zckpt.FormatError, match="missing field 'fragments'"):
        zckpt.open_checkpoint(tmp_path)


def test_explicit_lists_are_kept_where_the_layout_is_not_the_plan_s(v2: None) -> None:
    """A file whose fragments are not its plan's keeps an explicit list (mixed with derived
    ones), and the whole tiling is then checked."""
    state = _state(4)
    spec = zckpt.ZeroSpec(2, 3)
    plan = zckpt.plan_shards(state, spec)
    skel = plan.skeleton
    gen = "0123456789abcdef"
    files = []
    for r in range(2):
        frags = plan.writes_of(r)
        derived = r == 1
        files.append(
            manifest_mod.FileRecord(
                zckpt.store._layout.blob_name(gen, r, 2), r, 1000, 7, frags, -1, 9, derived
            )
        )
    m = manifest_mod.Manifest("t", gen, 1.0, spec, skel, tuple(files), None, (), False, "x")
    back = decode_manifest(manifest_mod.encode_manifest(m, version=2))
    assert not back.files[0].derived and back.files[1].derived
    assert tuple(back.files[0].fragments) == plan.writes_of(0)
    assert tuple(back.files[1].fragments) == plan.writes_of(1)
    # Leaving one fragment out of the explicit list leaves a gap: refused.
    short = manifest_mod.FileRecord(files[0].name, 0, 1000, 7, plan.writes_of(0)[1:], -1, 9)
    bad = manifest_mod.Manifest("t", gen, 1.0, spec, skel, (short, files[1]), None, (), False, "x")
    with pytest.raises(zckpt.FormatError, match="leave a gap"):
        decode_manifest(manifest_mod.encode_manifest(bad, version=2))


def test_rank_reports_carry_no_fragments_when_derived() -> None:
    state = _state(5)
    plan = zckpt.plan_shards(state, zckpt.ZeroSpec(4, 3))
    rec = manifest_mod.FileRecord("n", 2, 100, 1, plan.writes_of(2), -1, 3)
    assert "fragments" not in manifest_mod.file_report(rec, plan)
    moved = manifest_mod.FileRecord("n", 2, 100, 1, plan.writes_of(1), -1, 3)
    assert manifest_mod.file_report(moved, plan)["fragments"] == [
        list(f) for f in plan.writes_of(1)
    ]
    assert Fragment(0, 0, 1) not in plan.writes_of(2)
