"""FSDP2 / DTensor state through zckpt's own save_checkpoint and load_checkpoint, in real gloo
processes (``fsdp_child.py``): an FSDP2 model and AdamW after a real step saved at 2 ranks,
resumed at 3 into a fresh FSDP2 model and optimizer, bitwise, with the next steps' losses
those of the uninterrupted run; the same checkpoint loaded whole on one process, as fp32 state
dict and through ``zckpt consolidate``; every supported placement on a (2, 2) mesh saved at 4
ranks and loaded at 3 into other placements; ``Partial()`` refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dcp_support import spawn_ranks

import zckpt
from zckpt.cli import main
from zckpt.testing import assert_states_equal

CHILD = Path(__file__).with_name("fsdp_child.py")


def spawn(work: Path, world_size: int, mode: str, deadline_s: float = 240.0) -> None:
    """Run ``fsdp_child.py`` as ``world_size`` real ranks (gloo, a fresh rendezvous file)."""
    spawn_ranks(CHILD, work, world_size, mode, deadline_s)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("fsdp2")
    spawn(work, 2, "train")
    spawn(work, 3, "resume")
    return work


def test_resume_at_three_ranks_is_bitwise_the_saved_state(fsdp: Path) -> None:
    saved = torch.load(fsdp / "values_train.pt")
    loaded = torch.load(fsdp / "values_resume.pt")
    assert_states_equal(loaded, saved)
    assert set(saved["optimizer"]["state"]["0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    # The next steps after the resume are the uninterrupted run's, bit for bit: the first
    # shows the weights, the second the optimizer state (AdamW's moments and step).
    assert torch.load(fsdp / "losses_resume.pt") == torch.load(fsdp / "losses_train.pt")


def test_checkpoint_is_self_describing_and_loads_whole(fsdp: Path, tmp_path: Path) -> None:
    ck = fsdp / "ckpt"
    saved = torch.load(fsdp / "values_train.pt")
    m = zckpt.open_checkpoint(ck).manifest
    shapes = {m.skeleton.name(i): t.shape for i, t in enumerate(m.skeleton.tensors)}
    assert shapes["module/0.weight"] == (5, 4) and shapes["optimizer/state/2.weight/exp_avg"] == (
        7,
        5,
    )
    assert not m.derived  # the blocks are FSDP2's, not the plan's: listed per file
    assert_states_equal(zckpt.load_checkpoint(ck).state, saved)
    fp32 = zckpt.get_fp32_state_dict_from_zero_checkpoint(ck)
    assert_states_equal(fp32, saved["module"])
    out = tmp_path / "m.pt"
    assert main(["consolidate", str(ck), str(out)]) == 0
    assert_states_equal(torch.load(out), saved["module"])
    assert main(["verify", str(ck)]) == 0


@pytest.mark.slow
def test_every_placement_on_a_2d_mesh_loads_into_other_placements(tmp_path: Path) -> None:
    spawn(tmp_path, 4, "grid")  # also checks that Partial() is refused, nothing committed
    spawn(tmp_path, 3, "row")  # checks each rank's local tensors and a shape mismatch
    assert sorted(p.name for p in tmp_path.glob("row_ok_*")) == ["row_ok_0", "row_ok_1", "row_ok_2"]
    from fsdp_child import grid_values

    for tag in ("g", "g2"):  # g2: saved asynchronously, the blocks zeroed meanwhile
        state = zckpt.load_checkpoint(tmp_path / "grid", tag=tag).state
        assert_states_equal(state["model"], grid_values())


def test_tied_weights_are_saved_once_and_resume_bitwise(tmp_path: Path) -> None:
    """``get_model_state_dict`` of an FSDP2 model with one weight in two layers gives two
    DTensor objects over one local memory: they were saved as two tensors. Saved at 2 ranks
    (4 rows), resumed at 3 (one rank's shard empty)."""
    spawn(tmp_path, 2, "tied_train")
    spawn(tmp_path, 3, "tied_resume")
    m = zckpt.open_checkpoint(tmp_path / "ckpt_tied").manifest
    names = [m.skeleton.name(i) for i in range(len(m.skeleton.tensors))]
    assert "module/0.weight" in names and "module/2.weight" not in names, names
    saved = torch.load(tmp_path / "values_tied_train.pt")
    assert torch.equal(saved["module"]["0.weight"], saved["module"]["2.weight"])
    assert_states_equal(torch.load(tmp_path / "values_tied_resume.pt"), saved)
    assert torch.load(tmp_path / "losses_tied_resume.pt") == torch.load(
        tmp_path / "losses_tied_train.pt"
    )
    whole = zckpt.load_checkpoint(tmp_path / "ckpt_tied").state["module"]
    assert whole["0.weight"] is whole["2.weight"]  # tied again in a plain load
