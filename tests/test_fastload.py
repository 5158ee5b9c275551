"""The C-unpickler fast path (``zckpt/interop/_fastload.py``) and the mapped eager outputs
(``zckpt/interop/_mapped.py``) of the DeepSpeed import.

The fast path must give exactly torch's ``weights_only`` result or step aside (``NOT_FAST``),
and never run anything from the file: checked on every DeepSpeed-written fixture, on hostile
files, and on random opcode streams of allowed and forbidden globals against torch itself.
"""

from __future__ import annotations

import functools
import glob
import os
import struct
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import zckpt
import zckpt.interop as zi
from zckpt.interop._fastload import NOT_FAST, fast_load, load_refs
from zckpt.interop._mapped import ENV, mapped_tensor
from zckpt.interop._pickle_scan import scan
from zckpt.interop._synthetic import write_zero_checkpoint
from zckpt.interop._unpickle import ALLOWED_GLOBALS

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "deepspeed"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/deepspeed")
PT_FILES = sorted(glob.glob(str(FIXTURES / "**" / "*.pt"), recursive=True))


def torch_load(path: str | os.PathLike[str]) -> Any:
    """torch's own weights_only load, with zckpt's stand-ins allowed (the reference)."""
    pairs: list[Any] = [(obj, name) for name, obj in ALLOWED_GLOBALS.items()]
    with torch.serialization.safe_globals(pairs):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def same(a: Any, b: Any, where: str = "$") -> str | None:
    """Where ``a`` and ``b`` differ (types, keys, tensors bit for bit, attributes), or None."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        if (a.dtype, a.shape, a.stride(), a.storage_offset(), a.requires_grad) != (
            b.dtype,
            b.shape,
            b.stride(),
            b.storage_offset(),
            b.requires_grad,
        ):
            return f"{where}: tensor layout"
        if not torch.equal(_bytes(a), _bytes(b)):
            return f"{where}: tensor bytes"
        return same(vars(a), vars(b), where + ".__dict__")
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{where}: keys {list(a)[:5]} vs {list(b)[:5]}"
        for k in a:
            r = same(a[k], b[k], f"{where}/{k}")
            if r:
                return r
        if type(a) is not dict:
            return same(vars(a), vars(b), where + ".__dict__")
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            r = same(x, y, f"{where}[{i}]")
            if r:
                return r
        return None
    if hasattr(a, "__dict__") and not isinstance(a, type) and not callable(a):
        return same(vars(a), vars(b), where + ".__dict__")
    if a is b:
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


# ---- every DeepSpeed-written file: fast, and exactly torch's result ----


@pytest.mark.skipif(not PT_FILES, reason="no DeepSpeed fixtures")
@pytest.mark.parametrize("path", PT_FILES, ids=lambda p: os.path.relpath(p, FIXTURES))
def test_fast_load_equals_torch_on_every_fixture(path: str) -> None:
    got = fast_load(path)
    assert got is not NOT_FAST, "a DeepSpeed-written file should take the fast path"
    assert same(got, torch_load(path)) is None


def test_fast_load_shares_storages_as_torch_does(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    p = tmp_path / "x.pt"
    torch.save({"a": base, "b": base[2:5], "c": [base]}, p)
    got = fast_load(str(p))
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
    assert got["b"].storage_offset() == 2 and got["c"][0] is not None
    assert same(got, torch_load(p)) is None


# ---- hostile files: refused, named, never run ----


class Marker:
    """A global that records being called (stands for os.system & co. without their harm)."""

    calls: ClassVar[list[Any]] = []


def _boom(*args: Any) -> None:
    Marker.calls.append(args)


_boom.__module__, _boom.__qualname__, _boom.__name__ = "zckpt_test_sentinel", "boom", "boom"
_SENTINEL = types.ModuleType("zckpt_test_sentinel")
_SENTINEL.boom = _boom  # type: ignore[attr-defined]
sys.modules["zckpt_test_sentinel"] = _SENTINEL


class Reduces:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


HOSTILE = {
    "os.system": (os.system, ("true",)),
    "builtins.eval": (eval, ("1",)),
    "builtins.getattr": (getattr, (1, "real")),
    "functools.partial": (functools.partial, (print,)),
    "torch._C._set_grad_enabled": (torch._C._set_grad_enabled, (True,)),
    "zckpt_test_sentinel.boom": (_SENTINEL.boom, (1,)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_globals_are_refused_with_the_file_and_the_global(
    tmp_path: Path, name: str
) -> None:
    fn, args = HOSTILE[name]
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Reduces(fn, args)}, p)
    Marker.calls.clear()
    assert fast_load(str(p)) is NOT_FAST
    assert load_refs(str(p)) is NOT_FAST
    short = name.rsplit(".", 1)[-1]
    for refs in (False, True):
        with pytest.raises(zi.UnsafePickleError, match=rf"evil\.pt.*{short}"):
            zi.load_pickle(p, refs=refs)
    assert Marker.calls == []


def test_reduce_on_an_allowed_but_not_callable_global_is_not_fast(tmp_path: Path) -> None:
    # REDUCE of torch.float32 (allowed as a value, not as a function): torch refuses it.
    data = _stream([b"c" + b"torch\nfloat32\n", b")", b"R"])
    p = _zip(tmp_path, data)
    assert not scan(data)
    assert fast_load(str(p)) is NOT_FAST
    with pytest.raises(zckpt.FormatError, match=r"x\.pt"):
        zi.load_pickle(p)


def _with_pickle(src: Path, dst: Path, edit: Any) -> None:
    """``src`` (a torch.save zip) rewritten to ``dst`` with its data.pkl passed through ``edit``."""
    import zipfile

    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as b:
        for info in a.infolist():
            body = a.read(info)
            b.writestr(info, edit(body) if info.filename.endswith("/data.pkl") else body)


@pytest.mark.parametrize("declared", [1, 2, 4, 50])
def test_a_storage_declared_another_size_than_its_record_is_refused(
    tmp_path: Path, declared: int
) -> None:
    # A storage of 3 floats whose pickle declares another element count: its record holds 12
    # bytes. Read as a file range it would be the next record's zip header taken for floats (a
    # silent wrong tensor, which torch's mmap=True load also returns): a FormatError naming it.
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0), "v": torch.arange(100.0)}, good)
    marker = b"cpu" + b"q\x06" + b"K\x03"  # the storage id's location, then numel 3

    def edit(data: bytes) -> bytes:
        assert data.count(marker) == 1 and data.count(b"K\x00K\x03\x85") == 1
        data = data.replace(marker, marker[:-1] + bytes([declared]))
        return data.replace(b"K\x00K\x03\x85", b"K\x00K" + bytes([declared]) + b"\x85")

    bad = tmp_path / "bad.pt"
    _with_pickle(good, bad, edit)
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(bad, weights_only=True)  # (torch's mmap=True load returns the wrong floats)
    for load in (load_refs, fast_load, zi.load_pickle):
        with pytest.raises(zckpt.FormatError, match=r"bad\.pt: storage data/0 .* record holds 12"):
            load(str(bad))
    assert fast_load(str(good)) is not NOT_FAST  # the edit, not the file, is what is refused


# ---- random opcode streams: refused, or exactly torch's result ----

GLOBALS = [
    b"collections\nOrderedDict\n",
    b"torch\nSize\n",
    b"torch\nfloat32\n",
    b"torch\nFloatStorage\n",
    b"torch\nTensor\n",
    b"torch._utils\n_rebuild_tensor_v2\n",
    b"deepspeed.runtime.fp16.loss_scaler\nLossScaler\n",
    b"deepspeed.runtime.zero.config\nZeroStageEnum\n",
    b"deepspeed.utils.tensor_fragment\nfragment_address\n",
    b"builtins\nset\n",
    b"builtins\ngetattr\n",
    b"os\nsystem\n",
    b"functools\npartial\n",
    b"zckpt_test_sentinel\nboom\n",
]
OPS = [
    b"N",
    b"\x88",
    b"\x89",
    b"K\x02",
    b"J\x00\x01\x00\x00",
    b"G" + struct.pack(">d", 1.5),
    b"X\x01\x00\x00\x00k",
    b"X\x01\x00\x00\x00j",
    b"}",
    b"]",
    b")",
    b"(",
    b"t",
    b"\x85",
    b"\x86",
    b"\x87",
    b"R",
    b"\x81",
    b"b",
    b"a",
    b"e",
    b"s",
    b"u",
    b"q\x00",
    b"q\x01",
    b"h\x00",
    b"h\x01",
    b"\x8f",
    b"\x8c\x01k",  # SHORT_BINUNICODE: not in torch's set
    b"\x93",  # STACK_GLOBAL: not in torch's set
]
TOKENS = st.one_of(st.sampled_from(OPS), st.sampled_from(GLOBALS).map(lambda g: b"c" + g))


def _stream(tokens: list[bytes]) -> bytes:
    return b"\x80\x02" + b"".join(tokens) + b"."


def _zip(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "x.pt"
    p.unlink(missing_ok=True)
    w = torch._C.PyTorchFileWriter(str(p))
    for name, rec in (("data.pkl", data), ("byteorder", sys.byteorder.encode())):
        w.write_record(name, rec, len(rec))
    w.write_end_of_file()
    return p


# As many examples as the profile says (tests/conftest.py: ci 200, long 3000); the @examples
# below keep the opcode classes that must be accepted (stand-in BUILD, OrderedDict BUILD) and
# the one that must be refused unrun, whatever the draw.
@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(TOKENS, max_size=14))
@example(
    [
        b"c" + GLOBALS[6],
        b")",
        b"\x81",
        b"}",
        b"X\x01\x00\x00\x00k",
        b"K\x02",
        b"s",
        b"b",
    ]  # a LossScaler with an attribute: fast and equal
)
@example([b"c" + GLOBALS[0], b")", b"R", b"(", b"u", b"}", b"b"])  # OrderedDict BUILD
@example([b"c" + GLOBALS[13], b"K\x02", b"\x85", b"R"])  # the sentinel: refused, not run
def test_random_streams_are_refused_or_equal_to_torch(tmp_path: Path, tokens: list[bytes]) -> None:
    data = _stream(tokens)
    p = _zip(tmp_path, data)
    Marker.calls.clear()
    got = fast_load(str(p))  # load_refs, then to_torch: the sentinel check covers both
    try:
        want: Any = torch_load(p)
        refused = False
    except Exception:
        refused = True
    assert Marker.calls == [], "a forbidden global was called"
    if got is NOT_FAST:
        return
    assert not refused, "the fast path accepted what torch refuses"
    assert same(got, want) is None


def test_fuzz_examples_take_the_fast_path(tmp_path: Path) -> None:
    # The property above is not vacuous: these streams are accepted by the fast path.
    loss = _stream([b"c" + GLOBALS[6], b")", b"\x81", b"}", b"X\x01\x00\x00\x00k", b"K\x02"])
    loss = loss[:-1] + b"sb."
    for data in (loss, _stream([b"c" + GLOBALS[0], b")", b"R", b"(", b"u"])):
        got = fast_load(str(_zip(tmp_path, data)))
        assert got is not NOT_FAST
        assert same(got, torch_load(tmp_path / "x.pt")) is None
    assert isinstance(got, OrderedDict)


# ---- mapped eager outputs ----


def _maps_of(path: str) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def _in_mapping(t: torch.Tensor, files: list[str]) -> bool:
    """Whether the page a quarter of the way into ``t`` is mapped from one of ``files`` (its
    first and last pages may be copied: partial pages)."""
    at = t.data_ptr() + t.numel() * t.element_size() // 4
    return any(a <= at < b for f in files for a, b in _maps_of(f))


linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux mappings")


@linux
@pytest.mark.parametrize(
    ("stage", "ws", "mapped"),
    # ZeRO-3 over 3 ranks cuts each tensor into thirds whose file offsets are not congruent
    # with their places in it: under 1 MiB could be mapped, so all is copied (still equal).
    [(1, 1, True), (2, 2, True), (2, 3, True), (3, 2, True), (3, 3, False)],
)
def test_eager_outputs_are_mapped_and_equal(
    tmp_path: Path, stage: int, ws: int, mapped: bool
) -> None:
    g = torch.Generator().manual_seed(stage * 10 + ws)
    params = {
        "big": torch.randn(700, 1031, generator=g),  # 2.9 MB, odd sizes: unaligned pieces
        "small": torch.randn(33, generator=g),
        "mid": torch.randn(1 << 19, generator=g),
    }
    write_zero_checkpoint(tmp_path, params, world_size=ws, stage=stage, tied={"alias": "big"})
    files = glob.glob(str(tmp_path / "step1" / "*optim_states.pt"))
    sd = zi.deepspeed_fp32_state_dict(tmp_path, map_files=True)
    copied = zi.deepspeed_fp32_state_dict(tmp_path)  # the default copies
    assert list(sd) == list(copied)
    for k in params:
        assert torch.equal(sd[k], params[k]) and torch.equal(copied[k], params[k])
    assert sd["alias"] is sd["big"]
    assert _in_mapping(sd["big"], files) == mapped and _in_mapping(sd["mid"], files) == mapped
    assert not _in_mapping(copied["big"], files)
    assert not _in_mapping(sd["small"], files)  # under MIN_BYTES: copied


@linux
def test_mapped_tensor_is_an_ordinary_tensor(tmp_path: Path) -> None:
    w = torch.randn(1 << 19)
    write_zero_checkpoint(tmp_path, {"w": w}, world_size=1, stage=2)
    (f,) = glob.glob(str(tmp_path / "step1" / "*optim_states.pt"))
    before = Path(f).read_bytes()
    t = zi.deepspeed_fp32_state_dict(tmp_path, map_files=True)["w"]
    assert _in_mapping(t, [f])
    t.add_(1)  # copy-on-write: the tensor changes, the file does not
    assert torch.equal(t, w + 1) and Path(f).read_bytes() == before
    assert torch.equal(zi.deepspeed_fp32_state_dict(tmp_path)["w"], w)
    torch.save({"w": t}, tmp_path / "re.pt")
    assert torch.equal(torch.load(tmp_path / "re.pt")["w"], w + 1)
    m = torch.nn.Linear(1 << 10, 1 << 9, bias=False)
    m.load_state_dict({"weight": t.view(1 << 9, 1 << 10)})
    assert torch.equal(m.weight.reshape(-1), w + 1)
    s = t.clone()
    s2 = zi.deepspeed_fp32_state_dict(tmp_path, map_files=True)["w"]
    s2.share_memory_()
    assert s2.is_shared() and torch.equal(s2, w) and not torch.equal(s, s2)
    os.remove(f)  # deleting the file is safe: the mapping keeps it
    assert torch.equal(t, w + 1)
    n = len(_maps_of(f + " (deleted)")) + len(_maps_of(f))
    del t
    assert len(_maps_of(f + " (deleted)")) + len(_maps_of(f)) < max(n, 1)


@linux
def test_map_on_by_environment_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_zero_checkpoint(tmp_path, {"w": torch.randn(1 << 19)}, world_size=2, stage=3)
    files = glob.glob(str(tmp_path / "step1" / "*optim_states.pt"))
    monkeypatch.delenv(ENV, raising=False)
    assert not _in_mapping(zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path)["w"], files)
    monkeypatch.setenv(ENV, "0")
    assert not _in_mapping(zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path)["w"], files)
    monkeypatch.setenv(ENV, "1")
    assert _in_mapping(zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path)["w"], files)


@linux
def test_default_outputs_do_not_change_when_the_files_are_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why mapping is opt-in: DeepSpeed re-saving a tag rewrites its files in place, and a
    mapped tensor's unwritten pages would then read the new bytes. The default copies."""
    monkeypatch.delenv(ENV, raising=False)
    w = torch.randn(1 << 19)
    write_zero_checkpoint(tmp_path, {"w": w}, world_size=1, stage=2)
    (f,) = glob.glob(str(tmp_path / "step1" / "*optim_states.pt"))
    copied = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path)["w"]
    mapped = zi.deepspeed_fp32_state_dict(tmp_path, map_files=True)["w"]
    size = os.path.getsize(f)
    with open(f, "r+b") as out:  # rewritten in place, same length: what a re-save may leave
        out.write(bytes(size))
    assert torch.equal(copied, w)
    assert not torch.equal(mapped, w)  # the hazard the opt-in accepts


def test_mapped_tensor_declines_small_and_in_memory() -> None:
    from zckpt.assemble import TensorSource
    from zckpt.spec import Fragment

    data = torch.arange(1 << 19, dtype=torch.float32)
    src = TensorSource(Fragment(0, 0, 1 << 19), data)
    assert mapped_tensor((1 << 19,), torch.float32, [(src, 0, 1 << 19)]) is None
    assert mapped_tensor((4,), torch.float32, [(src, 0, 4)]) is None
