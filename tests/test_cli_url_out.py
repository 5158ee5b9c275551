"""``zckpt consolidate`` to a URL is refused, never written as a local directory named ``s3:``.

Found in review (issue 15): ``zckpt consolidate CKPT s3://bucket/x/m.safetensors`` took OUT as a
path, wrote ``./s3:/bucket/x/m.safetensors`` and reported success. A ``file://`` OUT is a local
path, written there (``tests/test_file_urls.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zckpt.cli import main

FIXTURE = Path(__file__).parents[2] / "shared/fixtures/deepspeed/z2_ws2_bf16/checkpoint"


@pytest.mark.parametrize(
    "out", ["s3://bucket/run-out/m.safetensors", "memory://x/hf/", "gs://b/m.pt"]
)
def test_a_url_out_is_refused_before_anything_is_read_or_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], out: str
) -> None:
    monkeypatch.chdir(tmp_path)
    src = str(FIXTURE) if FIXTURE.is_dir() else str(tmp_path / "missing")
    assert main(["consolidate", src, out, "--quiet"]) == 1
    assert "is a URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no local 's3:' (or other) directory
