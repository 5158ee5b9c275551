"""Nothing to load, said precisely: each case its own message (issue 12; issue 11 item 6)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import zckpt
from zckpt.adapters import Checkpointer
from zckpt.cli import main

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"


def _save(d: Path, tag: str = "t") -> None:
    zckpt.save_checkpoint(d, {"w": torch.ones(3)}, zckpt.ZeroSpec(1, 1), tag=tag)


def _cases(tmp: Path) -> dict[str, tuple[Path, str | None, str]]:
    """name -> (path, tag, a regex the message must match)."""
    (tmp / "file.txt").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "junk").mkdir()
    (tmp / "junk" / "notes.txt").write_text("x")
    _save(tmp / "outer" / "run")
    _save(tmp / "nolatest", "a")
    _save(tmp / "nolatest", "b")
    os.remove(tmp / "nolatest" / "latest")
    _save(tmp / "dangling", "a")
    (tmp / "dangling" / "latest").write_text("gone")
    _save(tmp / "blobs")
    blob = next((tmp / "blobs" / "t").glob("*.zck"))
    return {
        "missing": (tmp / "typo", None, r"typo: no such file or directory"),
        "file": (tmp / "file.txt", None, r"file.txt is a file, not a checkpoint directory"),
        "blob": (blob, None, r"is a file: a zckpt blob"),
        "manifest": (tmp / "blobs" / "t" / "manifest.zckm", None, r"a zckpt manifest"),
        "junk": (tmp / "junk", None, r"holds no zckpt checkpoint .* notes.txt"),
        "nested": (tmp / "outer", None, r"its subdirectory 'run' does"),
        "no_latest": (tmp / "nolatest", None, r"no 'latest' file; its committed tags are a, b"),
        "dangling": (tmp / "dangling", None, r"latest names 'gone', which holds no committed"),
        "no_such_tag": (
            tmp / "blobs",
            "nope",
            r"nope: no such tag directory; its committed tags: t",
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "missing",
        "file",
        "blob",
        "manifest",
        "junk",
        "nested",
        "no_latest",
        "dangling",
        "no_such_tag",
    ],
)
def test_each_case_has_its_own_message(tmp_path: Path, name: str) -> None:
    path, tag, pattern = _cases(tmp_path)[name]
    with pytest.raises(zckpt.CheckpointNotFoundError, match=pattern):
        zckpt.open_checkpoint(path, tag)
    assert main(["inspect", str(path), *(["--tag", tag] if tag else [])]) == 1


@pytest.mark.parametrize("name", ["missing", "junk", "no_latest"])
def test_load_checkpoint_warns_with_the_reason(tmp_path: Path, name: str) -> None:
    path, _, pattern = _cases(tmp_path)[name]
    with pytest.warns(UserWarning, match=pattern):
        got = zckpt.load_checkpoint(path)
    assert got.load_path is None
    model = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match=pattern):
        assert Checkpointer(model).load_checkpoint(path) == (None, None)
    with pytest.raises(zckpt.CheckpointNotFoundError, match=pattern), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Checkpointer(model).load_checkpoint(path, require=True)


def test_an_empty_directory_is_a_fresh_run_not_a_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert zckpt.load_checkpoint(tmp_path).load_path is None
    with pytest.raises(zckpt.CheckpointNotFoundError, match="is empty"):
        Checkpointer(torch.nn.Linear(2, 2)).load_checkpoint(tmp_path, require=True)


def test_a_deepspeed_directory_points_to_convert(tmp_path: Path) -> None:
    case = FIXTURES / "z2_ws2_bf16" / "checkpoint"
    if not case.is_dir():
        pytest.skip(f"no DeepSpeed fixture at {case}")
    d = tmp_path / "ds"
    shutil.copytree(case, d)
    for call in (
        lambda: zckpt.load_checkpoint(d),
        lambda: Checkpointer(torch.nn.Linear(2, 2)).load_checkpoint(d),
        lambda: zckpt.open_checkpoint(d),
    ):
        with pytest.raises(zckpt.CheckpointNotFoundError, match="zckpt convert --from deepspeed"):
            call()
    os.remove(d / "latest")
    with pytest.raises(zckpt.CheckpointNotFoundError, match="zckpt convert --from deepspeed"):
        zckpt.load_checkpoint(d)


@pytest.mark.parametrize("kw", [{"world_size": 0}, {"world_size": -1}, {"stage": 4}, {"rank": -1}])
def test_load_arguments_are_checked(tmp_path: Path, kw: dict[str, int]) -> None:
    _save(tmp_path)
    with pytest.raises(zckpt.ArgumentError):
        zckpt.load_checkpoint(tmp_path, **kw)


def _ds_fixture() -> Path:
    case = FIXTURES / "z2_ws2_bf16"
    if not (case / "checkpoint").is_dir():
        pytest.skip(f"no DeepSpeed fixture at {case}")
    return case


def test_a_folder_above_deepspeed_checkpoints_names_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = _ds_fixture()  # holds checkpoint/ (a save_dir, latest -> step3) and universal/
    with pytest.raises(zckpt.CheckpointNotFoundError) as err:
        zckpt.open_checkpoint(case)
    msg = str(err.value)
    assert "subdirectories 'checkpoint', 'universal' are DeepSpeed checkpoints" in msg, msg
    assert f"pass {case / 'checkpoint'}" in msg and "--tag checkpoint" not in msg, msg
    assert main(["inspect", str(case)]) == 1
    said = capsys.readouterr().err
    assert f"pass {case / 'checkpoint'}" in said and "as the tag" not in said
    # what it says to pass is inspectable as it stands
    assert main(["inspect", str(case / "checkpoint")]) == 0


def test_a_deepspeed_save_dir_with_a_wrong_tag_lists_its_tags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = _ds_fixture() / "checkpoint"
    with pytest.raises(zckpt.CheckpointNotFoundError) as err:
        zckpt.open_checkpoint(d, "nope")
    msg = str(err.value)
    assert f"{d} is a DeepSpeed checkpoint directory with no tag 'nope'; its tags: step3" in msg
    assert "committed" not in msg and "manifest" not in msg, msg  # zckpt's own terms
    assert main(["inspect", str(d), "--tag", "nope"]) == 1
    said = capsys.readouterr().err
    assert "DeepSpeed" in said and "step3" in said and "committed" not in said
    with pytest.raises(zckpt.CheckpointNotFoundError, match="its tags: step3"):
        zckpt.load_checkpoint(d, tag="nope")


def test_a_deepspeed_save_dir_without_latest_lists_its_tags(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    shutil.copytree(_ds_fixture() / "checkpoint", d)
    os.remove(d / "latest")
    with pytest.raises(zckpt.CheckpointNotFoundError) as err:
        zckpt.open_checkpoint(d)
    msg = str(err.value)
    assert f"{d} is a DeepSpeed checkpoint directory with no 'latest' file; its tags: step3" in msg
    assert "pass one as the tag" in msg and "zckpt convert --from deepspeed" in msg
    assert main(["inspect", str(d), "--tag", "step3"]) == 0
