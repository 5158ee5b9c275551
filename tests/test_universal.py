"""DeepSpeed universal checkpoints (``ds_to_universal``'s output): the real fixtures bitwise against
DeepSpeed's own results for the checkpoint each was converted from, the same training state and
the same converted zckpt checkpoint as that regular checkpoint, the CLI, errors that name the
file, the pickle allow-list, and synthetic universal checkpoints for layouts the fixtures lack."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import zckpt
import zckpt.interop as zi
from zckpt.cli import main
from zckpt.interop._synthetic import write_zero_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"
# the case folders that hold universal/ (ds_to_universal's output) beside checkpoint/
CASES = (
    sorted(p.parent.parent for p in FIXTURES.glob("*/universal/latest_universal"))
    if FIXTURES.is_dir()
    else []
)
NO_FIXTURES = pytest.mark.skip(reason=f"no DeepSpeed universal fixtures at {FIXTURES}")
case_params = pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name) for c in CASES] or [pytest.param(None, marks=NO_FIXTURES)],
)


def info(case: Path) -> dict[str, Any]:
    return dict(json.loads((case / "case.json").read_text()))


def universal_tag(case: Path) -> str:
    return (case / "universal" / "latest_universal").read_text().strip()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same_tree(a: Any, b: Any, path: str = "") -> None:
    """Equal values, keys in the same order, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and same_bits(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def copy_universal(case: Path, dst: Path) -> Path:
    """A writable copy of the case's universal save_dir (real files, never symlinks)."""
    shutil.copytree(case / "universal", dst)
    return dst


# ---- the fixtures: what they are ----


@case_params
def test_fixture_universal_dir_was_converted_from_the_case_checkpoint(case: Path) -> None:
    """The assumption the comparisons below rest on, from the fixture generator's records:
    ds_to_universal ran on this case's checkpoint/step3, and DeepSpeed's universal loader gave
    exactly the in-process optimizer state in expected_optimizer.safetensors."""
    results = json.loads((FIXTURES / "cross_world_size_results.json").read_text())
    made = [r for r in results if r.get("label") == f"{case.name}_ds_to_universal"]
    assert made and made[-1]["rc"] == 0
    assert f"{case.name}/checkpoint/{info(case)['tag']} " in made[-1]["cmd"]
    assert f"--output_folder <OUT>/{case.name}/universal/{universal_tag(case)}" in made[-1]["cmd"]
    loads = [r for r in results if r.get("source_case") == case.name and r.get("ok")]
    loads = [r for r in loads if r.get("opts", {}).get("load_universal")]
    assert loads and all(r["max_abs_diff_vs_expected_optimizer"] == 0.0 for r in loads)
    # the model states were copied, byte for byte
    tag_dir = case / "universal" / universal_tag(case)
    for f in tag_dir.glob("*model_states.pt"):
        assert f.read_bytes() == (case / "checkpoint" / info(case)["tag"] / f.name).read_bytes()


# ---- detection and opening ----


@case_params
def test_universal_dirs_are_detected(case: Path) -> None:
    u, tag = case / "universal", universal_tag(case)
    for path, t in [(u, None), (u / tag, None), (u, tag)]:
        assert zi.is_deepspeed_checkpoint(path, t)
        ck = zi.open_deepspeed(path, t)
        assert ck.universal is not None and ck.tag == tag
        assert (ck.stage, ck.world_size) == (info(case)["stage"], info(case)["world_size"])
    regular = zi.open_deepspeed(case / "checkpoint")
    assert regular.universal is None


@case_params
def test_latest_is_followed_before_latest_universal(case: Path, tmp_path: Path) -> None:
    """One save_dir holding both kinds: ``latest`` (DeepSpeed's default load) decides."""
    root = tmp_path / "both"
    shutil.copytree(case / "checkpoint", root)
    shutil.copytree(case / "universal" / universal_tag(case), root / universal_tag(case))
    shutil.copy(case / "universal" / "latest_universal", root)
    assert zi.open_deepspeed(root).universal is None
    assert zi.open_deepspeed(root, universal_tag(case)).universal is not None
    (root / "latest").unlink()
    assert zi.open_deepspeed(root).universal is not None


# ---- bitwise against DeepSpeed ----


def equal_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, a 16-bit tensor against its exact fp32 upcast too (zckpt may upcast)."""
    if a.dtype != b.dtype and a.is_floating_point() and b.is_floating_point():
        wide = torch.float32
        a, b = a.to(wide), b.to(wide)
    return same_bits(a, b)


@case_params
@pytest.mark.parametrize("where", ["save_dir", "tag_dir", "tag"])
@pytest.mark.parametrize("lazy", [False, True])
def test_universal_fp32_state_dict_equals_the_source_checkpoints(
    case: Path, where: str, lazy: bool
) -> None:
    """The fp32 state dict of a universal checkpoint is the one zckpt reads from the checkpoint
    it came from (same keys in the same order, dtypes, bits and tied tensors), and holds
    zero_to_fp32's values for it: every key of DeepSpeed's output, in its order, bit for bit."""
    u, tag = case / "universal", universal_tag(case)
    path, t = {"save_dir": (u, None), "tag_dir": (u / tag, None), "tag": (u, tag)}[where]
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(path, t, lazy_mode=lazy)
    c = info(case)
    if lazy:
        assert all(isinstance(v, zckpt.LazyTensor) for v in sd.values())
        sd = {k: v.contiguous() for k, v in sd.items()}
        for alias, target in c["model"]["tied"].items():
            sd[alias] = sd[target]
    regular = zckpt.get_fp32_state_dict_from_zero_checkpoint(case / "checkpoint")
    assert list(sd) == list(regular)
    assert all(same_bits(sd[k], regular[k]) for k in regular)
    keys = c["checks"]["zero_to_fp32"]["keys"]
    assert [k for k in sd if k in keys] == keys
    expected = load_file(case / "expected_fp32.safetensors")
    for k in keys:
        assert equal_values(sd[k], expected[k]), k
    for alias, target in c["model"]["tied"].items():
        assert sd[alias] is sd[target]


@case_params
def test_universal_exclude_frozen(case: Path) -> None:
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(
        case / "universal", exclude_frozen_parameters=True
    )
    full = zckpt.get_fp32_state_dict_from_zero_checkpoint(case / "checkpoint")
    assert list(sd) == [k for k in full if k not in info(case)["model"]["frozen"]]


@case_params
def test_universal_optimizer_state_equals_deepspeed(case: Path) -> None:
    """fp32 masters, exp_avg, exp_avg_sq and Adam's step: DeepSpeed's in-process values (which
    its universal loader restores exactly), and the param groups' hyperparameters."""
    state, spec, _, client = zi.deepspeed_training_state(zi.open_deepspeed(case / "universal"))
    opt = load_file(case / "expected_optimizer.safetensors")
    with safe_open(case / "expected_optimizer.safetensors", "pt") as f:
        meta = dict(f.metadata())
    steps, lrs = json.loads(meta["adam_step"]), json.loads(meta["lr"])
    assert opt
    for key, t in opt.items():
        kind, name = key.split("/", 1)
        got = state["master"][name] if kind == "fp32" else state["optimizer"]["state"][name][kind]
        assert same_bits(got, t), key
        assert float(state["optimizer"]["state"][name]["step"]) in steps
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == lrs
    c = info(case)
    assert client == c["client_state"]
    assert state["global_steps"] == c["after_step3"]["global_steps"]
    assert state["lr_scheduler"] == {"last_batch_iteration": 2}
    assert (spec.world_size, spec.stage) == (c["world_size"], c["stage"])


@case_params
def test_universal_training_state_equals_the_regular_one(case: Path) -> None:
    """Everything the regular checkpoint's import holds, bit for bit: module (16-bit weights,
    buffers, frozen parameters from the copied model states), masters, optimizer state and
    param groups, LR scheduler, steps, loss scaler, client_state, spec and frozen list."""
    got = zi.deepspeed_training_state(zi.open_deepspeed(case / "universal"))
    want = zi.deepspeed_training_state(zi.open_deepspeed(case / "checkpoint"))
    assert_same_tree(got[0], want[0])
    assert got[1:] == want[1:]


@case_params
def test_convert_universal_resumes_like_the_converted_regular_checkpoint(
    case: Path, tmp_path: Path
) -> None:
    saved = zi.convert_deepspeed(case / "universal", tmp_path / "u")
    assert saved.tag == universal_tag(case)
    zi.convert_deepspeed(case / "checkpoint", tmp_path / "r")
    u, r = zckpt.open_checkpoint(tmp_path / "u"), zckpt.open_checkpoint(tmp_path / "r")
    assert u.manifest.spec == r.manifest.spec
    assert u.manifest.skeleton == r.manifest.skeleton
    assert u.manifest.frozen == r.manifest.frozen
    for ws in (1, 3):
        got = zckpt.load_checkpoint(tmp_path / "u", world_size=ws, rank=0)
        want = zckpt.load_checkpoint(tmp_path / "r", world_size=ws, rank=0)
        assert_same_tree(got.state, want.state)
        assert got.client_state == want.client_state == info(case)["client_state"]


# ---- the CLI ----


@case_params
def test_cli_on_universal_checkpoints(
    case: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    u, tag = case / "universal", universal_tag(case)
    for path in (u, u / tag):
        assert main(["inspect", str(path), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["format"] == "deepspeed" and doc["universal"] is True
        assert (doc["stage"], doc["world_size"]) == (info(case)["stage"], info(case)["world_size"])
        assert doc["tags"] == [tag] and doc["latest"] == tag and doc["tag"] == tag
        assert doc["client_state"] == info(case)["client_state"]
        assert main(["inspect", str(case / "checkpoint"), "--json"]) == 0
        assert doc["fp32_state_dict"] == json.loads(capsys.readouterr().out)["fp32_state_dict"]
    assert main(["inspect", str(u)]) == 0
    text = capsys.readouterr().out
    assert "universal: True" in text and f"tags: {tag}" in text
    assert 'client_state: {"epoch": 2, "best_loss": 0.5}' in text
    assert main(["verify", str(u)]) == 0
    assert "universal checkpoint" in capsys.readouterr().out
    out, regular = tmp_path / "m.safetensors", tmp_path / "r.safetensors"
    assert main(["consolidate", str(u), str(out), "--quiet"]) == 0
    assert main(["consolidate", str(case / "checkpoint"), str(regular), "--quiet"]) == 0
    got, want = load_file(out), load_file(regular)
    assert list(got) == list(want) and all(same_bits(got[k], want[k]) for k in want)
    expected = load_file(case / "expected_fp32.safetensors")
    assert all(equal_values(got[k], expected[k]) for k in got if k in expected)
    assert main(["convert", "--from", "deepspeed", str(u), str(tmp_path / "z")]) == 0
    assert main(["verify", str(tmp_path / "z")]) == 0
    assert main(["reshard", str(u), str(tmp_path / "r"), "--world-size", "3"]) == 0
    assert zckpt.open_checkpoint(tmp_path / "r").manifest.spec.world_size == 3
    capsys.readouterr()


@case_params
def test_inspect_regular_deepspeed_shows_tags_and_client_state(
    case: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(case / "checkpoint"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["universal"] is False
    assert doc["tags"] == [info(case)["tag"]] and doc["latest"] == info(case)["tag"]
    assert doc["client_state"] == info(case)["client_state"]
    assert main(["inspect", str(case / "checkpoint")]) == 0
    assert 'client_state: {"epoch": 2, "best_loss": 0.5}' in capsys.readouterr().out


def test_inspect_lists_deepspeed_tags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for t in ("global_step10", "global_step9"):
        write_zero_checkpoint(tmp_path, {"w": torch.ones(3)}, world_size=2, stage=2, tag=t)
    (tmp_path / "notes").mkdir()
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tags"] == ["global_step9", "global_step10"] and doc["latest"] == "global_step9"
    assert doc["client_state"] == {"epoch": 1}


# ---- errors name the file; no pickle code ever runs ----


def first_trainable(case: Path) -> str:
    return str(next(iter(zi.open_deepspeed(case / "checkpoint").model[0]["param_shapes"][0])))


@case_params
def test_missing_state_file_is_named(case: Path, tmp_path: Path) -> None:
    root = copy_universal(case, tmp_path / "u")
    name = first_trainable(case)
    f = root / universal_tag(case) / "zero" / name / "exp_avg_sq.pt"
    f.unlink()
    with pytest.raises(zi.DeepSpeedFormatError, match=rf"{name}/exp_avg_sq\.pt: missing"):
        zi.convert_deepspeed(root, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@case_params
def test_missing_parameter_folder_is_named(case: Path, tmp_path: Path) -> None:
    root = copy_universal(case, tmp_path / "u")
    name = first_trainable(case)
    shutil.rmtree(root / universal_tag(case) / "zero" / name)
    with pytest.raises(zi.DeepSpeedFormatError, match=rf"zero/{name}: missing"):
        zckpt.get_fp32_state_dict_from_zero_checkpoint(root)


@case_params
def test_wrong_size_is_named(case: Path, tmp_path: Path) -> None:
    root = copy_universal(case, tmp_path / "u")
    name = first_trainable(case)
    torch.save(
        {"param": torch.zeros(3), "cat_dim": 0},
        root / universal_tag(case) / "zero" / name / "fp32.pt",
    )
    with pytest.raises(zi.DeepSpeedFormatError, match=rf"{name}/fp32\.pt: 3 elements"):
        zckpt.get_fp32_state_dict_from_zero_checkpoint(root)


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@case_params
@pytest.mark.parametrize("which", ["exp_avg.pt", "../optimizer_state.pt"])
def test_malicious_universal_file_is_refused_and_never_runs(
    case: Path, tmp_path: Path, which: str
) -> None:
    root = copy_universal(case, tmp_path / "u")
    marker = tmp_path / "pwned"
    f = root / universal_tag(case) / "zero" / first_trainable(case) / which
    torch.save({"param": RunsCode(marker)}, f)
    with pytest.raises(zi.UnsafePickleError, match=r"system"):
        zckpt.get_fp32_state_dict_from_zero_checkpoint(root)
    with pytest.raises(zi.UnsafePickleError):
        main(["inspect", str(root), "--debug"])
    assert not marker.exists()


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name) for c in CASES if info(c)["stage"] < 3]
    or [pytest.param(None, marks=NO_FIXTURES)],
)
def test_steps_of_one_param_group_must_agree(case: Path, tmp_path: Path) -> None:
    root = copy_universal(case, tmp_path / "u")
    names = list(zi.open_deepspeed(case / "checkpoint").model[0]["param_shapes"][0])
    torch.save(torch.tensor(7.0), root / universal_tag(case) / "zero" / names[1] / "step.pt")
    with pytest.raises(zi.DeepSpeedFormatError, match=rf"{names[1]}/step\.pt: step 7\.0"):
        zi.convert_deepspeed(root, tmp_path / "out")


@case_params
def test_a_crafted_parameter_name_cannot_leave_zero(case: Path, tmp_path: Path) -> None:
    root = copy_universal(case, tmp_path / "u")
    tag_dir = root / universal_tag(case)
    f = sorted(tag_dir.glob("*model_states.pt"))[0]
    states = dict(zi.load_pickle(f))
    shapes = states["param_shapes"][0]
    first = next(iter(shapes))
    states["param_shapes"][0] = {("../../etc" if k == first else k): v for k, v in shapes.items()}
    torch.save(states, tmp_path / "new.pt")  # never over the file the tensors are mapped from
    os.replace(tmp_path / "new.pt", f)
    with pytest.raises(zi.DeepSpeedFormatError, match=r"'\.\./\.\./etc' cannot name a folder"):
        zi.open_deepspeed(root)


def test_not_a_checkpoint_mentions_universal(tmp_path: Path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    torch.save({"module": {}}, d / "mp_rank_00_model_states.pt")
    with pytest.raises(zi.DeepSpeedFormatError, match=r"optimizer_state\.pt"):
        zi.open_deepspeed(d)


# ---- synthetic universal checkpoints: world sizes, groups and models the fixtures lack ----


def to_universal(src: Path, out: Path, tag: str = "u") -> Path:
    """What ds_to_universal writes (the layout in shared/fixtures/deepspeed/README.md), made from
    zckpt's reading of a regular checkpoint; checked against DeepSpeed's own output below."""
    ck = zi.open_deepspeed(src)
    state = zi.deepspeed_training_state(ck)[0]
    d = out / tag
    (d / "zero").mkdir(parents=True)
    (out / "latest_universal").write_text(tag)
    for f in ck.model_files:
        shutil.copy2(f, d)
    o0 = ck.optim[0]

    def plain(v: Any) -> Any:  # no zckpt stand-ins in files zckpt must read back
        return int(v) if isinstance(v, zi.ZeroStage) else v

    base = "optimizer_state_dict" if ck.stage == 3 else "base_optimizer_state"
    sharded = (
        () if ck.stage == 3 else (base, "param_slice_mappings", "single_partition_of_fp32_groups")
    )
    saved = {k: plain(v) for k, v in o0.items() if k not in sharded and k != "loss_scaler"}
    saved["param_groups"] = o0[base]["param_groups"]
    torch.save(saved, d / "zero" / "optimizer_state.pt")
    opt = state["optimizer"]["state"]
    for name, master in state["master"].items():
        p = d / "zero" / name
        p.mkdir()
        for key, t in [("fp32", master), *((k, v) for k, v in opt[name].items() if k != "step")]:
            value = t.reshape(-1) if ck.stage == 3 else {"cat_dim": 0, "param": t}
            torch.save(value, p / f"{key}.pt")
        if ck.stage < 3 and "step" in opt[name]:
            torch.save(opt[name]["step"], p / "step.pt")
    if ck.stage < 3:  # every other module entry: fp32.pt, upcast
        for name, t in ck.model[0]["module"].items():
            p = d / "zero" / name
            if not (p / "fp32.pt").exists():
                p.mkdir(exist_ok=True)
                torch.save({"param": t.float()}, p / "fp32.pt")
    return out


def loaded(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: loaded(x) for k, x in v.items() if k != "loss_scaler"}
    if isinstance(v, zi.ZeroStage):
        return int(v)
    return v


@case_params
def test_the_synthetic_writer_writes_what_deepspeed_writes(case: Path, tmp_path: Path) -> None:
    ours = to_universal(case / "checkpoint", tmp_path, universal_tag(case)) / universal_tag(case)
    theirs = case / "universal" / universal_tag(case)
    files = sorted(p.relative_to(theirs) for p in theirs.rglob("*.pt"))
    assert files == sorted(p.relative_to(ours) for p in ours.rglob("*.pt"))
    for rel in files:
        assert_same_tree(loaded(zi.load_pickle(ours / rel)), loaded(zi.load_pickle(theirs / rel)))


def synthetic(root: Path, stage: int, ws: int, dtype: torch.dtype) -> Path:
    g = torch.Generator().manual_seed(stage * 10 + ws)
    params = {f"p{i}.weight": torch.randn(s, generator=g) for i, s in
              enumerate([(7, 3), (5,), (11,), (2, 2, 3), (1,)])}  # fmt: skip
    write_zero_checkpoint(
        root, params, world_size=ws, stage=stage, dtype=dtype,
        groups=[["p0.weight", "p2.weight"], ["p1.weight", "p3.weight", "p4.weight"]],
        frozen={"f.weight": torch.randn(3, 5, generator=g).to(dtype)},
        buffers={"n": torch.tensor(4), "s": torch.randn(3, generator=g)},
        tied={"t.weight": "p0.weight"},
    )  # fmt: skip
    return root


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("ws", [3, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_synthetic_universal_reads_like_its_source(
    tmp_path: Path, stage: int, ws: int, dtype: torch.dtype
) -> None:
    src = synthetic(tmp_path / "src", stage, ws, dtype)
    u = to_universal(src, tmp_path / "u")
    got = zckpt.get_fp32_state_dict_from_zero_checkpoint(u)
    want = zckpt.get_fp32_state_dict_from_zero_checkpoint(src)
    assert list(got) == list(want) and got["t.weight"] is got["p0.weight"]
    assert all(same_bits(got[k], want[k]) for k in want)
    a = zi.deepspeed_training_state(zi.open_deepspeed(u))
    b = zi.deepspeed_training_state(zi.open_deepspeed(src))
    assert_same_tree(a[0], b[0])
    assert a[1:] == b[1:]
