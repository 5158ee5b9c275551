"""``zckpt inspect --json``: one schema for zckpt and DeepSpeed checkpoints (regular and
universal), documented in docs/cli.md. Same keys in the same order, same JSON types; the files
counted as ``verify`` counts them; a DeepSpeed checkpoint's tensors, ties and frozen names are
those ``zckpt convert`` stores (checked against a real conversion of the fixtures)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.cli import main
from zckpt.cli._inspect import FP32_KEYS, INSPECT_SCHEMA, TENSOR_KEYS
from zckpt.interop import convert_deepspeed

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"
NO_FIXTURES = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no fixtures at {FIXTURES}")

#: Regular and universal DeepSpeed checkpoints: stages 1-3, a tie, frozen, MoE, excluded frozen.
DS_CASES = [
    "z1_ws2_fp16/checkpoint",
    "z2_ws2_bf16/checkpoint",
    "z3_ws2_bf16/checkpoint",
    "z3_ws2_fp32/checkpoint",
    "z2_ws2_bf16_moe/checkpoint",
    "z2_ws2_bf16_exclude_frozen/checkpoint",
    "z2_ws2_bf16/universal",
    "z3_ws2_bf16/universal",
]
ALL_DS_CASES = (
    sorted(
        str(p.relative_to(FIXTURES))
        for p in [*FIXTURES.glob("z*/checkpoint"), *FIXTURES.glob("z*/universal")]
    )
    if FIXTURES.is_dir()
    else []
)


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _zckpt_ckpts(tmp: Path) -> list[Path]:
    """zckpt checkpoints that differ where the schema could: ties, experts, no client
    state, no module (no fp32 state dict), no latest."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 8, generator=g)
    master = {"embed.weight": emb, "head.weight": emb, "b": torch.zeros(8)}
    half: dict[int, torch.Tensor] = {}
    state = {
        "module": {k: half.setdefault(id(v), v.bfloat16()) for k, v in master.items()},
        "master": master,
        "optimizer": {"state": {"b": {"exp_avg": torch.zeros(8), "step": torch.tensor(3.0)}}},
    }
    zckpt.save_checkpoint(tmp / "tied", state, zckpt.ZeroSpec(4, 2), tag="s", codec="byteplane",
                          client_state={"epoch": 1})  # fmt: skip
    moe = {"module": {f"experts.{e}.w": torch.ones(4) for e in range(2)} | {"g": torch.ones(4)}}
    spec = zckpt.ZeroSpec(2, 1, experts=(r"experts\.(\d+)\.",))
    zckpt.save_checkpoint(tmp / "moe", moe, spec, tag="t", save_latest=False)
    zckpt.save_checkpoint(tmp / "plain", {"w": torch.ones(3)}, zckpt.ZeroSpec(1, 3), tag="u")
    return [tmp / "tied", tmp / "moe" / "t", tmp / "plain"]


def _check_schema(doc: dict[str, Any]) -> None:
    assert list(doc) == list(INSPECT_SCHEMA)
    for key, types in INSPECT_SCHEMA.items():
        allowed = tuple(type(None) if t is None else t for t in types)
        assert type(doc[key]) in allowed, (key, doc[key])  # exact: a bool is no int here
    for t in doc["tensors"]:
        assert list(t) == list(TENSOR_KEYS)
        assert [type(t[k]) for k in ("path", "dtype", "shape", "bytes", "stored")] == [
            str, str, list, int, int,
        ]  # fmt: skip
        assert t["ratio"] is None or type(t["ratio"]) is float
    for t in doc["fp32_state_dict"]:
        assert list(t) == list(FP32_KEYS)
    assert all(type(x) is str for x in doc["tags"] + doc["frozen"])
    assert all(type(a) is str and type(b) is str for a, b in doc["tied"].items())
    # the files line's parts add up, as they do for both formats
    parts = doc["rank_blobs"] + doc["expert_blobs"] + doc["shared_files"]
    assert doc["files"] == parts + doc["client_state_blob"]


@NO_FIXTURES
def test_zckpt_and_deepspeed_give_the_same_keys_and_types(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = [_json(capsys, "inspect", str(FIXTURES / c)) for c in DS_CASES]
    docs += [_json(capsys, "inspect", str(p)) for p in _zckpt_ckpts(tmp_path)]
    for doc in docs:
        _check_schema(doc)
    assert {d["format"] for d in docs} == {"zckpt", "deepspeed"}
    assert {d["universal"] for d in docs if d["format"] == "deepspeed"} == {True, False}


def test_the_schema_is_documented() -> None:
    documented = (REPO / "docs" / "cli.md").read_text()
    for key in [*INSPECT_SCHEMA, *TENSOR_KEYS]:
        assert f"| `{key}` |" in documented or f"`{key}`" in documented, key
    table = documented.split("## inspect", 1)[1].split("## verify", 1)[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")]
    # one row per key (a row may name two keys: "`world_size`, `stage`"), in the schema's order
    named = [k.strip(" `") for row in rows for k in row.split(",")]
    assert named == list(INSPECT_SCHEMA)


@NO_FIXTURES
@pytest.mark.parametrize("case", DS_CASES)
def test_deepspeed_files_are_counted_as_verify_counts_them(
    case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = FIXTURES / case
    doc = _json(capsys, "inspect", str(d))
    tag_dir = Path(doc["path"])
    on_disk = sorted(tag_dir.rglob("*.pt"))
    if doc["universal"]:  # zero/<p>/ of a frozen parameter, a buffer or a tie is not read
        trained = {t["path"][7:] for t in doc["tensors"] if t["path"].startswith("master/")}
        on_disk = [p for p in on_disk if p.parent.parent.name != "zero" or p.parent.name in trained]
    rank = [p for p in on_disk if "zero_pp_rank_" in p.name]
    expert = [p for p in on_disk if p.name.startswith("layer_") and "_expert_" in p.name]
    got = (doc["files"], doc["rank_blobs"], doc["expert_blobs"], doc["shared_files"])
    assert got == (len(on_disk), len(rank), len(expert), len(on_disk) - len(rank) - len(expert))
    assert doc["client_state_blob"] is False
    assert doc["bytes_on_disk"] == sum(p.stat().st_size for p in on_disk)
    ver = _json(capsys, "verify", str(d))
    assert ver["files"] == doc["files"] and ver["tags"][0]["files"] == doc["files"]
    assert main(["inspect", str(d)]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("files: "))
    assert main(["verify", str(d)]) == 0
    # verify says what inspect says: "3 files (2 rank files + 1 shared file)"
    assert f"{doc['files']} files {line.split(' ', 2)[2]} load" in capsys.readouterr().out


def test_verify_json_has_one_layout_for_a_tag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    z = _json(capsys, "verify", str(_zckpt_ckpts(tmp_path)[0]))
    assert z["format"] == "zckpt" and z["ok"] is True
    if FIXTURES.is_dir():
        ds = _json(capsys, "verify", str(FIXTURES / "z2_ws2_bf16" / "checkpoint"))
        assert list(ds) == list(z) and ds["format"] == "deepspeed"
        assert [list(t) for t in ds["tags"]] == [list(t) for t in z["tags"]]


def _as_converted(doc: dict[str, Any]) -> dict[str, Any]:
    """What a DeepSpeed checkpoint and its conversion must agree on."""
    return {
        "world_size": doc["world_size"],
        "stage": doc["stage"],
        "tag": doc["tag"],
        "dtype": doc["dtype"],
        "frozen": doc["frozen"],
        "tied": doc["tied"],
        "tensors": [{k: t[k] for k in ("path", "dtype", "shape", "bytes")} for t in doc["tensors"]],
        "client_state": doc["client_state"],
        # DeepSpeed's fp32 state dict is in zero_to_fp32's order, a zckpt one in the module's
        "fp32_state_dict": sorted(doc["fp32_state_dict"], key=lambda t: t["path"]),
    }


def _check_against_convert(case: str, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = FIXTURES / case
    ds = _json(capsys, "inspect", str(src))
    convert_deepspeed(src, tmp / "z")
    z = _json(capsys, "inspect", str(tmp / "z"))
    assert _as_converted(ds) == _as_converted(z)
    for t in ds["tensors"]:
        # what DeepSpeed's files hold: everything, but stage 3's 16-bit trainable weights
        unsaved = ds["stage"] == 3 and t["path"].startswith("module/")
        unsaved = unsaved and f"master/{t['path'][7:]}" in {u["path"] for u in ds["tensors"]}
        assert t["stored"] == (0 if unsaved else t["bytes"]), t


@NO_FIXTURES
@pytest.mark.parametrize("case", DS_CASES)
def test_deepspeed_tensors_are_those_convert_stores(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _check_against_convert(case, tmp_path, capsys)


@pytest.mark.slow
@NO_FIXTURES
@pytest.mark.parametrize("case", [c for c in ALL_DS_CASES if c not in DS_CASES])
def test_deepspeed_tensors_are_those_convert_stores_every_fixture(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _check_against_convert(case, tmp_path, capsys)


@NO_FIXTURES
def test_text_shows_the_same_lines_for_both_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def heads(path: str | os.PathLike[str]) -> list[str]:
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out.splitlines()
        return [s.split(":")[0].split(" (")[0] for s in out if not s.startswith("  ")]

    ds = heads(FIXTURES / "z2_ws2_bf16" / "checkpoint")
    z = heads(_zckpt_ckpts(tmp_path)[0])
    own = {"universal", "deepspeed_version", "blob_format_version", "zckpt_version"}
    assert [h for h in ds if h not in own] == [h for h in z if h not in own]
    assert "tensors" in ds and "fp32 state dict" in ds and "tied" in ds
    assert "None" not in " ".join(ds + z)
