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
from zckpt.interop._safetensors import INDEX_NAME, SINGLE_NAME, plan_safetensors_shards


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


def test_plan_is_ordered_and_bounded() -> None:
    assert plan_safetensors_shards([], 10) == []
    assert plan_safetensors_shards([3, 3, 3, 20, 3], 6) == [[0, 1], [2], [3], [4]]


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
