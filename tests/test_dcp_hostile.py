"""Hostile and damaged DCP checkpoints: each is a clear zckpt error naming the file and the
entry, nothing from a pickle is run, and the commands write nothing."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from dcp_support import dcp_save, write_dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

from zckpt.cli import main
from zckpt.interop import (
    DcpFormatError,
    DcpMissingFileError,
    DcpUnsafePickleError,
    convert_dcp,
    dcp_state_dict,
)

W = torch.arange(16.0).reshape(4, 4)


class _CreatesFile:
    """Unpickled by a plain pickle.load, this creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (str(self.path), "w"))


def _good(d: Path) -> Path:
    write_dcp(d, {"w": (W, [(0, (0, 0), (2, 4)), (1, (2, 0), (2, 4))])}, {"step": 3})
    return d


def _metadata(d: Path) -> Any:
    with open(d / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own file: trusted


def _rewrite(d: Path, md: Any) -> None:
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f)


def _commands_refuse(
    d: Path, tmp_path: Path, match: str, capsys: Any, inspect: bool = True
) -> None:
    """verify, consolidate, convert (and, for metadata-level damage, inspect) exit 1 naming
    the problem; nothing is written."""
    out, conv = tmp_path / "out.safetensors", tmp_path / "conv"
    for argv in (
        *([["inspect", str(d)]] if inspect else []),
        ["consolidate", str(d), str(out), "--quiet"],
        ["consolidate", str(d), str(tmp_path / "out.pt"), "--quiet"],
        ["convert", "--from", "dcp", str(d), str(conv)],
    ):
        assert main(argv) == 1, argv
        assert match in capsys.readouterr().err, argv
    assert main(["verify", str(d)]) == 1
    assert match in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "out.pt").exists()
    assert not conv.exists() or not any(conv.iterdir())


def test_metadata_with_a_foreign_global_is_never_run(tmp_path: Path, capsys: Any) -> None:
    d = _good(tmp_path / "ck")
    marker = tmp_path / "pwned"
    md = _metadata(d)
    md.state_dict_metadata["w"].properties = _CreatesFile(marker)
    _rewrite(d, md)
    with pytest.raises(DcpUnsafePickleError, match=r"\.metadata: refused to unpickle io\.open"):
        dcp_state_dict(d)
    assert not marker.exists()
    _commands_refuse(d, tmp_path, "refused to unpickle io.open", capsys)
    assert not marker.exists()


def test_a_value_with_a_foreign_global_is_never_run(tmp_path: Path, capsys: Any) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "ck"
    write_dcp(d, {"w": (W, [(0, (0, 0), (4, 4))])}, {"evil": _CreatesFile(marker)})
    with pytest.raises(DcpUnsafePickleError, match=r"evil \(bytes 0 to \d+\): refused .*io\.open"):
        dcp_state_dict(d)
    assert not marker.exists()
    for argv in (["inspect", str(d)], ["convert", "--from", "dcp", str(d), str(tmp_path / "c")]):
        assert main(argv) == 1
        assert "io.open" in capsys.readouterr().err
    assert main(["verify", str(d)]) == 1
    assert not marker.exists()


def test_truncated_distcp_file(tmp_path: Path, capsys: Any) -> None:
    d = _good(tmp_path / "ck")
    f = d / "__1_0.distcp"
    os.truncate(f, f.stat().st_size - 7)
    with pytest.raises(DcpFormatError, match=r"__1_0\.distcp: w chunk at \[2, 0\]: bytes 0 to \d+ "
                       r"lie past the end of the file"):  # fmt: skip
        dcp_state_dict(d)
    _commands_refuse(d, tmp_path, "lie past the end of the file", capsys)


def test_chunk_range_outside_its_file(tmp_path: Path) -> None:
    d = _good(tmp_path / "ck")
    md = _metadata(d)
    key = next(k for k in md.storage_data if k.fqn == "w" and k.offset == torch.Size([2, 0]))
    md.storage_data[key] = _StorageInfo("__1_0.distcp", 10**6, 100)
    _rewrite(d, md)
    with pytest.raises(DcpFormatError, match=r"bytes 1000000 to 1000100 lie past the end"):
        dcp_state_dict(d)


def test_chunk_range_inside_the_file_but_not_an_item(tmp_path: Path) -> None:
    d = _good(tmp_path / "ck")
    md = _metadata(d)
    key = next(k for k in md.storage_data if k.fqn == "w" and k.offset == torch.Size([2, 0]))
    info = md.storage_data[key]
    md.storage_data[key] = _StorageInfo(info.relative_path, info.offset + 1, info.length - 1)
    _rewrite(d, md)
    with pytest.raises(DcpFormatError, match=r"w chunk at \[2, 0\] \(bytes 1 to \d+\): not a "):
        dcp_state_dict(d)


def test_overlapping_chunks(tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "ck"
    write_dcp(d, {"w": (W, [(0, (0, 0), (3, 4)), (1, (2, 0), (2, 4))])})
    with pytest.raises(DcpFormatError, match=r"w: chunk at \[0, 0\] of \[3, 4\] and chunk at "
                       r"\[2, 0\] of \[2, 4\] overlap"):  # fmt: skip
        dcp_state_dict(d)
    _commands_refuse(d, tmp_path, "overlap", capsys, inspect=False)


def test_overlapping_columns(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    write_dcp(d, {"w": (W, [(0, (0, 0), (4, 3)), (1, (0, 2), (4, 2))])})
    with pytest.raises(DcpFormatError, match=r"chunk at \[0, 0\] of \[4, 3\] and chunk at "
                       r"\[0, 2\] of \[4, 2\] overlap"):  # fmt: skip
        dcp_state_dict(d)


def test_a_gap_between_chunks(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    write_dcp(d, {"w": (W, [(0, (0, 0), (4, 1)), (1, (0, 2), (4, 2))])})
    with pytest.raises(DcpFormatError, match=r"w: elements \[1, 2\) of 16 \(from index \[0, 1\] "
                       r"of \[4, 4\]\) and 3 more ranges are in no saved chunk"):  # fmt: skip
        dcp_state_dict(d)


def test_missing_distcp_file(tmp_path: Path, capsys: Any) -> None:
    d = _good(tmp_path / "ck")
    (d / "__1_0.distcp").unlink()
    with pytest.raises(DcpMissingFileError, match=r"__1_0\.distcp: no such file \(the metadata "
                       r"stores w there\)") as e:  # fmt: skip
        dcp_state_dict(d)
    assert isinstance(e.value, FileNotFoundError)
    _commands_refuse(d, tmp_path, "no such file", capsys)


def test_flipped_bit_fails_verify_and_writes_nothing(tmp_path: Path, capsys: Any) -> None:
    d = _good(tmp_path / "ck")
    f = d / "__1_0.distcp"
    raw = bytearray(f.read_bytes())
    raw[raw.index(W[2:].numpy().tobytes()) + 9] ^= 4
    f.write_bytes(raw)
    assert main(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert "w chunk at [2, 0]" in out and "CRC-32" in out
    for argv in (
        ["consolidate", str(d), str(tmp_path / "o.safetensors"), "--quiet"],
        ["convert", "--from", "dcp", str(d), str(tmp_path / "c")],
    ):
        assert main(argv) == 1
        assert "damaged checkpoint files, nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "c").exists()
    with pytest.raises(DcpFormatError, match="CRC-32"):
        convert_dcp(d, tmp_path / "c2")
    assert not (tmp_path / "c2").exists()


def test_item_not_the_metadatas_dtype(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    write_dcp(d, {"w": (W, [(0, (0, 0), (4, 4))])}, store=lambda c: c.double())
    with pytest.raises(DcpFormatError, match=r"holds a float64 tensor of \[4, 4\], where the "
                       r"metadata says float32 of \[4, 4\]"):  # fmt: skip
        dcp_state_dict(d)


def test_storage_path_outside_the_directory(tmp_path: Path) -> None:
    d = _good(tmp_path / "ck")
    (tmp_path / "x.distcp").write_bytes((d / "__1_0.distcp").read_bytes())
    md = _metadata(d)
    for k, v in list(md.storage_data.items()):
        md.storage_data[k] = _StorageInfo("../x.distcp", v.offset, v.length)
    _rewrite(d, md)
    with pytest.raises(DcpFormatError, match=r"storage file '\.\./x\.distcp' is not a file name "
                       r"inside the checkpoint directory"):  # fmt: skip
        dcp_state_dict(d)


def test_torn_metadata(tmp_path: Path, capsys: Any) -> None:
    d = _good(tmp_path / "ck")
    m = d / ".metadata"
    m.write_bytes(m.read_bytes()[:-20])
    with pytest.raises(DcpFormatError, match=r"\.metadata: not a DCP metadata pickle"):
        dcp_state_dict(d)
    _commands_refuse(d, tmp_path, "not a DCP metadata pickle", capsys)


def test_storage_transforms_are_refused(tmp_path: Path) -> None:
    d = _good(tmp_path / "ck")
    md = _metadata(d)
    for k, v in list(md.storage_data.items()):
        md.storage_data[k] = _StorageInfo(v.relative_path, v.offset, v.length, ["zstd"])
    _rewrite(d, md)
    with pytest.raises(DcpFormatError, match=r"storage transforms \['zstd'\]"):
        dcp_state_dict(d)


def test_chunk_outside_its_tensor(tmp_path: Path) -> None:
    d = _good(tmp_path / "ck")
    md = _metadata(d)
    md.state_dict_metadata["w"].chunks[1].sizes = torch.Size([3, 4])
    _rewrite(d, md)
    with pytest.raises(DcpFormatError, match=r"w: chunk 1 at \[2, 0\] of \[3, 4\] lies outside "
                       r"its shape \[4, 4\]"):  # fmt: skip
        dcp_state_dict(d)


def test_consolidate_refuses_an_out_that_is_a_checkpoint_file(tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "ck"
    dcp_save({"w": W}, d)
    before = (d / ".metadata").read_bytes()
    argv = ["consolidate", str(d), f"{d}/.metadata", "--overwrite", "--quiet"]  # a "directory"
    assert main(argv) == 1
    assert "is a file of the DCP checkpoint" in capsys.readouterr().err
    assert main(["consolidate", str(d), f"{d}/__0_0.distcp/", "--overwrite", "--quiet"]) == 1
    assert (d / ".metadata").read_bytes() == before
    assert (d / "__0_0.distcp").is_file()
