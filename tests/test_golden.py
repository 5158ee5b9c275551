"""Golden blobs of format version 1: committed bytes that every future zckpt must read.

The files in tests/golden/v1/ were written once by tests/golden/make_v1.py and are never
regenerated. Expected values are built here, independently of the encoder, from the same
arange formulas the generator used (copied, not imported, on purpose).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard

import zckpt
from zckpt.assemble import consolidate
from zckpt.format import decode_header, decode_shard, encode_shard, verify_blob
from zckpt.format._codecs import BYTEPLANE, RAW, ZSTD
from zckpt.testing import assert_states_equal

GOLDEN = Path(__file__).parent / "golden" / "v1"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CODECS = ("raw", "zstd", "byteplane")


def expected_state() -> dict[str, Any]:
    i = torch.arange(512, dtype=torch.float64)
    w = (i % 29) / 256 - 0.05
    bias = torch.arange(24, dtype=torch.float64) / 8 - 1
    specials = [0x7FC00001, 0x80000000, 0x7F800000, 0x00000001, 0xFF800000]
    return {
        "module": {
            "fc.weight": w.to(torch.bfloat16).reshape(16, 32),
            "fc.bias": bias.to(torch.float16),
        },
        "master": {"fc.weight": w.to(torch.float32).reshape(16, 32), "fc.bias": bias.float()},
        "optimizer": {
            "state": {
                "fc.weight": {
                    "exp_avg": (w * 1e-3).to(torch.float32).reshape(16, 32),
                    "exp_avg_sq": (w * w * 1e-6).to(torch.float32).reshape(16, 32),
                    "step": torch.tensor(7.0),
                },
            },
            "param_groups": [
                {"lr": 0.001, "betas": (0.9, 0.999), "params": ["fc.weight", "fc.bias"]}
            ],
        },
        "counts": torch.tensor([-5, -4, -3, -2, -1, 0, 1, 2, 3, 4]),
        "ids": torch.tensor([7 * k for k in range(300)], dtype=torch.int32),
        "mask": torch.tensor([True, False, True, True, False]),
        "step": torch.tensor(12345, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "specials": torch.from_numpy(np.array(specials, dtype="<u4").view("<f4").copy()),
        "values": [None, True, 3, -2.5, "text", b"\x00\x01", (1, (2,)), 2**64 - 1],
    }


def blobs(codec: str) -> list[bytes]:
    return [(GOLDEN / f"{codec}-rank{r}.zckpt").read_bytes() for r in range(2)]


def test_manifest_lists_every_file() -> None:
    names = {p.name for p in GOLDEN.glob("*.zckpt")}
    assert names == set(MANIFEST["files"]) == {f"{c}-rank{r}.zckpt" for c in CODECS for r in (0, 1)}
    for name, meta in MANIFEST["files"].items():
        assert (GOLDEN / name).stat().st_size == meta["size"]


@pytest.mark.parametrize("codec", CODECS)
def test_golden_blobs_decode_to_the_expected_state(codec: str) -> None:
    shards = [decode_shard(b) for b in blobs(codec)]
    assert [s.rank for s in shards] == [0, 1]
    assert shards[0].spec == zckpt.ZeroSpec(2, 2)
    assert_states_equal(consolidate(shards), expected_state())
    for b in blobs(codec):
        verify_blob(b)
        assert decode_header(b).extra == {"golden": "v1", "codec": codec}


@pytest.mark.parametrize(
    ("codec", "code"), [("raw", RAW), ("zstd", ZSTD), ("byteplane", BYTEPLANE)]
)
def test_golden_blobs_exercise_their_codec(codec: str, code: int) -> None:
    used = {c.codec for b in blobs(codec) for e in decode_header(b).fragments for c in e.chunks}
    assert code in used
    assert sum(len(e.chunks) for b in blobs(codec) for e in decode_header(b).fragments) > 10


@pytest.mark.parametrize("codec", CODECS)
def test_reencoding_gives_identical_bytes(codec: str) -> None:
    if codec != "raw" and tuple(MANIFEST["zstd_version"]) != zstandard.ZSTD_VERSION:
        pytest.skip(f"zstd {zstandard.ZSTD_VERSION} may compress differently from the recorded one")
    for r, blob in enumerate(blobs(codec)):
        meta = MANIFEST["files"][f"{codec}-rank{r}.zckpt"]
        shard = decode_shard(blob)
        extra = decode_header(blob).extra
        again = encode_shard(shard, codec=codec, chunk_bytes=meta["chunk_bytes"], extra=extra)
        assert again == blob


def _reference_reader() -> dict[str, Any]:
    text = (Path(__file__).parents[1] / "docs" / "format.md").read_text()
    match = re.search(r"<!-- reference-reader -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/format.md lost its reference reader"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), "docs/format.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("codec", CODECS)
def test_the_spec_s_reference_reader_agrees(codec: str) -> None:
    read_blob = _reference_reader()["read_blob"]
    for blob in blobs(codec):
        index, fragments = read_blob(blob)
        shard = decode_shard(blob)
        assert index["rank"] == shard.rank
        got = [(leaf, a, b) for leaf, a, b, _ in fragments]
        assert got == [tuple(f) for f in shard.fragments]
        for (_, _, _, raw), t in zip(fragments, shard.data, strict=True):
            assert raw == t.view(torch.uint8).numpy().tobytes()
