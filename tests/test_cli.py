"""The ``zckpt`` command through ``main(argv)``: output, exit codes, errors, JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peak_child import run_child
from safetensors.torch import load_file

import zckpt
import zckpt.testing
from zckpt.cli import main
from zckpt.format import decode_header

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    b = torch.randn(64, generator=g)
    return {
        "module": {"fc.weight": w.bfloat16(), "fc.bias": b.bfloat16()},
        "master": {"fc.weight": w, "fc.bias": b},
        "optimizer": {"state": {"fc.weight": {"exp_avg": torch.zeros(64, 32)}}},
        "global_steps": 7,
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    for tag in ("step5", "step7"):
        zckpt.save_checkpoint(
            d, _state(), zckpt.ZeroSpec(4, 2), tag=tag, client_state={"epoch": 2}, codec="zstd"
        )
    return d


def test_inspect_text_and_json(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "tags: step5, step7" in out and "latest: step7" in out
    assert "world_size: 4" in out and "stage: 2" in out
    assert "master/fc.weight" in out and '"epoch": 2' in out
    assert main(["inspect", str(ckpt), "--tag", "step5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tag"] == "step5" and doc["world_size"] == 4 and doc["stage"] == 2
    t = {x["path"]: x for x in doc["tensors"]}["master/fc.weight"]
    assert t["dtype"] == "fp32" and t["shape"] == [64, 32] and t["bytes"] == 64 * 32 * 4
    assert t["stored"] > 0 and t["ratio"] > 0
    zeros = {x["path"]: x for x in doc["tensors"]}["optimizer/state/fc.weight/exp_avg"]
    assert zeros["ratio"] > 10  # zstd on zeros
    assert doc["client_state"] == {"epoch": 2}


def test_verify_ok(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "step5: 5 files" in out and "step7: 5 files" in out and "2 tags checked: all OK" in out
    assert main(["verify", str(ckpt), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["problems"] == [] and doc["files"] == 10
    assert [t["tag"] for t in doc["tags"]] == ["step5", "step7"]
    assert main(["verify", str(ckpt), "--tag", "step5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tag"] == "step5" and doc["files"] == 5


def test_verify_flipped_byte_names_file_tensor_offset(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = zckpt.open_checkpoint(ckpt)
    rec = next(r for r in ck.manifest.files if r.rank == 1)
    path = Path(ck.file_path(rec))
    blob = bytearray(path.read_bytes())
    h = decode_header(bytes(blob))
    entry = next(e for e in h.fragments if h.skeleton.name(e.fragment.leaf) == "master/fc.weight")
    chunk = entry.chunks[0]
    blob[chunk.offset + 3] ^= 0x10
    path.write_bytes(bytes(blob))
    assert main(["verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "master/fc.weight" in x)
    assert str(path) in line and f"byte offset {chunk.offset}" in line
    assert "problem" in out.splitlines()[-1]
    assert main(["verify", str(ckpt), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and any("whole-file xxh3" in p for p in doc["problems"])


def test_verify_missing_and_truncated_files(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = zckpt.open_checkpoint(ckpt)
    a, b = ck.manifest.files[0], ck.manifest.files[2]
    os.remove(ck.file_path(a))
    with open(ck.file_path(b), "r+b") as f:
        f.truncate(b.size - 7)
    assert main(["verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert f"{ck.file_path(a)}: missing" in out
    assert f"{ck.file_path(b)}: {b.size - 7} bytes on disk, the manifest says {b.size}" in out


def test_errors_are_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zckpt: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    with pytest.raises(zckpt.CheckpointNotFoundError):
        main(["inspect", str(tmp_path / "nope"), "--debug"])
    assert main(["verify"]) == 2  # usage error: argparse's own message
    assert "usage:" in capsys.readouterr().err


def test_consolidate_safetensors_single_sharded_and_pt(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    want = zckpt.get_fp32_state_dict_from_zero_checkpoint(ckpt)
    one = tmp_path / "m.safetensors"
    assert main(["consolidate", str(ckpt), str(one)]) == 0
    got = load_file(one)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["consolidate", str(ckpt), str(tmp_path / "sh"), "--max-shard-size", "300B"]) == 0
    idx = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(want)
    assert main(["consolidate", str(ckpt), str(tmp_path / "b.safetensors"), "--dtype", "bf16"]) == 0
    assert load_file(tmp_path / "b.safetensors")["fc.weight"].dtype == torch.bfloat16
    assert main(["consolidate", str(ckpt), str(tmp_path / "m.pt"), "--lazy", "--tag", "step5"]) == 0
    pt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.equal(pt["fc.weight"], want["fc.weight"])
    assert "wrote" in capsys.readouterr().out


def test_consolidate_in_process_leaves_the_collector_as_it_was(ckpt: Path, tmp_path: Path) -> None:
    """consolidate freezes the collector's heap for its own speed; called in-process it must
    thaw it, else every object the caller had stays uncollectable for the rest of its life."""
    import gc

    assert gc.get_freeze_count() == 0
    assert main(["consolidate", str(ckpt), str(tmp_path / "m.safetensors")]) == 0
    assert gc.get_freeze_count() == 0


def test_reshard_keeps_tag_client_state_and_values(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "re"
    args = ["reshard", str(ckpt), str(out), "--world-size", "3", "--stage", "3", "--codec", "raw"]
    assert main(args) == 0
    assert "world size 4 -> 3, stage 2 -> 3" in capsys.readouterr().out
    ck = zckpt.open_checkpoint(out)
    assert ck.tag == "step7" and ck.manifest.spec.world_size == 3 and ck.manifest.spec.stage == 3
    a = zckpt.load_checkpoint(ckpt, world_size=1)
    b = zckpt.load_checkpoint(out, world_size=1)
    assert b.client_state == {"epoch": 2}
    zckpt.testing.assert_states_equal(b.state, a.state)


def test_prune_and_clean(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ckpt / "torn").mkdir()
    assert main(["prune", str(ckpt), "--keep-last", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["deleted step5", "kept 1: step7"]
    assert main(["clean", str(ckpt)]) == 0
    assert "removed torn" in capsys.readouterr().out
    assert main(["prune", str(ckpt), "--keep-last", "0"]) == 1
    assert "--keep-last" in capsys.readouterr().err


def _ds_case() -> Path:
    cases = sorted(p for p in FIXTURES.glob("z2_ws2_*") if p.is_dir()) if FIXTURES.is_dir() else []
    if not cases:
        pytest.skip("DeepSpeed fixtures not found")
    return cases[0]


def test_deepspeed_inspect_verify_consolidate_convert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _ds_case()
    case = root / "checkpoint"
    assert main(["inspect", str(case), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "deepspeed" and doc["world_size"] == 2 and doc["stage"] == 2
    assert doc["fp32_state_dict"]
    assert main(["verify", str(case)]) == 0
    capsys.readouterr()
    out = tmp_path / "m.safetensors"
    assert main(["consolidate", str(case), str(out)]) == 0
    want = load_file(root / "expected_fp32.safetensors")
    got = load_file(out)
    assert set(got) <= set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert "frozen_proj.weight" in got
    ex = tmp_path / "ex.safetensors"
    assert main(["consolidate", str(case), str(ex), "--exclude-frozen"]) == 0
    assert set(load_file(ex)) == set(got) - {"frozen_proj.weight"}
    assert main(["convert", "--from", "deepspeed", str(case), str(tmp_path / "z")]) == 0
    assert main(["verify", str(tmp_path / "z")]) == 0
    assert main(["reshard", str(case), str(tmp_path / "r"), "--world-size", "3"]) == 0
    assert zckpt.open_checkpoint(tmp_path / "r").manifest.spec.world_size == 3


def test_python_dash_m_and_console_script(ckpt: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    r = subprocess.run(
        [sys.executable, "-m", "zckpt.cli", "verify", str(ckpt), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 0 and ": OK" in r.stdout and r.stderr == "", r
    # The script pip installed beside this interpreter (a venv's bin/), else one on PATH.
    beside = Path(sys.executable).parent / "zckpt"
    exe = str(beside) if beside.exists() else shutil.which("zckpt")
    if exe is None:
        pytest.skip("the zckpt console script is not installed")
    r = subprocess.run(
        [exe, "inspect", "/nonexistent"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 1 and r.stderr.startswith("zckpt: error: ")


RESHARD_CHILD = r"""
from zckpt.cli import main

src, small, out = sys.argv[1], sys.argv[2], sys.argv[3]
main(["reshard", small, out + "/warm", "--world-size", "2", "--quiet"])  # imports, kernels
start()
code = main(["reshard", src, out + "/new", "--world-size", "4", "--stage", "3", "--quiet"])
done(code=code)
"""


def test_reshard_holds_one_shard_not_the_state(tmp_path: Path) -> None:
    """Each new rank's shard is assembled from the old files, written and dropped."""
    g = torch.Generator().manual_seed(0)
    master = {f"p{i}": torch.randn(1 << 20, generator=g) for i in range(24)}  # 96 MiB
    state = {"master": master, "global_steps": 3}
    zckpt.save_checkpoint(tmp_path / "src", state, zckpt.ZeroSpec(2, 2), tag="t")
    small = {"master": {k: v[:100] for k, v in master.items()}, "global_steps": 3}
    zckpt.save_checkpoint(tmp_path / "small", small, zckpt.ZeroSpec(2, 2), tag="t")
    r = run_child(RESHARD_CHILD, tmp_path / "src", tmp_path / "small", tmp_path)
    assert r["code"] == 0
    assert r["growth_mib"] <= 24 + 16 + 24, r  # a quarter of the state + read buffers + slack
    got = zckpt.load_checkpoint(tmp_path / "new", world_size=1).state
    zckpt.testing.assert_states_equal(got, state)


def test_reshard_keeps_experts_and_excluded_frozen(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    master = {
        "moe.experts.0.w": torch.randn(40, generator=g),
        "moe.experts.1.w": torch.randn(40, generator=g),
        "dense.w": torch.randn(30, generator=g),
    }
    state = {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}
    spec = zckpt.ZeroSpec(4, 2, experts=(r"experts\.(\d+)\.",), expert_parallel_size=2)
    zckpt.save_checkpoint(
        tmp_path / "src", state, spec, tag="t", frozen=("dense.w",), exclude_frozen_parameters=True
    )
    assert main(["reshard", str(tmp_path / "src"), str(tmp_path / "new"), "--world-size", "2"]) == 0
    new = zckpt.open_checkpoint(tmp_path / "new")
    assert new.manifest.spec.experts == spec.experts and new.manifest.spec.world_size == 2
    assert sorted(f.expert for f in new.manifest.files if f.expert >= 0) == [0, 1]
    assert new.manifest.excluded_frozen and new.manifest.frozen == ("dense.w",)
    got = zckpt.load_checkpoint(tmp_path / "new", world_size=1).state
    want = zckpt.load_checkpoint(tmp_path / "src", world_size=1).state
    zckpt.testing.assert_states_equal(got, want)
    assert "dense.w" not in got["master"]
