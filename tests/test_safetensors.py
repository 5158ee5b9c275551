"""Safetensors export: loads with safetensors itself; shard limits, index, tied weights, memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peak_child import run_child
from safetensors import safe_open
from safetensors.torch import load_file

import zckpt
from zckpt.interop import export_safetensors, parse_size
from zckpt.interop._safetensors import (
    INDEX_NAME,
    SINGLE_NAME,
    module_key_order,
    plan_safetensors_shards,
)
from zckpt.interop._synthetic import write_zero_checkpoint


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 8, generator=g)
    return {
        "embed.weight": emb,
        "layer.weight": torch.randn(8, 8, generator=g),
        "layer.bias": torch.randn(8, generator=g),
        "steps": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "head.weight": emb,  # tied
    }


def _load_sharded(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    idx = json.loads((d / INDEX_NAME).read_text())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(idx["weight_map"].values())):
        part = load_file(d / f)
        assert all(idx["weight_map"][k] == f for k in part)
        out.update(part)
    return out, idx


def test_single_file_roundtrip_and_tied_metadata(tmp_path: Path) -> None:
    sd = _state()
    r = export_safetensors(sd, tmp_path / "m.safetensors", metadata={"source": "test"})
    assert r.files == (str(tmp_path / "m.safetensors"),) and r.index_path is None
    got = load_file(tmp_path / "m.safetensors")
    assert set(got) == set(sd) - {"head.weight"}
    for k, v in got.items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["source"] == "test"
    assert json.loads(meta["tied"]) == {"head.weight": "embed.weight"}
    assert r.tied == {"head.weight": "embed.weight"}


def test_sharded_respects_limit_and_index(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.full((i + 1, 10), float(i)) for i in range(12)}
    sd["big"] = torch.ones(200)  # 800 bytes: larger than the limit, alone in its shard
    sd["alias"] = sd["w3"]
    limit = 400
    r = export_safetensors(sd, tmp_path / "out", max_shard_size=limit)
    assert len(r.files) > 2 and r.index_path == str(tmp_path / "out" / INDEX_NAME)
    n = len(r.files)
    for i, f in enumerate(r.files, 1):
        assert os.path.basename(f) == f"model-{i:05d}-of-{n:05d}.safetensors"
        part = load_file(f)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= limit or len(part) == 1, (f, size)
    got, idx = _load_sharded(tmp_path / "out")
    unique = {k: v for k, v in sd.items() if k != "alias"}
    assert set(got) == set(unique) == set(idx["weight_map"])  # type: ignore[arg-type]
    assert all(torch.equal(got[k], v) for k, v in unique.items())
    meta = idx["metadata"]
    assert meta == {  # type: ignore[comparison-overlap]
        "total_size": sum(v.numel() * 4 for v in unique.values()),
        "total_parameters": sum(v.numel() for v in unique.values()),
        "tied": {"alias": "w3"},
    }
    # re-tie as a loader would
    tied = {a: got[s] for a, s in meta["tied"].items()}  # type: ignore[index]
    assert torch.equal(tied["alias"], sd["alias"])


def test_one_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    r = export_safetensors({"w": torch.ones(3)}, tmp_path, max_shard_size="5GB")
    assert r.files == (str(tmp_path / SINGLE_NAME),) and r.index_path is None
    assert torch.equal(load_file(tmp_path / SINGLE_NAME)["w"], torch.ones(3))


def test_dtype_cast_only_floats_and_views_are_copied(tmp_path: Path) -> None:
    flat = torch.arange(20.0)
    sd = {"a": flat[:10], "b": flat[10:], "i": torch.arange(3)}  # views of one buffer
    export_safetensors(sd, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    got = load_file(tmp_path / "m.safetensors")
    assert got["a"].dtype == torch.bfloat16 and got["i"].dtype == torch.int64
    assert torch.equal(got["b"], flat[10:].bfloat16())


def test_lazy_values_and_same_lazy_object_tied(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    s = {"module": {"w": w.bfloat16(), "b": torch.ones(2)}, "master": {"w": w, "b": torch.ones(2)}}
    zckpt.save_checkpoint(tmp_path / "ck", s, zckpt.ZeroSpec(4, 2), tag="t")
    lazy = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path / "ck", lazy_mode=True)
    lazy["w_tied"] = lazy["w"]
    r = export_safetensors(lazy, tmp_path / "o.safetensors")
    assert r.tied == {"w_tied": "w"}
    got = load_file(tmp_path / "o.safetensors")
    assert torch.equal(got["w"], w) and set(got) == {"w", "b"}


@pytest.mark.parametrize(
    ("text", "n"), [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 << 30), (7, 7)]
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "5XB", "-3", 0, True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


def test_plan_follows_hugging_face_packing() -> None:
    assert plan_safetensors_shards([], 10) == []
    # an oversized tensor is a shard of its own, numbered when met; the open shard stays open
    assert plan_safetensors_shards([3, 3, 3, 20, 3], 6) == [[0, 1], [3], [2, 4]]
    assert plan_safetensors_shards([20, 3, 21, 3], 6) == [[0], [2], [1, 3]]
    assert plan_safetensors_shards([6, 0, 6, 6], 6) == [[0, 1], [2], [3]]  # exactly full: kept
    assert plan_safetensors_shards([0, 0], 1) == [[0, 1]]
    # the docstring of huggingface_hub's split_state_dict_into_shards_factory (in GB, limit 10)
    assert plan_safetensors_shards([6, 6, 2, 6, 2, 2], 10) == [[0], [1, 2], [3, 4, 5]]


def test_reserved_metadata_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        export_safetensors({"w": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"tied": ""})


CHILD = r"""
import zckpt
from zckpt.interop import export_safetensors

path, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(path, lazy_mode=True)
sd["warmup"].contiguous()
start()
r = export_safetensors(sd, out, max_shard_size=limit)
done(files=len(r.files))
"""


def test_lazy_sharded_export_memory_is_one_shard_not_total(tmp_path: Path) -> None:
    n, rows, cols = 24, 1024, 1024  # 24 x 4 MiB fp32 = 96 MiB
    g = torch.Generator().manual_seed(0)
    master = {f"p{i}": torch.randn(rows, cols, generator=g) for i in range(n)}
    master["warmup"] = torch.randn(8)
    state = {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}
    zckpt.save_checkpoint(tmp_path / "ck", state, zckpt.ZeroSpec(2, 2), tag="t")
    del master, state
    shard = 8 << 20  # two tensors per shard
    r = run_child(CHILD, tmp_path / "ck", tmp_path / "out", shard)
    growth = r["growth_mib"]
    assert r["files"] >= 12
    assert growth <= 8 + 4 + 32, r  # one shard + one tensor's read buffer + slack, not 96
    got, _ = _load_sharded(tmp_path / "out")
    assert len(got) == n + 1


def _file_of(idx: dict[str, object]) -> dict[str, str]:
    wm = idx["weight_map"]
    assert isinstance(wm, dict)
    return wm


def test_index_is_written_as_transformers_writes_it(tmp_path: Path) -> None:
    sd = _state()
    export_safetensors(sd, tmp_path / "o", max_shard_size=300)
    text = (tmp_path / "o" / INDEX_NAME).read_text()
    idx = json.loads(text)
    assert text == json.dumps(idx, indent=2, sort_keys=True) + "\n"  # sorted at every level
    assert list(idx) == ["metadata", "weight_map"]
    assert list(idx["metadata"]) == ["tied", "total_parameters", "total_size"]
    assert list(idx["weight_map"]) == sorted(idx["weight_map"])
    stored = {k: v for k, v in sd.items() if k != "head.weight"}
    assert idx["metadata"]["total_parameters"] == sum(v.numel() for v in stored.values())
    nbytes = sum(v.numel() * v.element_size() for v in stored.values())
    assert idx["metadata"]["total_size"] == nbytes


def _mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(30, 8, generator=g)
    return {
        "emb.weight": emb,
        "a.weight": torch.randn(8, 8, generator=g).bfloat16(),
        "a.bias": torch.randn(8, generator=g).half(),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        "count": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "big": torch.randn(100, 4, generator=g),  # 1600 bytes: more than any limit below
        "empty": torch.zeros(0, 5),
        "b.weight": torch.randn(4, 8, generator=g),
        "head.weight": emb,  # tied to emb.weight
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("limit", [1, 64, 300, 1000, 10**6])
def test_shards_and_index_reassemble_the_state_dict_bitwise(tmp_path: Path, limit: int) -> None:
    sd = _mixed_state()
    r = export_safetensors(sd, tmp_path / "o", max_shard_size=limit)
    files = sorted(os.listdir(tmp_path / "o"))
    if r.index_path is None:
        assert files == [SINGLE_NAME]
        got = load_file(tmp_path / "o" / SINGLE_NAME)
        wm = dict.fromkeys(got, SINGLE_NAME)
    else:
        got, idx = _load_sharded(tmp_path / "o")
        wm = _file_of(idx)
        assert files == sorted([*set(wm.values()), INDEX_NAME])
        assert idx["metadata"]["tied"] == {"head.weight": "emb.weight"}  # type: ignore[index]
    # every stored tensor in exactly one file, the alias in none: tied weights are stored once
    seen: list[str] = []
    for f in sorted(set(wm.values())):
        with safe_open(str(tmp_path / "o" / f), "pt") as h:
            seen += list(h.keys())
            assert json.loads(h.metadata()["tied"]) == {"head.weight": "emb.weight"}
    assert sorted(seen) == sorted(set(sd) - {"head.weight"})
    got["head.weight"] = got[r.tied["head.weight"]]  # re-tie as a loader would
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert _bits(got[k]) == _bits(v), k
    assert r.total_size == sum(len(_bits(v)) for k, v in sd.items() if k != "head.weight")


def test_reexport_leaves_no_file_of_the_previous_export(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.full((25,), float(i)) for i in range(5)}  # 100 bytes each
    out = tmp_path / "o"
    r5 = export_safetensors(sd, out, max_shard_size=100)
    assert len(r5.files) == 5 and len(os.listdir(out)) == 6
    (out / "model-00004-of-00005.safetensors").chmod(0o444)  # even a read-only one goes
    r2 = export_safetensors(sd, out, max_shard_size=300, overwrite=True)
    assert sorted(os.listdir(out)) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        INDEX_NAME,
    ]
    assert set(_file_of(json.loads((out / INDEX_NAME).read_text())).values()) == {
        os.path.basename(f) for f in r2.files
    }
    got, _ = _load_sharded(out)
    assert all(torch.equal(got[k], v) for k, v in sd.items()) and set(got) == set(sd)
    export_safetensors(sd, out, max_shard_size="1GB", overwrite=True)
    assert os.listdir(out) == [SINGLE_NAME]  # one shard: no index, no numbered files
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no temporary or old directory beside it


def test_key_order_orders_tensors_and_picks_the_stored_tie(tmp_path: Path) -> None:
    w = torch.ones(4)
    sd = {"b": torch.zeros(4), "alias": w, "a": w, "c": torch.ones(4) * 2}
    r = export_safetensors(sd, tmp_path / "o", max_shard_size=16, key_order=["c", "a", "zz", "a"])
    assert r.tied == {"alias": "a"}  # "a" comes first in key_order: it is stored
    wm = _file_of(json.loads((tmp_path / "o" / INDEX_NAME).read_text()))
    assert wm == {  # c, a listed first; then b (alias is a tie) in the state dict's order
        "c": "model-00001-of-00003.safetensors",
        "a": "model-00002-of-00003.safetensors",
        "b": "model-00003-of-00003.safetensors",
    }


def _ordered_files(wm: dict[str, str], order: list[str]) -> list[str]:
    return [wm[k] for k in order if k in wm]


def test_module_key_order_of_a_zckpt_checkpoint_is_its_state_dict_order(tmp_path: Path) -> None:
    m = torch.nn.Sequential()
    m.add_module("z", torch.nn.Linear(3, 4))
    m.add_module("a", torch.nn.BatchNorm1d(4))
    m.add_module("m", torch.nn.Linear(4, 2))
    sd = m.state_dict()
    module = {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}
    master = {k: v for k, v in sd.items() if "running" not in k and v.is_floating_point()}
    state = {"module": module, "master": master}
    zckpt.save_checkpoint(tmp_path / "ck", state, zckpt.ZeroSpec(2, 2), tag="t")
    fp32 = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path / "ck")
    assert module_key_order(tmp_path / "ck") == list(sd) == list(fp32)


def test_deepspeed_export_follows_the_recorded_module_order(tmp_path: Path) -> None:
    w = {n: torch.randn(8) for n in ("embed.weight", "fc.weight", "fc.bias", "norm.weight")}
    groups = [["embed.weight", "fc.weight"], ["fc.bias", "norm.weight"]]  # decay / no decay
    write_zero_checkpoint(
        tmp_path / "ds", w, world_size=2, stage=2, groups=groups,
        frozen={"proj.weight": torch.randn(8).bfloat16()}, tied={"head.weight": "embed.weight"},
    )  # fmt: skip
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path / "ds", lazy_mode=True)
    order = module_key_order(tmp_path / "ds")
    assert order == [*w, "proj.weight", "head.weight"]  # what the model states' module records
    assert list(sd) != order  # zero_to_fp32's order: frozen first, then by param group
    r = export_safetensors(sd, tmp_path / "o", max_shard_size=64, key_order=order)
    wm = _file_of(json.loads((tmp_path / "o" / INDEX_NAME).read_text()))
    files = [os.path.basename(f) for f in r.files]
    assert _ordered_files(wm, order) == [files[0], files[0], files[1], files[1], files[2]]
    assert r.tied == {"head.weight": "embed.weight"}


FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed" / "z2_ws2_bf16"


@pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"no DeepSpeed fixture at {FIXTURE}")
@pytest.mark.parametrize("where", ["checkpoint", "universal"])
def test_real_deepspeed_checkpoint_exports_in_module_order(tmp_path: Path, where: str) -> None:
    path = FIXTURE / where
    order = module_key_order(path)
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(path)
    assert set(order) == set(sd) and list(sd) != order
    assert order.index("fc1.bias") < order.index("fc2.weight")  # the module's order
    r = export_safetensors(sd, tmp_path / "o", max_shard_size=1, key_order=order)
    wm = _file_of(json.loads((tmp_path / "o" / INDEX_NAME).read_text()))
    names = [os.path.basename(f) for f in r.files]  # limit 1 byte: one tensor per file
    assert _ordered_files(wm, order) == names
    assert r.tied == {"head.weight": "embed.weight"}
