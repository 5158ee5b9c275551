"""Fuzzing whole checkpoint directories: every public reader, on a directory mutated any way
(bytes, swapped files, crafted manifests and blobs re-checksummed, FIFOs, directories and
symlinks in place of files), raises a ``ZckptError`` or returns exactly what was committed.

Never another exception type, never a hang (each reader has a few seconds), never gigabytes of
memory (each runs under an address-space limit); ``zckpt verify`` fails whenever a reader of the
same tag raises, so a directory that verify passes loads bitwise. Readers run in forked children
of a fork server (``tests/dir_mutations.py``); a failure lists the mutations applied and every
reader that broke the rule, with its exception and where it was raised.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from dir_mutations import (
    BLOB_KINDS,
    LATEST_KINDS,
    MANIFEST_KINDS,
    SEEDS,
    SWAP_KINDS,
    TAGDIR_KINDS,
    TAGS,
    TYPE_KINDS,
    Harness,
    Params,
    Scratch,
    apply,
    build_fixture,
    fixture_client,
    fixture_state,
    summary,
    violations,
)
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.testing import assert_states_equal, tensors_bitwise_equal

SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))
ALL_PARAMS = [
    Params(ws, stage, codec, v2=v2)
    for ws in (2, 3)
    for stage in (1, 2, 3)
    for codec in ("raw", "zstd", "byteplane")
    for v2 in (False, True)
]
CI_PARAMS = [
    Params(2, 2, "raw"),
    Params(3, 3, "zstd"),
    Params(2, 1, "byteplane"),
    Params(3, 1, "raw"),
    Params(2, 3, "raw", chunk=4096),
    Params(3, 2, "byteplane"),
    # format version 2 (manifest and blobs), forced at this size
    Params(2, 3, "raw", v2=True),
    Params(3, 1, "zstd", v2=True),
]
V2 = Params(2, 2, "raw", v2=True)
BASE = Params(2, 2, "raw")  # the regression tests' fixture: raw keeps same-layout sizes equal
# Examples per property: a twentieth of the profile's (ci: 10); the slow test many more. No
# shrinking: an example with a hang costs seconds, and every failure already lists readable
# mutations (the regression tests above are the minimal ones).
EXAMPLES = max(5, settings.default.max_examples // 20)
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)


class Env:
    """The fork server and the fixture checkpoints (built once per module)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.harness = Harness(base / "server.log")
        self.fixtures: dict[Params, Path] = {}
        self.n = itertools.count()

    def fixture(self, p: Params) -> Path:
        if p not in self.fixtures:
            root = self.base / f"fixture-{p.name}"
            root.mkdir()
            build_fixture(root, p)
            results = self.harness.run(root, p.ws + 1, root / "golden.pt", make_golden=True)
            bad = [r for r in results if r["outcome"] != "ok"]
            assert not bad, f"the pristine fixture {p.name} does not read back:\n{summary(bad)}"
            self.fixtures[p] = root
        return self.fixtures[p]

    def scratch(self, p: Params) -> Scratch:
        root = self.base / f"scratch-{next(self.n)}"
        shutil.copytree(self.fixture(p), root, symlinks=True)
        return Scratch(root)

    def check(self, p: Params, mutations: list[tuple[Any, ...]], fail_fast: bool = False) -> None:
        """Apply ``mutations`` to a fresh copy of ``p``'s fixture and assert the invariant."""
        s = self.scratch(p)
        try:
            done = [apply(s, tuple(m)) for m in mutations]
            results = self.harness.run(
                s.root, p.ws + 1, self.fixture(p) / "golden.pt", fail_fast=fail_fast
            )
            bad = violations(results)
            if bad:
                lines = [f"fixture {p.name}; mutations:", *(f"  {m!r}: {d}" for m, d in
                         zip(mutations, done)), "violations:", *(f"  {b}" for b in bad),
                         "all readers:", summary(results)]  # fmt: skip
                raise AssertionError("\n".join(lines))
        finally:
            shutil.rmtree(s.root, ignore_errors=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    e = Env(tmp_path_factory.mktemp("dirfuzz"))
    yield e
    e.harness.close()


# ---------------------------------------------------------------------------------- sanity

from test_store import expected_holdings  # noqa: E402  (tests/ is on sys.path: conftest)


def expected_fp32(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    master, out = state["master"], {}
    for name, t in state["module"].items():
        src = "embed.weight" if name == "head.weight" else name
        if src in master:
            out[name] = master[src]
        elif t.is_floating_point():
            out[name] = t.float()
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("p", CI_PARAMS, ids=lambda p: p.name)
def test_pristine_fixture_reads_back_what_was_committed(env: Env, p: Params) -> None:
    """The harness's golden outputs (what each reader returns on the untouched directory) are
    the committed data, so comparing against them is comparing against the commit."""
    golden = torch.load(env.fixture(p) / "golden.pt", weights_only=False)
    for i, tag in enumerate(TAGS):
        step = i + 1
        state = fixture_state(SEEDS["ckpt"] + step, step)
        client = fixture_client(SEEDS["ckpt"] + step, step)
        g = golden[tag]
        assert_states_equal(g["full"], state)
        assert_states_equal(g["client"], client)
        assert_states_equal(g["client_only"], client)
        assert_states_equal(g["fp32"], expected_fp32(state))
        assert_states_equal(g["lazy"], expected_fp32(state))
        target = zckpt.ZeroSpec(p.ws + 1, p.stage)
        for r, part in enumerate(g["reshard"]):
            _, leaves = zckpt.tree.flatten(part)
            want = expected_holdings(state, target, r)
            assert len(leaves) == len(want)
            assert all(tensors_bitwise_equal(a, b) for a, b in zip(leaves, want)), (tag, r)
    # and the other checkpoint differs from this one in every blob (swaps are real changes)
    s = Scratch(env.fixture(p))
    for tag in TAGS:
        for r in range(p.ws):
            mine, theirs = s.find(s.ckpt, (tag, "rank", r)), s.find(s.other, (tag, "rank", r))
            assert mine is not None and theirs is not None
            assert mine.read_bytes() != theirs.read_bytes()
            if p.codec == "raw":  # same layout: same size, the manifest's size check passes
                assert mine.stat().st_size == theirs.stat().st_size
            # the fixture's format: version 2 rank blobs exactly when its manifest is version 2
            want = 2 if p.v2 else 1
            manifest = s.ckpt / tag / "manifest.zckm"
            assert int.from_bytes(manifest.read_bytes()[8:12], "little") == want
            assert int.from_bytes(mine.read_bytes()[8:12], "little") == want


def test_harness_catches_what_it_must(env: Env) -> None:
    """The checker itself: data other than the commit, another exception type, a hang, a crash
    and a huge allocation are all reported, and the ops after a hang still run."""
    ok = {"op": "load", "tag": "step1", "outcome": "ok"}
    assert violations([ok]) == []
    assert violations([{**ok, "outcome": "other", "type": "KeyError", "msg": "x", "where": ["f"]}])
    assert violations([{**ok, "outcome": "differs", "msg": "bytes differ"}])
    verify_ok = {"op": "verify", "tag": "step1", "outcome": "ok", "rc": 0}
    assert violations([verify_ok, {**ok, "outcome": "zckpt", "type": "FormatError", "msg": "x"}])
    raised = {**ok, "outcome": "zckpt", "type": "FormatError", "msg": ""}
    assert violations([{**verify_ok, "rc": 1}, raised]) == []
    root = env.fixture(BASE)
    ops = [["_hang", None], ["load", "step1"], ["_alloc_4g", None], ["_segfault", None],
           ["_spin", None], ["load", "step2"]]  # fmt: skip
    got = env.harness.run(root, 3, root / "golden.pt", ops=ops, timeout=1.0)
    assert [r["outcome"] for r in got] == ["timeout", "ok", "other", "killed", "timeout", "ok"]
    assert "blocked" in got[0]["msg"] and "CPU" in got[4]["msg"], got
    assert got[2]["type"] == "MemoryError"
    # a tensor changed by one bit is caught by the comparison
    s = env.scratch(BASE)
    try:
        frame = s.find(s.ckpt, ("step2", "rank", 0))
        assert frame is not None
        data = bytearray(frame.read_bytes())
        data[-1] ^= 1  # inside the last raw frame: the chunk checksum no longer matches
        frame.write_bytes(bytes(data))
        res = env.harness.run(s.root, 3, root / "golden.pt", ops=[["verify", "step2"]])
        assert res[0]["outcome"] == "ok" and res[0]["rc"] == 1
    finally:
        shutil.rmtree(s.root, ignore_errors=True)


# ---------------------------------------------------------------------------------- the silent swap


SWAPS = {  # kind: (the file replaced, the file whose bytes replace it), as (tree, role)
    "rank_from_other_ckpt": (("ckpt", ("step2", "rank", 1)), ("other", ("step2", "rank", 1))),
    "client_from_other_ckpt": (("ckpt", ("step2", "client")), ("other", ("step2", "client"))),
    "rank_from_other_tag": (("ckpt", ("step2", "rank", 0)), ("ckpt", ("step1", "rank", 0))),
    "client_from_other_tag": (("ckpt", ("step2", "client")), ("ckpt", ("step1", "client"))),
}


@pytest.mark.parametrize("kind", list(SWAPS))
def test_same_layout_file_swap_is_detected(env: Env, kind: str) -> None:
    """A blob from another checkpoint (or tag) of the same layout, copied over one of ours under
    our name, is internally valid (its own index and frame checksums pass) and has our size: only
    the manifest's binding of each file (its xxh3) tells it apart. Every reader that reads the
    file must raise; readers that do not read it still return the committed data."""
    from zckpt.cli import main

    s = env.scratch(BASE)
    try:
        (dt, dr), (st_, sr) = SWAPS[kind]
        dst, src = s.find(s.root / dt, dr), s.find(s.root / st_, sr)
        assert dst is not None and src is not None
        assert dst.stat().st_size == src.stat().st_size
        dst.write_bytes(src.read_bytes())
        d = str(s.ckpt)
        rank_file = kind.startswith("rank")
        golden = torch.load(env.fixture(BASE) / "golden.pt", weights_only=False)["step2"]
        undetected = []

        def must_raise(what: str, fn: Any) -> None:
            try:
                fn()
            except zckpt.ZckptError:
                return
            undetected.append(what)

        def load() -> None:
            zckpt.load_checkpoint(d, tag="step2")

        def lazy() -> None:
            sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(d, "step2", lazy_mode=True)
            for v in sd.values():
                v.contiguous()

        def client() -> None:
            zckpt.open_checkpoint(d, "step2").client_state()

        must_raise("load_checkpoint", load)
        if rank_file:
            must_raise("load_checkpoint(world_size=3)",
                       lambda: [zckpt.load_checkpoint(d, tag="step2", world_size=3, rank=r)
                                for r in range(3)])  # fmt: skip
            must_raise("fp32 state dict", lambda: zckpt.get_fp32_state_dict_from_zero_checkpoint(d))
            must_raise("lazy fp32 state dict", lazy)
            # Opening checks the manifest against the first rank file, so the client state of a
            # checkpoint with a foreign rank file may be refused too; it is never other data.
            try:
                got = zckpt.open_checkpoint(d, "step2").client_state()
            except zckpt.ZckptError:
                pass
            else:
                assert_states_equal(got, golden["client"])
        else:
            must_raise("client_state()", client)
            sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(d, "step2")
            assert_states_equal(sd, golden["fp32"])
        rc = main(["verify", d, "--tag", "step2", "--json"])
        if rc != 1:
            undetected.append(f"zckpt verify (exit {rc})")
        assert not undetected, (
            f"{dst.relative_to(s.root)} replaced by the bytes of {src.relative_to(s.root)}: "
            f"not detected by {undetected}"
        )
        # The untouched tag is unaffected.
        assert_states_equal(zckpt.load_checkpoint(d, tag="step1").state, golden_step1(env))
    finally:
        shutil.rmtree(s.root, ignore_errors=True)


def golden_step1(env: Env) -> Any:
    return torch.load(env.fixture(BASE) / "golden.pt", weights_only=False)["step1"]["full"]


# ---------------------------------------------------------------------------------- regressions

M = ("manifest",)
REGRESSIONS: list[tuple[str, Params, list[tuple[Any, ...]]]] = [
    # bytes
    ("bitflip-manifest-body", BASE, [("bitflip", "step2/manifest", 100, 3)]),
    ("bitflip-manifest-preamble-length", BASE, [("bitflip", "step2/manifest", 17, 6)]),
    ("bitflip-blob-index", BASE, [("bitflip", "step2/rank1", 60, 0)]),
    ("bitflip-blob-preamble-length", BASE, [("bitflip", "step2/rank1", 19, 7)]),
    ("bitflip-blob-frame", BASE, [("bitflip", "step2/rank0", -3, 5)]),
    ("bitflip-client-frame", BASE, [("bitflip", "step2/client", -1, 0)]),
    ("bitflip-latest", BASE, [("bitflip", "latest", 4, 0)]),
    ("overwrite-blob-magic", BASE, [("overwrite", "step2/rank0", 0, b"\x00\x00\x00\x00")]),
    ("overwrite-blob-version", BASE, [("overwrite", "step2/rank0", 8, b"\x02")]),
    ("overwrite-blob-flags", BASE, [("overwrite", "step2/rank0", 12, b"\x01")]),
    ("overwrite-manifest-flags", BASE, [("overwrite", "step2/manifest", 12, b"\x01")]),
    ("truncate-manifest", BASE, [("truncate", "step2/manifest", 40)]),
    ("truncate-manifest-empty", BASE, [("truncate", "step2/manifest", 0)]),
    ("truncate-blob-in-frames", BASE, [("truncate", "step2/rank1", -10)]),
    ("truncate-blob-in-index", BASE, [("truncate", "step2/rank1", 50)]),
    ("truncate-client", BASE, [("truncate", "step2/client", -1)]),
    ("truncate-latest-empty", BASE, [("truncate", "latest", 0)]),
    ("extend-blob", BASE, [("extend", "step2/rank0", b"\x00" * 64)]),
    ("extend-manifest", BASE, [("extend", "step2/manifest", b"junk")]),
    ("bitflip-zstd-frame", Params(3, 3, "zstd"), [("bitflip", "step2/rank2", -2, 1)]),
    ("bitflip-byteplane-frame", Params(2, 1, "byteplane"), [("bitflip", "step2/rank0", -2, 1)]),
    # crafted manifests
    *((f"manifest-{k}", BASE, [(*M, k, 1, 1)]) for k in MANIFEST_KINDS),
    # crafted blobs (manifest record rebound to the crafted file)
    *((f"blob-{k}-rank", BASE, [("blob", k, 1, 1)]) for k in BLOB_KINDS),
    ("blob-index_len_4g-client", BASE, [("blob", "index_len_4g", 1, 0)]),
    ("blob-zstd_overexpand-zstd", Params(3, 3, "zstd"), [("blob", "zstd_overexpand", 1, 2)]),
    ("blob-zstd_bomb_1g-zstd", Params(3, 3, "zstd"), [("blob", "zstd_bomb_1g", 1, 2)]),
    # file types
    *(
        (f"type-{k}-{t.replace('/', '-')}", BASE, [("type", k, t)])
        for k in TYPE_KINDS
        for t in ("latest", "step2/manifest", "step2/rank1", "step2/client")
    ),
    *((f"{k}", BASE, [("tagdir", k, 1)]) for k in TAGDIR_KINDS),
    # swaps
    *((f"swap-{k}", BASE, [("swap", k, 1, 1)]) for k in SWAP_KINDS),
    ("swap-rank-zstd", Params(3, 3, "zstd"), [("swap", "rank_from_other_ckpt", 1, 0)]),
    # latest
    *((f"{k}", BASE, [("latest", k)]) for k in LATEST_KINDS),
    # format version 2: blobs bound to the manifest's skeleton by digest and leaf columns
    *((f"v2-blob-{k}", V2, [("blob", k, 1, 1)]) for k in BLOB_KINDS),
    *((f"v2-manifest-{k}", V2, [("manifest", k, 1, 1)]) for k in MANIFEST_KINDS),
    *((f"v2-swap-{k}", V2, [("swap", k, 1, 0)]) for k in SWAP_KINDS),
]


@pytest.mark.parametrize(("case", "p", "mutations"), REGRESSIONS, ids=[c[0] for c in REGRESSIONS])
def test_regression(env: Env, case: str, p: Params, mutations: list[tuple[Any, ...]]) -> None:
    env.check(p, mutations)


# ---------------------------------------------------------------------------------- properties

targets = st.one_of(
    st.integers(0, 40),
    st.sampled_from(["latest", "step1/manifest", "step2/manifest", "step2/rank0", "step2/client"]),
)
positions = st.one_of(st.integers(0, 700), st.integers(-700, -1), st.integers(0, 1 << 20))
byte_mut = st.one_of(
    st.tuples(st.just("bitflip"), targets, positions, st.integers(0, 7)),
    st.tuples(st.just("overwrite"), targets, positions, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), targets, positions),
    st.tuples(st.just("extend"), targets, st.binary(min_size=1, max_size=70)),
)
tag_i, idx = st.integers(0, 1), st.integers(0, 3)
manifest_mut = st.tuples(st.just("manifest"), st.sampled_from(MANIFEST_KINDS), tag_i, idx)
blob_mut = st.tuples(st.just("blob"), st.sampled_from(BLOB_KINDS), tag_i, idx)
type_mut = st.one_of(
    st.tuples(st.just("type"), st.sampled_from(TYPE_KINDS), targets),
    st.tuples(st.just("tagdir"), st.sampled_from(TAGDIR_KINDS), tag_i),
)
swap_mut = st.tuples(st.just("swap"), st.sampled_from(SWAP_KINDS), tag_i, idx)
latest_mut = st.tuples(st.just("latest"), st.sampled_from(LATEST_KINDS))
any_mut = st.one_of(byte_mut, manifest_mut, blob_mut, type_mut, swap_mut, latest_mut)
ci_params = st.sampled_from(CI_PARAMS)


@settings(max_examples=EXAMPLES, phases=PHASES)
@given(ci_params, st.lists(byte_mut, min_size=1, max_size=3))
def test_fuzz_bytes(env: Env, p: Params, mutations: list[tuple[Any, ...]]) -> None:
    env.check(p, mutations, fail_fast=True)


@settings(max_examples=EXAMPLES, phases=PHASES)
@given(ci_params, st.lists(st.one_of(swap_mut, latest_mut, byte_mut), min_size=1, max_size=2))
def test_fuzz_swaps(env: Env, p: Params, mutations: list[tuple[Any, ...]]) -> None:
    env.check(p, mutations, fail_fast=True)


@settings(max_examples=EXAMPLES, phases=PHASES)
@given(ci_params, st.lists(manifest_mut, min_size=1, max_size=2))
def test_fuzz_crafted_manifests(env: Env, p: Params, mutations: list[tuple[Any, ...]]) -> None:
    env.check(p, mutations, fail_fast=True)


@settings(max_examples=EXAMPLES, phases=PHASES)
@given(ci_params, st.lists(st.one_of(blob_mut, manifest_mut), min_size=1, max_size=2))
def test_fuzz_crafted_blobs(env: Env, p: Params, mutations: list[tuple[Any, ...]]) -> None:
    env.check(p, mutations, fail_fast=True)


@settings(max_examples=EXAMPLES, phases=PHASES)
@given(ci_params, st.lists(type_mut, min_size=1, max_size=2))
def test_fuzz_file_types(env: Env, p: Params, mutations: list[tuple[Any, ...]]) -> None:
    env.check(p, mutations, fail_fast=True)


@pytest.mark.slow
@settings(max_examples=max(10, int(200 * SCALE)), phases=PHASES)
@given(st.sampled_from(ALL_PARAMS), st.lists(any_mut, min_size=1, max_size=4))
def test_fuzz_everything_slow(env: Env, p: Params, mutations: list[tuple[Any, ...]]) -> None:
    env.check(p, mutations, fail_fast=True)


def test_counterexample_fifo_tag_then_manifest_edit(env: Env) -> None:
    """Found by test_fuzz_everything_slow in CI: a manifest mutation after the tag directory
    became a FIFO crashed the harness (NotADirectoryError), not zckpt."""
    mutations = [
        ("tagdir", "tagdir_fifo", 1),
        ("manifest", "name_manifest", 1, 2),
        ("tagdir", "tagdir_fifo", 1),
    ]
    env.check(Params(ws=3, stage=2, codec="byteplane", chunk=128), mutations, fail_fast=True)
