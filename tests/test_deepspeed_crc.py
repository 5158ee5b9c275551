"""A flipped bit in a DeepSpeed file's tensor bytes is an error, never a value.

torch's loads (``mmap`` or not) never check a ``torch.save`` zip's CRC-32s, so a damaged
optimizer file consolidates to wrong weights with DeepSpeed's own script. zckpt reads every
record against its CRC-32 where it matters: ``zckpt verify`` reports each damaged record (file,
record, byte range) and exits 1; ``zckpt consolidate`` and ``convert_deepspeed`` refuse before
writing anything.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.cli import main
from zckpt.interop import convert_deepspeed
from zckpt.interop._synthetic import write_zero_checkpoint
from zckpt.interop._unpickle import DeepSpeedFormatError
from zckpt.interop._zipcheck import record_problems, records_problems

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "deepspeed"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/deepspeed")
CASES = sorted(p.name for p in FIXTURES.glob("z*") if (p / "checkpoint").is_dir())


def _stored(path: Path) -> list[tuple[str, int, int]]:
    """``(record, first data byte, bytes)`` of every non-empty stored record of a zip."""
    out = []
    with zipfile.ZipFile(path) as z:
        for i in z.infolist():
            raw = path.read_bytes()[i.header_offset : i.header_offset + 30]
            n, m = int.from_bytes(raw[26:28], "little"), int.from_bytes(raw[28:30], "little")
            if i.compress_type == zipfile.ZIP_STORED and i.compress_size:
                out.append((i.filename, i.header_offset + 30 + n + m, i.compress_size))
    return out


def _flip(path: Path, at: int, mask: int = 0x10) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= mask
    path.write_bytes(bytes(raw))


def _optim_tensor_record(tag_dir: Path) -> tuple[Path, str, int]:
    """An optimizer file of ``tag_dir``, its largest record (the fp32 partitions) and a byte in
    it."""
    f = sorted(tag_dir.glob("*optim_states.pt"))[0]
    name, start, n = max(_stored(f), key=lambda r: r[2])
    return f, name, start + n // 2


@settings(max_examples=30, deadline=None)
@given(data=st.data(), mask=st.integers(1, 255))
def test_any_flipped_byte_in_any_record_is_named(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, mask: int
) -> None:
    d = tmp_path_factory.mktemp("ds")
    write_zero_checkpoint(d, {"w": torch.randn(33), "b": torch.randn(5)}, world_size=2, stage=3)
    files = sorted(d.rglob("*.pt"))
    f = data.draw(st.sampled_from(files))
    records = _stored(f)
    name, start, n = data.draw(st.sampled_from(records))
    at = start + data.draw(st.integers(0, n - 1))
    assert all(record_problems(str(p)) == [] for p in files)
    _flip(f, at, mask)
    problems = records_problems([str(p) for p in files])
    assert len(problems) == 1, problems
    assert str(f) in problems[0] and f"record {name} " in problems[0]
    assert f"bytes {start} to {start + n}" in problems[0]


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("z2_ws2", "z3_ws2"))][:3])
def test_verify_consolidate_and_convert_refuse_a_flipped_bit_in_a_fixture(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "ds"
    shutil.copytree(FIXTURES / case / "checkpoint", src)
    assert main(["verify", str(src)]) == 0
    assert "every zip record against its CRC-32: OK" in capsys.readouterr().out
    tag_dir = src / (src / "latest").read_text().strip()
    f, name, at = _optim_tensor_record(tag_dir)
    _flip(f, at)

    assert main(["verify", str(src), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and len(doc["problems"]) == 1
    assert str(f) in doc["problems"][0] and name in doc["problems"][0]
    assert main(["verify", str(src)]) == 1
    assert "1 problem(s)" in capsys.readouterr().out

    out = tmp_path / "model.safetensors"
    assert main(["consolidate", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "CRC-32" in err and str(f) in err and name in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]

    dst = tmp_path / "zk"
    with pytest.raises(DeepSpeedFormatError, match="CRC-32"):
        convert_deepspeed(src, dst)
    assert not dst.exists() or not zckpt.list_tags(dst)


def test_an_intact_checkpoint_still_converts_and_consolidates(tmp_path: Path) -> None:
    src = tmp_path / "ds"
    w = torch.randn(9, 4)
    write_zero_checkpoint(src, {"w": w}, world_size=2, stage=2)
    out = tmp_path / "m.safetensors"
    assert main(["consolidate", str(src), str(out), "--quiet"]) == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["w"], w)
    convert_deepspeed(src, tmp_path / "zk")
    got = zckpt.load_checkpoint(tmp_path / "zk", world_size=1, rank=0)
    assert torch.equal(got.state["master"]["w"], w.flatten().view(9, 4))
