"""``zckpt consolidate`` of a DeepSpeed checkpoint against a hostile file system.

The torch-free export (``zckpt/interop/_deepspeed.py: export_values``) finds each value's byte
ranges when it reads the files, and copies them later by path (``zckpt/interop/_stream.py``).
A tag saved again in between (DeepSpeed's ``torch.save`` rewrites a file in place; a careful
writer renames a new one over it) gave another save's bytes for those ranges, mixed into the
output without an error. Each copy now checks that the file is still the one read (device,
inode, size, mtime), before and after; a failed export leaves no file under the output's name.
And an OUT that is one of the checkpoint's own files is refused, ``--overwrite`` or not.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zckpt
from zckpt.cli import main
from zckpt.interop._deepspeed import deepspeed_fp32_state_dict, export_values
from zckpt.interop._mapped import mapped_tensor
from zckpt.interop._pages import PagedSource, file_mappings
from zckpt.interop._safetensors import export_safetensors
from zckpt.interop._stream import FileRanges
from zckpt.interop._synthetic import write_zero_checkpoint
from zckpt.spec import Fragment


def _two_saves(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """The same model saved twice (other values), in ``a`` and ``b``; ``a``'s weight."""
    a, b = tmp_path / "a", tmp_path / "b"
    w = torch.arange(64.0)
    write_zero_checkpoint(a, {"w": w}, world_size=2, stage=2)
    write_zero_checkpoint(b, {"w": -w}, world_size=2, stage=2)
    return a, b, w


def _rank1(d: Path) -> str:
    (f,) = glob.glob(str(d / "*" / "*zero_pp_rank_1_*optim_states.pt"))
    return f


@pytest.mark.parametrize("how", ["replaced", "rewritten", "truncated"])
def test_a_file_changed_between_reading_and_copying_fails_naming_it(
    tmp_path: Path, how: str
) -> None:
    a, b, _w = _two_saves(tmp_path)
    sd = export_values(a)
    assert isinstance(sd["w"], FileRanges)
    target, other = _rank1(a), _rank1(b)
    if how == "replaced":  # a new file renamed over it
        os.replace(other, target)
    elif how == "rewritten":  # torch.save over the same path: the same inode, truncated
        before = os.stat(target).st_ino
        shutil.copyfile(other, target)
        st = os.stat(target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a coarse clock's tick
        assert os.stat(target).st_ino == before
    else:
        os.truncate(target, os.path.getsize(target) // 2)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "model.safetensors"
    said = "replaced" if how == "replaced" else "rewritten"  # a truncation keeps the inode
    with pytest.raises(zckpt.FormatError, match=rf"rank_1_mp_rank_00_optim_states\.pt: {said}"):
        export_safetensors(sd, out)
    assert not out.exists() and os.listdir(out.parent) == []  # no half file, no leftovers


def test_an_unchanged_checkpoint_exports_its_values(tmp_path: Path) -> None:
    # The check is not vacuous: the same export without the change gives the saved values.
    a, _b, w = _two_saves(tmp_path)
    out = tmp_path / "model.safetensors"
    export_safetensors(export_values(a), out)
    assert torch.equal(load_file(out)["w"], w)


def test_an_output_that_is_a_file_of_the_checkpoint_is_refused(tmp_path: Path) -> None:
    a, _b, w = _two_saves(tmp_path)
    tag_dir = a / "step1"
    files = [*sorted(glob.glob(str(tag_dir / "*"))), str(a / "latest")]
    before = {f: Path(f).read_bytes() for f in files}
    for f in files:
        rc = main(["consolidate", str(a), f, "--overwrite", "--quiet"])
        assert rc != 0, f
    assert {f: Path(f).read_bytes() for f in files} == before  # the checkpoint untouched
    # A new name inside the checkpoint is free (zero_to_fp32 writes one there).
    new = a / "pytorch_model.bin"
    assert main(["consolidate", str(a), str(new), "--quiet"]) == 0
    assert torch.equal(torch.load(new, weights_only=True)["w"], w)
    assert main(["consolidate", str(a), str(new), "--overwrite", "--quiet"]) == 0


def test_an_output_of_the_checkpoint_names_it_in_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _b, _w = _two_saves(tmp_path)
    f = str(a / "step1" / "mp_rank_00_model_states.pt")
    assert main(["consolidate", str(a), f, "--overwrite"]) == 1
    assert "is a file of the checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("latest", ["../b/step1", "/etc", "..", "step1/../../b/step1"])
def test_a_latest_pointing_outside_the_save_dir_is_refused(tmp_path: Path, latest: str) -> None:
    a, _b, _w = _two_saves(tmp_path)
    (a / "latest").write_text(latest)
    out = tmp_path / "model.safetensors"
    assert main(["consolidate", str(a), str(out), "--quiet"]) != 0
    assert not out.exists()


def test_the_torch_path_copies_a_replaced_file_from_its_mapping(tmp_path: Path) -> None:
    # The lazy torch path maps each file when it reads it and streamed its ranges by path:
    # after a new file was renamed over one, the export held that file's bytes while the eager
    # state dict (the mapping) held the old ones. Now a path whose file is not the mapped one
    # is copied from the mapping: the values the state dict was read with.
    a, b, w = _two_saves(tmp_path)
    lazy = deepspeed_fp32_state_dict(a, lazy_mode=True)
    os.replace(_rank1(b), _rank1(a))
    out = tmp_path / "model.safetensors"
    export_safetensors(lazy, out)
    assert torch.equal(load_file(out)["w"], w)


def test_a_mapped_output_maps_only_the_file_it_read(tmp_path: Path) -> None:
    # _mapped.py maps whole pages by path: a file renamed over the source's since must not be
    # mapped in its place (its pages are copied from the source's own mapping instead).
    n = 1 << 19
    f, g = tmp_path / "f.bin", tmp_path / "g.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(f)
    torch.full((n,), -1.0).numpy().tofile(g)
    data = torch.from_file(str(f), size=n, dtype=torch.float32)
    src = PagedSource(Fragment(0, 0, n), data, file_mappings([str(f)]))
    assert src.file_stamp(0, n) == (os.stat(f).st_dev, os.stat(f).st_ino) or sys.platform != "linux"
    os.replace(g, f)
    t = mapped_tensor((n,), torch.float32, [(src, 0, n)])
    if t is not None:  # None off Linux
        assert torch.equal(t, torch.arange(n, dtype=torch.float32))
