"""The command line's ``consolidate`` and ``convert`` with ``s3://`` URLs against the loopback S3
server, reading from and writing to the store (the other subcommands are in
``tests/test_s3.py::test_cli_with_s3_urls``): issue 15 asks every subcommand to take URLs."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.testing import assert_states_equal

s3fs = pytest.importorskip("s3fs", reason="needs s3fs: pip install 'zckpt[test-s3]'")
safetensors_torch = pytest.importorskip("safetensors.torch")

from s3_support import BUCKET, KEY, SECRET  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"


def _options(server: Any) -> tuple[list[str], dict[str, str]]:
    given = {"endpoint_url": server.endpoint, "key": KEY, "secret": SECRET}
    return [f"--storage-option={k}={v}" for k, v in given.items()], given


def _saved(server: Any) -> tuple[str, dict[str, Any]]:
    _, so = _options(server)
    url = f"s3://{BUCKET}/cli-{uuid.uuid4().hex[:12]}"
    g = torch.Generator().manual_seed(0)
    master = {"w": torch.randn(10, 3, generator=g), "b": torch.randn(5, generator=g)}
    state = {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}
    zckpt.save_checkpoint(url, state, zckpt.ZeroSpec(2, 2), tag="t", storage_options=so)
    fp32 = zckpt.get_fp32_state_dict_from_zero_checkpoint(url, storage_options=so)
    return url, dict(sorted(fp32.items()))  # a safetensors file lists its tensors by name


def test_consolidate_from_s3(s3_server: Any, tmp_path: Path) -> None:
    from zckpt.cli import main

    opts, _ = _options(s3_server)
    url, want = _saved(s3_server)
    assert main(["consolidate", url, str(tmp_path / "m.safetensors"), *opts]) == 0
    assert_states_equal(safetensors_torch.load_file(tmp_path / "m.safetensors"), want)


def test_consolidate_to_s3_writes_the_object_or_refuses(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the real server: OUT on S3 is written there or refused (it is refused, since
    ec57a47: it used to be written to a local directory named 's3:' and reported done)."""
    from zckpt.cli import main

    monkeypatch.chdir(tmp_path)
    opts, so = _options(s3_server)
    url, want = _saved(s3_server)
    out = f"{url}-out/m.safetensors"
    code = main(["consolidate", url, out, *opts])
    assert not (tmp_path / "s3:").exists()
    fs = s3fs.S3FileSystem(**so, skip_instance_cache=True)
    if code == 0:
        assert_states_equal(safetensors_torch.load(fs.cat_file(out)), want)
    else:
        assert code == 1 and not fs.exists(out)


def test_convert_a_deepspeed_checkpoint_into_s3(s3_server: Any, tmp_path: Path) -> None:
    from zckpt.cli import main

    cases = sorted(FIXTURES.glob("z2_ws2_*")) if FIXTURES.is_dir() else []
    if not cases:
        pytest.skip("DeepSpeed fixtures not found")
    case = cases[0] / "checkpoint"
    opts, so = _options(s3_server)
    url = f"s3://{BUCKET}/convert-{uuid.uuid4().hex[:12]}"
    assert main(["convert", "--from", "deepspeed", str(case), url, *opts]) == 0
    assert main(["verify", url, *opts]) == 0
    assert main(["convert", "--from", "deepspeed", str(case), str(tmp_path / "z")]) == 0
    for ws, rank in ((1, 0), (3, 2)):
        got = zckpt.load_checkpoint(url, world_size=ws, rank=rank, storage_options=so)
        local = zckpt.load_checkpoint(tmp_path / "z", world_size=ws, rank=rank)
        assert_states_equal(got.state, local.state)
