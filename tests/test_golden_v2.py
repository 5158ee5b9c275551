"""Golden blobs of format version 2: committed bytes that every future zckpt must read.

tests/golden/v2/ was written once by tests/golden/make_v2.py and is never regenerated: the
blobs and ``skeleton.msgpack``, the columnar skeleton their manifest would hold. Expected values
come from ``test_golden.expected_state`` (built apart from the encoder), and the skeleton's
digest is recomputed here from that state, pinning the digest's definition.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
import torch
import zstandard
from test_golden import _reference_reader, expected_state

import zckpt
from zckpt.assemble import consolidate
from zckpt.format import decode_header, decode_shard, encode_shard, verify_blob
from zckpt.format._columns import skeleton_digest, skeleton_digest_of, skeleton_from_columns
from zckpt.testing import assert_states_equal

GOLDEN = Path(__file__).parent / "golden" / "v2"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CODECS = ("raw", "zstd", "byteplane")


def _columns() -> dict[str, object]:
    out: dict[str, object] = msgpack.unpackb((GOLDEN / "skeleton.msgpack").read_bytes(), raw=False)
    return out


def _blobs(codec: str) -> list[bytes]:
    return [(GOLDEN / f"{codec}-rank{r}.zckpt").read_bytes() for r in range(2)]


def test_manifest_lists_every_file() -> None:
    names = {p.name for p in GOLDEN.glob("*.zckpt")}
    assert names == set(MANIFEST["files"]) == {f"{c}-rank{r}.zckpt" for c in CODECS for r in (0, 1)}
    for name, meta in MANIFEST["files"].items():
        assert (GOLDEN / name).stat().st_size == meta["size"]


def test_the_skeleton_digest_is_the_state_s() -> None:
    skel = skeleton_from_columns(_columns())
    assert skel == zckpt.tree.flatten(expected_state())[0]
    assert skeleton_digest(_columns()) == MANIFEST["skeleton_digest"]
    assert skeleton_digest_of(skel) == MANIFEST["skeleton_digest"]


@pytest.mark.parametrize("codec", CODECS)
def test_golden_v2_blobs_decode_to_the_expected_state(codec: str) -> None:
    skel = skeleton_from_columns(_columns())
    shards = [decode_shard(b, skeleton=skel) for b in _blobs(codec)]
    assert [s.rank for s in shards] == [0, 1]
    assert_states_equal(consolidate(shards), expected_state())
    for b in _blobs(codec):
        verify_blob(b)  # alone
        h = decode_header(b, blob_size=len(b))
        assert h.version == 2 and h.skeleton is None
        assert h.digest == MANIFEST["skeleton_digest"]
        assert h.extra == {"golden": "v2", "codec": codec}
        with pytest.raises(zckpt.FormatError, match="skeleton"):
            decode_shard(b)


@pytest.mark.parametrize("codec", CODECS)
def test_reencoding_gives_identical_bytes(codec: str) -> None:
    if codec != "raw" and tuple(MANIFEST["zstd_version"]) != zstandard.ZSTD_VERSION:
        pytest.skip(f"zstd {zstandard.ZSTD_VERSION} may compress differently from the recorded one")
    skel = skeleton_from_columns(_columns())
    for r, blob in enumerate(_blobs(codec)):
        meta = MANIFEST["files"][f"{codec}-rank{r}.zckpt"]
        shard = decode_shard(blob, skeleton=skel)
        extra = decode_header(blob).extra
        again = encode_shard(
            shard, codec=codec, chunk_bytes=meta["chunk_bytes"], extra=extra, version=2
        )
        assert again == blob


@pytest.mark.parametrize("codec", CODECS)
def test_the_spec_s_reference_reader_agrees(codec: str) -> None:
    read_blob = _reference_reader()["read_blob"]
    skel = skeleton_from_columns(_columns())
    for blob in _blobs(codec):
        index, fragments = read_blob(blob)
        shard = decode_shard(blob, skeleton=skel)
        assert index["rank"] == shard.rank and index["version"] == 2
        assert [(leaf, a, b) for leaf, a, b, _ in fragments] == [tuple(f) for f in shard.fragments]
        for (_, _, _, raw), t in zip(fragments, shard.data, strict=True):
            assert raw == t.view(torch.uint8).numpy().tobytes()
