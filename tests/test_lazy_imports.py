"""The command line starts without torch: ``zckpt --help``, ``--version``, and ``inspect``,
``verify``, ``prune`` and ``clean`` of a zckpt checkpoint never import torch or Numba (issue 14
part 4), nor NumPy for a checkpoint with a version 1 manifest, nor zstandard for a raw one; and
``import zckpt`` imports nothing heavy. Timings are in bench/bench_cli.py; these
tests check what is imported, which is what the timings rest on.

The packages' public names are lazy (PEP 562, zckpt/_lazy.py): the names each ``__init__``
lists for mypy under ``if TYPE_CHECKING:``, its lazy table and ``__all__`` must agree, and
every name must resolve to the object its module defines.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_format_hostile import forge

import zckpt
import zckpt.store._manifest as manifest_mod
from zckpt.format import decode_header, iter_problems
from zckpt.format._dtypes import TABLE, dtype_code, dtype_name, is_floating, torch_dtype
from zckpt.spec import FlatGroup
from zckpt.tree import TensorMeta

ROOT = Path(zckpt.__file__).parent
HEAVY = ("torch", "numba")
# Reported too: a version 2 manifest is planned with NumPy when read, a compressed one decoded
# with zstandard; a small raw checkpoint needs neither.
LIGHTER = ("numpy", "zstandard")

# Runs each command of argv lists (JSON in sys.argv[1]) through zckpt.cli.main in this one fresh
# process, and reports, per command, its exit code and which heavy modules were imported by then.
_CHILD = f"""
import json, sys
from zckpt.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    rc = main(argv)
    out.append([argv, rc, [m for m in {HEAVY + LIGHTER!r} if m in sys.modules]])
print("RESULT " + json.dumps(out))
"""


def _child(code: str, *args: str) -> Any:
    """What ``python -c code args`` prints after ``RESULT `` (JSON); it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _run_commands(commands: list[list[str]]) -> list[Any]:
    result: list[Any] = _child(_CHILD, json.dumps(commands))
    return result


def _small_checkpoint(d: Path, codec: str, world_size: int, stage: int) -> None:
    w = torch.randn(64, 32)
    emb = torch.randn(16, 8).bfloat16()
    state = {
        "module": {"w": w.bfloat16(), "emb": emb, "head": emb, "n": torch.tensor(3)},
        "master": {"w": w, "emb": emb.float()},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(64, 32), "step": 3}}},
        "flags": torch.tensor([True, False]),
        "global_steps": 3,
    }
    spec = zckpt.ZeroSpec(world_size, stage)
    for tag in ("one", "two"):
        zckpt.save_checkpoint(
            d, state, spec, tag=tag, codec=codec, client_state={"epoch": 1, "note": "plain"}
        )


@pytest.mark.parametrize(
    ("codec", "world_size", "stage", "v2"),
    [("raw", 2, 2, False), ("zstd", 4, 3, False), ("byteplane", 3, 1, True)],
)
def test_the_tensor_free_commands_never_import_torch_or_numba(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    codec: str,
    world_size: int,
    stage: int,
    v2: bool,
) -> None:
    if v2:  # a version 2 manifest: derived fragments, planned when it is read
        monkeypatch.setattr(manifest_mod, "V2_MIN_FRAGMENTS", 1)
    d = tmp_path / "ckpt"
    _small_checkpoint(d, codec, world_size, stage)
    assert zckpt.open_checkpoint(d).manifest.derived == v2
    commands = [
        ["--help"],
        ["--version"],
        ["inspect", "--help"],
        ["inspect", str(d)],
        ["inspect", str(d), "--tag", "one", "--json"],
        ["verify", str(d)],
        ["verify", str(d), "--tag", "two", "--json"],
        ["prune", str(d), "--keep-last", "1"],
        ["clean", str(d)],
    ]
    allowed = {"numpy"} if v2 else set()
    allowed |= {"zstandard"} if codec != "raw" else set()
    for argv, rc, imported in _run_commands(commands):
        assert rc == 0, argv
        unexpected = sorted(set(imported) - allowed)
        assert unexpected == [], f"zckpt {' '.join(argv)} imported {unexpected}"
    assert [c.tag for c in zckpt.list_tags(d)] == ["two"]  # prune did run


def test_a_small_raw_checkpoints_commands_import_neither_numpy_nor_zstandard(
    tmp_path: Path,
) -> None:
    """What bench/bench_cli.py times: each command, in a process of its own."""
    d = tmp_path / "ckpt"
    _small_checkpoint(d, "raw", 2, 2)
    assert not zckpt.open_checkpoint(d).manifest.derived
    for argv in (["inspect", str(d)], ["verify", str(d)], ["prune", str(d), "--keep-last", "1"]):
        ((_, rc, imported),) = _run_commands([argv])
        assert rc == 0 and imported == [], f"zckpt {' '.join(argv)} imported {imported}"


def test_a_failing_command_does_not_import_torch_either(tmp_path: Path) -> None:
    ((_, rc, imported),) = _run_commands([["verify", str(tmp_path / "missing")]])
    assert rc == 1 and imported == []


def test_import_zckpt_imports_nothing_heavy() -> None:
    code = (
        "import sys, zckpt, zckpt.cli;"
        "print(sorted(m for m in ('torch', 'numba', 'numpy', 'msgpack') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------- lazy packages

LAZY = ["zckpt", "zckpt.store", "zckpt.format", "zckpt.assemble", "zckpt.interop"]


def _declared(package: str) -> tuple[dict[str, str], dict[str, str]]:
    """(names imported under TYPE_CHECKING, names in the attach() table), each -> module."""
    path = ROOT.parent / (package.replace(".", "/") + "/__init__.py")
    tree = ast.parse(path.read_text())
    typed: dict[str, str] = {}
    table: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module, ast.dump(imp)
                for a in imp.names:
                    mod = imp.module if imp.module != "zckpt" else f"zckpt.{a.name}"
                    typed[a.asname or a.name] = mod
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            (mapping,) = [a for a in node.value.args if isinstance(a, ast.Dict)]
            for k, v in zip(mapping.keys, mapping.values):
                assert isinstance(k, ast.Constant) and isinstance(v, ast.Tuple)
                for elt in v.elts:
                    assert isinstance(elt, ast.Constant)
                    table[elt.value] = k.value
    return typed, table


@pytest.mark.parametrize("package", LAZY)
def test_type_checking_imports_lazy_table_and_all_agree(package: str) -> None:
    typed, table = _declared(package)
    mod = importlib.import_module(package)
    submodules = {n for n, m in typed.items() if m == f"{package}.{n}"}
    assert {n: m for n, m in typed.items() if n not in submodules} == table
    eager = {n for n in mod.__all__ if n not in typed and n in vars(mod)}
    assert set(mod.__all__) == set(typed) | eager, package
    assert set(mod.__all__) <= set(dir(mod))


@pytest.mark.parametrize("package", LAZY)
def test_every_lazy_name_is_the_defining_modules_object(package: str) -> None:
    typed, _ = _declared(package)
    mod = importlib.import_module(package)
    for name, where in typed.items():
        got = getattr(mod, name)
        if where == f"{package}.{name}":
            assert got is importlib.import_module(where)
        else:
            assert got is getattr(importlib.import_module(where), name), f"{package}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        getattr(mod, "no_such_name")  # noqa: B009


def test_private_submodules_stay_reachable_as_attributes() -> None:
    assert zckpt.store._read.open_checkpoint is zckpt.open_checkpoint
    assert zckpt.format._dtypes.TABLE is TABLE


# ---------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(("code", "name"), [(c, n) for c, n, _, _ in TABLE])
def test_dtype_names_stand_for_torch_dtypes(code: int, name: str) -> None:
    dt = getattr(torch, name)
    assert dtype_name(dt) == name and torch_dtype(name) is dt
    assert dtype_code(dt) == dtype_code(name) == code
    assert is_floating(name) == dt.is_floating_point
    meta, by_name = TensorMeta(dt, (2, 3)), TensorMeta(name, (2, 3))
    assert meta == by_name and hash(meta) == hash(by_name) and meta.dtype is dt
    assert meta.itemsize == dt.itemsize and repr(meta) == f"TensorMeta(dtype={dt}, shape=(2, 3))"
    assert meta != TensorMeta(name, (3, 2))
    group = FlatGroup("g", dt, (0,), (0,), 6, 8, 4)
    assert group == FlatGroup("g", name, (0,), (0,), 6, 8, 4) and group.dtype is dt


def test_a_dtype_without_a_code_keeps_its_torch_name() -> None:
    meta = TensorMeta(torch.quint8, (4,))
    assert meta.dtype_name == "quint8" and meta.dtype is torch.quint8 and meta.itemsize == 1
    with pytest.raises(zckpt.StateError, match=r"torch\.quint8 has no zckpt format code"):
        dtype_code(meta.dtype_name, "q")


def test_a_name_that_is_not_a_dtype_is_refused() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.dtype or a dtype name"):
        dtype_name(torch.float32.__class__)  # type: ignore[arg-type]
    with pytest.raises(zckpt.FormatError, match="dtype no_such is missing in this torch"):
        _ = TensorMeta("no_such", (1,)).dtype


def test_verify_checks_a_one_byte_plane_without_joining_planes() -> None:
    """verify (iter_problems) skips putting byte planes back together; a one-byte dtype's one
    plane is its bytes, and a bool byte of 2 in it is still found."""
    stored = b"\x01\x02\x00\x01"
    blob = forge([[9, [4]]], [(0, 0, 4, [(0, 4, 2, stored, 4, [[0, 4]])])])
    problems = list(iter_problems(blob))
    assert [type(p) for p in problems] == [zckpt.FormatError], problems
    assert "bool byte" in str(problems[0])


# ------------------------------------------------------------------- verifying without NumPy

# Lists every problem of each blob (paths in sys.argv[1:]) in a process where NumPy cannot be
# imported at all (None in sys.modules: "import numpy" raises ModuleNotFoundError).
_NO_NUMPY = """
import json, sys
sys.modules["numpy"] = None
from zckpt.format import iter_problems
out = []
for p in sys.argv[1:]:
    with open(p, "rb") as f:
        out.append([[type(e).__name__, str(e)] for e in iter_problems(f.read())])
print("RESULT " + json.dumps(out))
"""


def _damaged_blobs() -> list[bytes]:
    """Blobs with one problem each, and one without: see the test below for which."""
    import zstandard

    z = zstandard.ZstdCompressor().compress
    two = b"\x01\x02\x00\x01"  # a bool byte of 2

    def fp16_planes(exponents: bytes) -> bytes:  # 8 fp16 elements: a zstd plane, a raw one
        packed = z(exponents)
        planes = [[1, len(packed)], [0, 8]]
        return forge([[1, [8]]], [(0, 0, 8, [(0, 8, 2, packed + bytes(8), 16, planes)])])

    raw = forge([[0, [4]]], [(0, 0, 4, [(0, 4, 0, bytes(16), 16, None)])])
    h = decode_header(raw)
    frame = h.fragments[0].chunks[0].offset
    assert h.index_size < frame  # padding between the index and the frame
    padded = bytearray(raw)
    padded[frame - 1] = 1
    checksum = bytearray(raw)
    checksum[-1] ^= 1
    return [
        forge([[9, [4]]], [(0, 0, 4, [(0, 4, 0, two, 4, None)])]),  # raw frame
        forge([[9, [4]]], [(0, 0, 4, [(0, 4, 1, z(two), 4, None)])]),  # zstd frame
        forge([[9, [4]]], [(0, 0, 4, [(0, 4, 2, two, 4, [[0, 4]])])]),  # a one-byte plane
        fp16_planes(bytes(8)),  # whole
        fp16_planes(bytes(7)),  # a plane one byte short
        forge([[0, [4]]], [(0, 0, 4, [(0, 4, 1, z(bytes(15)), 16, None)])]),  # zstd, short
        bytes(padded),
        bytes(checksum),
        raw,  # whole
    ]


def test_verification_finds_the_same_problems_without_numpy(tmp_path: Path) -> None:
    """zckpt verify checks every frame without NumPy (``decode_chunk(join=False)`` into a
    ``bytearray``): each problem, and its wording, is what a process with NumPy finds."""
    blobs = _damaged_blobs()
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(tmp_path / f"b{i}.zck")
        paths[-1].write_bytes(blob)
    got = _child(_NO_NUMPY, *map(str, paths))
    assert got == [[[type(e).__name__, str(e)] for e in iter_problems(b)] for b in blobs]
    said = [" | ".join(f"{k}: {m}" for k, m in problems) for problems in got]
    assert all("FormatError: " in w and "bool byte is neither 0 nor 1" in w for w in said[:3])
    assert said[3] == "" and said[8] == ""
    assert "byte plane 0: zstd frame decodes to fewer than the 8 bytes declared" in said[4]
    assert "zstd frame decodes to fewer than the 16 bytes declared" in said[5]
    assert "non-zero padding" in said[6]
    assert said[7].startswith("ChecksumError: ")


def test_lazy_module_imports_on_the_first_attribute_read() -> None:
    code = (
        "import sys; from zckpt._lazy import lazy_module; w = lazy_module('wave'); "
        "print('wave' in sys.modules, w.open is sys.modules['wave'].open, 'open' in vars(w))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"], out
