"""Reading DCP checkpoints (torch.distributed.checkpoint): real ones written by torch itself in
this process and by 2 and 3 real ranks (DTensor Shard(0)/Shard(1)/Replicate, FSDP2), checked
bit for bit against torch's own ``dcp_to_torch_save``; random shardings in one process; the
commands (inspect, verify, consolidate, convert)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dcp_support import assert_same, dcp_save, spawn_dcp, torch_reads, write_dcp
from hypothesis import given
from hypothesis import strategies as st

import zckpt
from zckpt.cli import main
from zckpt.interop import (
    convert_dcp,
    dcp_state_dict,
    is_dcp_checkpoint,
    is_deepspeed_checkpoint,
    open_dcp,
)
from zckpt.interop._dcp_metadata import DcpChunk
from zckpt.interop._dcp_state import chunk_runs, export_values
from zckpt.interop._stream import FileRanges
from zckpt.store._fp32 import LazyTensor


def _mixed_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "model": {
            "w": torch.randn(5, 3, generator=g),
            "b": torch.randn(4, generator=g).bfloat16(),
            "t": torch.arange(6).reshape(2, 3).T,  # saved with its strides (not a copy)
            "n": torch.tensor(3.5),
            "e": torch.zeros(0, 2),
            "h": torch.randn(2, 2, generator=g).half(),
            "m": torch.tensor([True, False]),
        },
        "step": 11,
        "extra": {"names": ["a", "b"], "lr": 0.25, "none": None},
        "groups": [{"lr": 0.1, "params": [0, 1]}],
    }


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("dcp1") / "ckpt"
    state = _mixed_state()
    dcp_save(state, d)
    return d, state


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    work = tmp_path_factory.mktemp("dcp3")
    ck = spawn_dcp(work, 3, "dtensor")
    return ck, torch.load(work / "expected.pt")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    work = tmp_path_factory.mktemp("fsdp2")
    ck = spawn_dcp(work, 2, "fsdp")
    return ck, torch.load(work / "expected.pt")


def test_one_process_is_torchs_reading_bit_for_bit(one: tuple[Path, dict[str, Any]]) -> None:
    d, state = one
    assert is_dcp_checkpoint(d) and not is_deepspeed_checkpoint(d)
    got = dcp_state_dict(d)
    assert_same(got, torch_reads(d))
    assert torch.equal(got["model"]["t"], state["model"]["t"])
    assert got["groups"] == state["groups"] and got["extra"] == state["extra"]
    lazy = dcp_state_dict(d, lazy_mode=True)
    assert isinstance(lazy["model"]["w"], LazyTensor)
    assert_same(lazy["model"]["w"].contiguous(), got["model"]["w"])


def test_three_ranks_dtensor_shardings(three: tuple[Path, dict[str, torch.Tensor]]) -> None:
    d, full = three
    ck = open_dcp(d)
    assert ck.ranks == 3
    chunks = {n: len(t.chunks) for n, t in ck.metadata.tensors.items()}
    assert chunks["model.rows"] == 3 and chunks["model.cols"] == 3 and chunks["model.rep"] == 1
    got = dcp_state_dict(d)
    assert_same(got, torch_reads(d))
    for k, v in full.items():
        assert_same(got["model"][k], v, k)
    assert torch.equal(got["plain"], torch.arange(6, dtype=torch.int32))
    assert got["extra"] == {"epoch": 3, "lr": 0.5, "names": ["a", "b"]}


def test_fsdp2_model_and_optimizer(fsdp: tuple[Path, dict[str, torch.Tensor]]) -> None:
    d, full = fsdp
    got = dcp_state_dict(d)
    assert_same(got, torch_reads(d))
    assert set(got) == {"model", "optim"}
    for k in full:
        assert got["model"][k].shape == full[k].shape  # trained one step: values moved
    assert got["optim"]["param_groups"][0]["params"] == list(full)
    assert got["optim"]["state"]["0.weight"]["exp_avg"].shape == (7, 5)


def test_export_values_are_file_ranges_across_shardings(
    three: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    d, full = three
    sd, left_out = export_values(d)
    assert left_out == ["extra.epoch", "extra.lr", "extra.names"]
    cols = sd["model.cols"]  # Shard(1): one byte range per row and rank
    assert isinstance(cols, FileRanges) and len(cols.ranges) == 4 * 3
    rows = sd["model.rows"]  # Shard(0): one range per rank
    assert isinstance(rows, FileRanges) and len(rows.ranges) == 3
    for k, v in full.items():
        assert_same(sd[f"model.{k}"].contiguous(), v, k)


def test_non_contiguous_chunks_are_assembled(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    chunks = [(0, (0, 0), (4, 3)), (1, (0, 3), (4, 3))]
    write_dcp(tmp_path, {"w": (w, chunks)}, store=lambda c: c.T.contiguous().T)
    sd, _ = export_values(tmp_path)
    assert isinstance(sd["w"], LazyTensor)  # its bytes are no byte ranges in row order
    assert torch.equal(sd["w"].contiguous(), w)
    assert_same(dcp_state_dict(tmp_path), torch_reads(tmp_path))


@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    data=st.data(),
)
def test_chunk_runs_are_the_box_in_row_major_order(shape: list[int], data: st.DataObject) -> None:
    offsets = [data.draw(st.integers(0, n)) for n in shape]
    sizes = [data.draw(st.integers(0, n - o)) for n, o in zip(shape, offsets)]
    runs = chunk_runs(tuple(shape), DcpChunk(tuple(offsets), tuple(sizes)))
    flat = np.arange(math.prod(shape)).reshape(shape)
    want = flat[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1)
    got = [g + i for g, _local, n in runs for i in range(n)]
    assert got == want.tolist()
    assert [local for _, local, _ in runs] == [
        sum(n for *_, n in runs[:i]) for i in range(len(runs))
    ]


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.float64)


@st.composite
def _sharded(
    draw: st.DrawFn,
) -> tuple[torch.Tensor, list[tuple[int, tuple[int, ...], tuple[int, ...]]]]:
    """A tensor and a tiling of it into boxes (cuts along every dimension, some chunks empty),
    each box held by a random one of up to 4 ranks."""
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(_DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g) * 100).to(dtype)
    cuts = []
    for n in shape:
        inner = draw(st.lists(st.integers(0, n), max_size=3))
        cuts.append(sorted({0, n, *inner}) if n else [0, 0])
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((), ())]
    for c in cuts:
        boxes = [((*o, a), (*s, b - a)) for o, s in boxes for a, b in zip(c, c[1:])]
    ranks = draw(st.integers(1, 4))
    return t, [(draw(st.integers(0, ranks - 1)), o, s) for o, s in boxes]


@given(tensors=st.lists(_sharded(), min_size=1, max_size=3), transposed=st.booleans())
def test_random_shardings_read_as_torch_reads_them(
    tmp_path_factory: pytest.TempPathFactory, tensors: list[Any], transposed: bool
) -> None:
    d = tmp_path_factory.mktemp("prop")

    def store(c: torch.Tensor) -> torch.Tensor:
        return c.T.contiguous().T if transposed and c.dim() == 2 else c.clone()

    named = {f"t{i}": v for i, v in enumerate(tensors)}
    write_dcp(d, named, {"step": 1}, store=store)
    got = dcp_state_dict(d)
    assert_same(got, torch_reads(d))
    for name, (full, _) in named.items():
        assert_same(got[name], full, name)


def test_cli_inspect_and_verify(three: tuple[Path, dict[str, torch.Tensor]], capsys: Any) -> None:
    from zckpt.cli._inspect import INSPECT_SCHEMA

    d, _ = three
    assert main(["inspect", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert list(info) == list(INSPECT_SCHEMA)
    assert (info["format"], info["world_size"], info["rank_blobs"]) == ("dcp", 3, 3)
    assert info["client_state"] == {"extra.epoch": 3, "extra.lr": 0.5, "extra.names": ["a", "b"]}
    assert main(["inspect", str(d)]) == 0
    assert "model.cols" in capsys.readouterr().out
    assert main(["verify", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["format"] == "dcp" and doc["files"] == 4


def test_cli_consolidate_safetensors_and_pt(
    three: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, capsys: Any
) -> None:
    from safetensors.torch import load_file

    d, full = three
    out = tmp_path / "m.safetensors"
    # By default the module's tensors (under "model"), by their names in it: a model file.
    assert main(["consolidate", str(d), str(out), "--quiet"]) == 0
    assert "left out" not in capsys.readouterr().out  # the values are not the module's
    got = load_file(out)
    assert set(got) == set(full)
    for k, v in full.items():
        want = v.float() if v.is_floating_point() else v  # --dtype fp32, the default
        assert_same(got[k], want, k)
    every = tmp_path / "all.safetensors"
    assert main(["consolidate", str(d), str(every), "--all-tensors", "--quiet"]) == 0
    assert "left out 3 non-tensor value(s)" in capsys.readouterr().out
    got = load_file(every)
    assert set(got) == {f"model.{k}" for k in full} | {"plain"}
    for k, v in full.items():
        assert_same(got[f"model.{k}"], v.float() if v.is_floating_point() else v, k)
    shards = tmp_path / "hf"
    assert main(["consolidate", str(d), f"{shards}/", "--dtype", "bf16", "--quiet"]) == 0
    got = {k: v for f in shards.glob("*.safetensors") for k, v in load_file(f).items()}
    assert_same(got["rows"], full["rows"].bfloat16())
    pt = tmp_path / "all.pt"
    assert main(["consolidate", str(d), str(pt), "--dtype", "fp32", "--quiet"]) == 0
    ref = torch_reads(d)
    ref["model"] = {k: v.float() if v.is_floating_point() else v for k, v in ref["model"].items()}
    assert_same(torch.load(pt), ref)


def test_convert_loads_at_any_world_size(
    fsdp: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    d, _ = fsdp
    want = dcp_state_dict(d)
    saved = convert_dcp(d, tmp_path / "z", tag="step1")
    assert saved.tag == "step1"
    whole = zckpt.load_checkpoint(tmp_path / "z")
    assert_same(whole.state, want)
    w = want["model"]["0.weight"].reshape(-1)
    parts = [zckpt.load_checkpoint(tmp_path / "z", world_size=3, rank=r) for r in range(3)]
    assert torch.equal(torch.cat([p.state["model"]["0.weight"] for p in parts])[: w.numel()], w)
    assert main(["convert", "--from", "dcp", str(d), str(tmp_path / "c"), "--tag", "s"]) == 0
    assert_same(zckpt.load_checkpoint(tmp_path / "c").state, want)


def test_reshard_points_to_convert(
    one: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: Any
) -> None:
    d, _ = one
    assert main(["reshard", str(d), str(tmp_path / "r"), "--world-size", "2"]) == 1
    assert (
        "is a DCP checkpoint: import it with 'zckpt convert --from dcp" in capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()


# -- get_fp32_state_dict_from_zero_checkpoint of a DCP checkpoint ---------------------------


def _upcast(t: torch.Tensor) -> torch.Tensor:
    narrow = t.is_floating_point() and t.element_size() < 4
    return t.float() if narrow else t


@pytest.mark.parametrize("lazy", [False, True])
def test_fp32_state_dict_is_the_model_upcast(one: tuple[Path, dict[str, Any]], lazy: bool) -> None:
    d, _ = one
    want = torch_reads(d)["model"]
    got = zckpt.get_fp32_state_dict_from_zero_checkpoint(d, lazy_mode=lazy)
    assert list(got) == list(want)  # the model's keys, without DCP's "model." prefix
    for k, v in want.items():
        g = got[k].contiguous() if lazy else got[k]
        assert_same(g, _upcast(v), k)
    assert got["b"].dtype == torch.float32 and got["m"].dtype == torch.bool


def test_fp32_state_dict_of_fsdp2_loads_into_the_model(
    fsdp: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    d, full = fsdp
    got = zckpt.get_fp32_state_dict_from_zero_checkpoint(d)
    assert set(got) == set(full)  # no optimizer state
    want = torch_reads(d)["model"]
    for k in full:
        assert_same(got[k], _upcast(want[k]), k)


def test_fp32_state_dict_bare_model_and_tag(tmp_path: Path) -> None:
    # dcp.save(model.state_dict()): no "model" key, so every tensor is the module's, by its
    # own name (an HF module's "model." prefix is its own, kept); fp64 is not narrowed.
    g = torch.Generator().manual_seed(3)
    sd = {
        "model.embed.weight": torch.randn(5, 3, generator=g).half(),
        "lm_head.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "count": torch.tensor([4], dtype=torch.int64),
    }
    dcp_save(sd, tmp_path / "run" / "step-3")
    got = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path / "run", tag="step-3")
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert_same(got[k], _upcast(v), k)
    assert got["lm_head.weight"].dtype == torch.float64
