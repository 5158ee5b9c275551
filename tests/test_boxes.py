"""DTensor blocks as zckpt boxes, without a process group: ``mesh_box`` is DTensor's own chunking
(checked against torch's ``_compute_local_shape_and_global_offset``), the writers' boxes tile
every tensor exactly once, and a state saved as boxes at one mesh (ranks as threads, the
real save and load) loads at another mesh and placements with the same bytes; mismatches and
hostile manifests are clear errors."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.errors import FormatError, SpecError
from zckpt.shard import LocalBox
from zckpt.spec import Box, box_runs, box_writer, mesh_box, mesh_coordinate
from zckpt.store._manifest import decode_manifest, encode_manifest
from zckpt.testing import assert_states_equal
from zckpt.testing._threads import run_ranks

Layout = tuple[tuple[int, ...], tuple[int | None, ...]]  # mesh shape, shard dim per mesh dim


@st.composite
def layouts(draw: st.DrawFn, ndim: int, max_ranks: int = 8) -> Layout:
    mesh_ndim = draw(st.integers(1, 2))
    mesh = tuple(draw(st.integers(1, 4)) for _ in range(mesh_ndim))
    if math.prod(mesh) > max_ranks:
        mesh = (mesh[0],)
    dims = tuple(draw(st.none() | st.integers(0, ndim - 1)) if ndim else None for _ in mesh)
    return mesh, dims


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)


def coords(mesh: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for n in mesh:
        out = [(*c, i) for c in out for i in range(n)]
    return out


@given(shape=shapes, data=st.data())
def test_mesh_box_is_dtensors_chunking(shape: tuple[int, ...], data: st.DataObject) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    mesh, dims = data.draw(layouts(len(shape)))
    placements = [Replicate() if d is None else Shard(d) for d in dims]
    for c in coords(mesh):
        box = mesh_box(shape, mesh, c, dims)
        sizes, offsets = _compute_local_shape_and_global_offset(shape, mesh, list(c), placements)
        assert box.sizes == tuple(sizes)
        if box.numel:  # an empty block's offset is immaterial (no element to place)
            assert box.offsets == tuple(offsets)


@given(shape=shapes, data=st.data())
def test_writers_boxes_tile_the_tensor_exactly(shape: tuple[int, ...], data: st.DataObject) -> None:
    mesh, dims = data.draw(layouts(len(shape)))
    numel = math.prod(shape)
    hits = [0] * numel
    for c in coords(mesh):
        box = mesh_box(shape, mesh, c, dims)
        runs = box_runs(shape, box)
        assert sum(n for _, _, n in runs) == box.numel
        local = 0
        for g, at, n in runs:
            assert at == local  # runs are the box's own elements in order
            local += n
            if box_writer(c, dims):
                for i in range(g, g + n):
                    hits[i] += 1
    assert hits == [1] * numel


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(7, 5, generator=g),
            "b": torch.randn(6, generator=g).bfloat16(),
            "c": torch.randint(-50, 50, (3, 4, 2), generator=g),
            "s": torch.tensor(1.5),
            "z": torch.zeros(0, 3),
        },
        "n": torch.arange(5),
        "lr": 0.5,
    }


BOXED = ("w", "b", "c", "s", "z")


@st.composite
def state_layouts(draw: st.DrawFn, ws: int) -> dict[str, Layout]:
    """A placement for each boxed tensor over one mesh of ``ws`` ranks (1-D or 2-D)."""
    mesh = (ws,) if ws % 2 or draw(st.booleans()) else (2, ws // 2)
    st_state = _state(0)["model"]
    out = {}
    for k in BOXED:
        nd = st_state[k].dim()
        out[k] = (
            mesh,
            tuple(draw(st.none() | st.integers(0, nd - 1)) if nd else None for _ in mesh),
        )
    return out


def _save(d: Path, state: dict[str, Any], lay: dict[str, Layout], ws: int) -> None:
    skel, _ = zckpt.tree.flatten(state)
    leaf = {p[-1]: i for i, p in enumerate(skel.paths) if p[0] == "model"}

    def rank(comm: Any) -> str:
        boxes = {}
        for k in BOXED:
            mesh, dims = lay[k]
            boxes[leaf[k]] = LocalBox.of(
                state["model"][k], mesh, mesh_coordinate(mesh, comm.rank), dims
            )
        plan = zckpt.plan_shards(skel, zckpt.ZeroSpec(ws, 3))
        shard = zckpt.shard_state(state, plan, comm.rank, boxes)
        return zckpt.save_checkpoint(d, shard, comm=comm, tag="t").tag

    assert run_ranks(rank, ws) == ["t"] * ws


def _load(d: Path, state: dict[str, Any], lay: dict[str, Layout], ws: int) -> None:
    def rank(comm: Any) -> None:
        into: dict[str, Any] = {}
        want: dict[str, torch.Tensor] = {}
        for k in BOXED:
            mesh, dims = lay[k]
            c = mesh_coordinate(mesh, comm.rank)
            into[k] = LocalBox.of(torch.full_like(state["model"][k], 7), mesh, c, dims)
            want[k] = LocalBox.of(state["model"][k], mesh, c, dims).data
        got = zckpt.load_checkpoint(d, into={"model": into})
        for k in BOXED:
            assert got.state["model"][k] is into[k]
            assert_states_equal(into[k].data, want[k], ("model", k))
        assert_states_equal(got.state["n"], state["n"])
        assert got.state["lr"] == 0.5

    run_ranks(rank, ws)


@settings(max_examples=12, deadline=None)
@given(a=st.integers(1, 4), b=st.integers(1, 5), data=st.data())
def test_saved_at_one_mesh_loads_at_another(a: int, b: int, data: st.DataObject) -> None:
    state = _state(a * 10 + b)
    save_lay = data.draw(state_layouts(a), label="saved")
    load_lay = data.draw(state_layouts(b), label="loaded")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _save(d, state, save_lay, a)
        _load(d, state, load_lay, b)
        assert_states_equal(zckpt.load_checkpoint(d).state, state)  # whole, one process


def test_mismatched_destinations_are_load_errors(tmp_path: Path) -> None:
    state = _state(1)
    lay = {k: ((2,), (0,) if state["model"][k].dim() else (None,)) for k in BOXED}
    _save(tmp_path, state, lay, 2)
    other = LocalBox.of(torch.zeros(7, 6), (2,), (0,), (0,))
    with pytest.raises(
        zckpt.LoadError, match=r"into=model/w: .*\[7, 6\] tensor, the checkpoint holds \[7, 5\]"
    ):
        zckpt.load_checkpoint(tmp_path, into={"model": {"w": other}})
    half = LocalBox.of(torch.zeros(7, 5, dtype=torch.float16), (2,), (1,), (1,))
    with pytest.raises(zckpt.LoadError, match=r"into=model/w: the destination is torch.float16"):
        zckpt.load_checkpoint(tmp_path, into={"model": {"w": half}})


def _rewrite(d: Path, edit: Any) -> None:
    path = d / "t" / "manifest.zckm"
    m = decode_manifest(path.read_bytes())
    path.write_bytes(encode_manifest(edit(m)))


@pytest.mark.parametrize(
    ("shift", "what"), [(-1, "overlap at element"), (1, "leave a gap at element")]
)
def test_manifest_with_overlapping_or_missing_boxes_is_refused(
    tmp_path: Path, shift: int, what: str
) -> None:
    """A manifest (checksum valid) claiming runs that overlap or leave a gap: a clear error
    naming the tensor and element, never a load of wrong bytes."""
    import dataclasses

    state = _state(2)
    lay = {
        k: ((2,), (state["model"][k].dim() - 1 if state["model"][k].dim() else None,))
        for k in BOXED
    }
    _save(tmp_path, state, lay, 2)

    def edit(m: Any) -> Any:
        rec = m.files[1]
        frags = list(rec.fragments)
        f = frags[0]
        frags[0] = type(f)(f.leaf, f.start + shift, f.stop)
        return dataclasses.replace(
            m, files=(m.files[0], dataclasses.replace(rec, fragments=tuple(frags)))
        )

    _rewrite(tmp_path, edit)
    with pytest.raises(FormatError, match=f"saved fragments of model/w {what}"):
        zckpt.load_checkpoint(tmp_path)


def test_boxes_written_twice_are_refused_at_save(tmp_path: Path) -> None:
    """Two ranks both claiming to write a replicated block: the save fails, nothing committed
    (rank 0 checks the tiling of listed fragments before the manifest)."""
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    skel, _ = zckpt.tree.flatten(state)

    def rank(comm: Any) -> None:
        box = LocalBox((2, 3), Box((0, 0), (2, 3)), state["w"].clone(), writes=True)
        plan = zckpt.plan_shards(skel, zckpt.ZeroSpec(2, 3))
        zckpt.save_checkpoint(
            tmp_path, zckpt.shard_state(state, plan, comm.rank, {0: box}), comm=comm, tag="t"
        )

    from zckpt.testing._threads import gather_errors

    errors = gather_errors(rank, 2)
    assert all(isinstance(e, zckpt.SaveError) for e in errors), errors
    assert "saved fragments of w overlap at element 0" in str(errors[0])
    assert "nothing was committed" in str(errors[0])
    assert not (tmp_path / "t" / "manifest.zckm").exists()


def test_box_and_mesh_errors() -> None:
    with pytest.raises(SpecError, match="coordinate 2 is outside its size 2"):
        mesh_box((4,), (2,), (2,), (0,))
    with pytest.raises(SpecError, match="shards tensor dimension 1 of a 1-d tensor"):
        mesh_box((4,), (2,), (0,), (1,))
    with pytest.raises(zckpt.StateError, match="not the box's"):
        LocalBox((4,), Box((0,), (2,)), torch.zeros(3))
    with pytest.raises(SpecError, match="must be given as a LocalBox"):
        s = {"w": torch.zeros(2)}
        plan = zckpt.plan_shards(s, zckpt.ZeroSpec(1, 3))
        fake = type("DT", (torch.Tensor,), {"placements": (), "device_mesh": None})
        zckpt.shard_state({"w": torch.zeros(2).as_subclass(fake)}, plan, 0)


def test_zero_checkpoints_and_box_checkpoints_load_into_each_other(tmp_path: Path) -> None:
    """One mechanism: a ZeRO stage 2 save (flat groups) loads into blocks, and a save of blocks
    loads as a ZeRO stage 1 rank's partitions, with the same bytes."""
    state = _state(3)
    zckpt.save_checkpoint(tmp_path / "zero", state, zckpt.ZeroSpec(3, 2), tag="t")
    lay = {k: ((2, 2), (0, None) if state["model"][k].dim() else (None, None)) for k in BOXED}
    _load(tmp_path / "zero", state, lay, 4)

    boxes_dir = tmp_path / "boxes"
    _save(
        boxes_dir,
        state,
        {
            k: ((3,), (state["model"][k].dim() - 1 if state["model"][k].dim() else None,))
            for k in BOXED
        },
        3,
    )
    spec = zckpt.ZeroSpec(2, 1, module="nothing")  # every tensor in a flat group
    _, full = zckpt.tree.flatten(state)
    for r in range(2):
        got = zckpt.load_checkpoint(boxes_dir, spec, r)
        _, leaves = zckpt.tree.flatten(got.state)
        assert len(leaves) == len(full)
        held = got.plan.holds(r)
        assert held
        for f in held:  # this rank's range of each tensor, bit for bit
            want = full[f.leaf].reshape(-1)[f.start : f.stop]
            assert_states_equal(leaves[f.leaf].reshape(-1), want, (r, f))


def test_blocks_in_a_version_2_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint large enough for manifest and blobs version 2 lists the blocks' runs in its
    ``explicit`` table; they load as in version 1."""
    import zckpt.store._manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "V2_MIN_FRAGMENTS", 0)
    state = _state(4)
    lay = {k: ((2, 2), (None, 0) if state["model"][k].dim() else (None, None)) for k in BOXED}
    _save(tmp_path, state, lay, 4)
    assert (tmp_path / "t" / "manifest.zckm").read_bytes()[8] == 2  # format version 2
    assert not zckpt.open_checkpoint(tmp_path).manifest.derived
    other = {
        k: ((3,), (state["model"][k].dim() - 1 if state["model"][k].dim() else None,))
        for k in BOXED
    }
    _load(tmp_path, state, other, 3)
    assert_states_equal(zckpt.load_checkpoint(tmp_path).state, state)


@settings(max_examples=50, deadline=None)
@given(mesh=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_mesh_coordinate_is_where_the_rank_sits_in_the_row_major_mesh(
    mesh: list[int], data: st.DataObject
) -> None:
    ranks = torch.arange(int(torch.tensor(mesh).prod())).reshape(mesh)  # init_device_mesh's
    rank = data.draw(st.integers(0, ranks.numel() - 1))
    want = tuple(int(i) for i in (ranks == rank).nonzero()[0])
    assert mesh_coordinate(mesh, rank) == want
    with pytest.raises(SpecError, match="outside a mesh"):
        mesh_coordinate(mesh, ranks.numel())
