"""Hostile DeepSpeed directories: the torch-free export and the torch path must agree.

A fuzzer over whole checkpoint directories (as tests/test_dir_fuzz.py is for zckpt's own
format): seeds are DeepSpeed-written fixtures and synthetic checkpoints; mutations delete,
rename or truncate files, bring in a file of another world size or stage, point ``latest``
elsewhere, or change one recorded value (``zero_stage``, ``partition_count``, a partition's
length or dtype, a slice mapping, a shape, ``dp_world_size``, a tie) and save the file again.
For each result, ``zckpt consolidate``'s torch-free export (``export_values``) and the torch
path (the lazy ``deepspeed_fp32_state_dict``, exported by the same writer) either both refuse
it with a zckpt error or write byte-identical files; nothing else is raised.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load

import zckpt
from zckpt.interop._deepspeed import deepspeed_fp32_state_dict, export_values
from zckpt.interop._safetensors import export_safetensors
from zckpt.interop._synthetic import write_zero_checkpoint
from zckpt.interop._unpickle import ALLOWED_GLOBALS, load_pickle

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "deepspeed"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/deepspeed")
REAL = [c for c in ("z1_ws2_fp32", "z2_ws2_bf16", "z3_ws2_fp32", "z2_ws2_bf16_moe")
        if (FIXTURES / c / "checkpoint").is_dir()]  # fmt: skip


@contextlib.contextmanager
def _deepspeed_names() -> Iterator[None]:
    """zckpt's stand-ins pickled under DeepSpeed's names (as DeepSpeed's files hold them):
    each name's module (a stand-in module where DeepSpeed is not imported) holds the stand-in
    for the duration; everything is put back after."""
    missing = object()
    saved: list[tuple[Any, str, str]] = []
    attrs: list[tuple[types.ModuleType, str, Any]] = []
    added: list[str] = []
    try:
        for full, cls in ALLOWED_GLOBALS.items():
            if full.endswith("DynamicLossScaler"):
                continue
            module, name = full.rsplit(".", 1)
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix not in sys.modules:
                    sys.modules[prefix] = types.ModuleType(prefix)
                    added.append(prefix)
            mod = sys.modules[module]
            attrs.append((mod, name, getattr(mod, name, missing)))
            setattr(mod, name, cls)
            saved.append((cls, cls.__module__, cls.__qualname__))
            cls.__module__, cls.__qualname__ = module, name
        yield
    finally:
        for cls, module, qual in saved:
            cls.__module__, cls.__qualname__ = module, qual
        for mod, name, old in attrs:
            if old is missing:
                delattr(mod, name)
            else:
                setattr(mod, name, old)
        for prefix in added:
            del sys.modules[prefix]


def _seeds(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for case in REAL:
        out[case] = root / case
        shutil.copytree(FIXTURES / case / "checkpoint", out[case])
    torch.manual_seed(0)
    params = {"a.weight": torch.randn(5, 3), "b.bias": torch.randn(7), "c": torch.randn(2)}
    for stage in (1, 2, 3):
        for ws in (1, 3):
            name = f"syn_z{stage}_ws{ws}"
            out[name] = root / name
            write_zero_checkpoint(
                out[name],
                params,
                world_size=ws,
                stage=stage,
                dtype=torch.float32 if ws == 1 else torch.bfloat16,
                frozen={"f": torch.ones(3)} if stage == 3 else None,
                buffers={"n": torch.tensor(4)},
                tied={"d": "c"},
                groups=[["a.weight"], ["b.bias", "c"]] if stage != 3 else None,
            )
    return out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _seeds(tmp_path_factory.mktemp("seeds"))


def _tag_dir(d: Path) -> Path:
    return d / (d / "latest").read_text().strip()


def _files(d: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(_tag_dir(d) / "*.pt")))


def _edit_value(obj: Any, which: int, delta: int) -> bool:
    """Change one recorded value of a loaded DeepSpeed file in place; whether one was found."""
    osd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
    edits: list[Any] = []
    if isinstance(osd, dict):
        if "zero_stage" in osd:
            edits.append(lambda: osd.__setitem__("zero_stage", int(osd["zero_stage"]) + delta))
        if "partition_count" in osd:
            pc = osd["partition_count"]
            new = [p + delta for p in pc] if isinstance(pc, list) else pc + delta
            edits.append(lambda: osd.__setitem__("partition_count", new))
        for key in ("single_partition_of_fp32_groups", "fp32_flat_groups"):
            ts = osd.get(key)
            if isinstance(ts, list) and ts:
                g = which % len(ts)
                t = ts[g]
                n = max(0, t.numel() + delta)
                edits.append(lambda ts=ts, g=g, t=t, n=n: ts.__setitem__(g, t.flatten()[:n]))

                def half(ts: list[Any] = ts, g: int = g, t: Any = t) -> None:
                    # fp16 masters (ZeRO's fp16_master_weights_and_grads): values of their own
                    ts[g] = t.half()
                    ROUNDED.add(1)

                edits.append(half)
        maps = osd.get("param_slice_mappings")
        if isinstance(maps, list) and maps and isinstance(maps[0], dict) and maps[0]:
            m = maps[which % len(maps)]
            if m:
                k = list(m)[which % len(m)]
                a = m[k]

                def shift(a: Any = a) -> None:
                    if which % 2:
                        a.numel = max(0, a.numel + delta)
                    else:
                        a.start = max(0, a.start + delta)

                edits.append(shift)
    elif isinstance(obj, dict):
        shapes = obj.get("param_shapes")
        if isinstance(shapes, list) and shapes:
            g = shapes[which % len(shapes)]
            if g:
                k = list(g)[which % len(g)]
                s = list(g[k])
                s[0] = max(0, s[0] + delta)
                edits.append(lambda: g.__setitem__(k, torch.Size(s)))
        if "dp_world_size" in obj:
            edits.append(lambda: obj.__setitem__("dp_world_size", obj["dp_world_size"] + delta))
        edits.append(lambda: obj.__setitem__("shared_params", {"x": "missing"}))
        edits.append(lambda: obj.__setitem__("buffer_names", ["missing"]))
    if not edits:
        return False
    edits[which % len(edits)]()
    return True


#: Non-empty when a mutation gave the checkpoint values of its own (a partition rounded to
#: fp16, a file of another save): only the two paths' agreement is checked then.
ROUNDED: set[int] = set()
MUTATIONS = st.tuples(
    st.sampled_from(["delete", "rename", "truncate", "foreign", "latest", "value", "value_all"]),
    st.integers(0, 1 << 16),
    st.sampled_from([-3, -2, -1, 1, 2, 3]),
)
LATEST = ["../seeds", "/etc", "", "nonexistent", "step1/..", "."]


def _mutate(d: Path, kind: str, a: int, delta: int, seeds: dict[str, Path]) -> None:
    files = _files(d)
    if not files:
        return
    f = files[a % len(files)]
    if kind == "delete":
        f.unlink()
    elif kind == "rename":  # another rank's number
        name = f.name
        for r in range(8):
            if f"rank_{r}_" in name:
                name = name.replace(f"rank_{r}_", f"rank_{max(0, r + delta)}_")
                break
        f.rename(f.parent / name)
    elif kind == "truncate":
        size = f.stat().st_size
        os.truncate(f, a % max(size, 1))
    elif kind == "foreign":  # a file of the same name from a checkpoint of another world size
        others = [n for n in sorted(seeds) if _shape_of_run(n) != _shape_of_run(d.name)]
        for k in range(len(others)):
            cand = _tag_dir(seeds[others[(a + k) % len(others)]]) / f.name
            if cand.is_file():
                shutil.copyfile(cand, f)
                ROUNDED.add(2)  # another save's file: its values are its own
                break
    elif kind == "latest":
        (d / "latest").write_text(LATEST[a % len(LATEST)])
    else:  # one file's value; or the same lie told by every file of its kind
        kind_of = "optim" if "optim" in f.name else "model"
        for g in [x for x in files if kind_of in x.name] if kind == "value_all" else [f]:
            obj = load_pickle(g)  # its tensors map g: the new file is renamed over it
            if _edit_value(obj, a, delta):
                with _deepspeed_names():
                    torch.save(obj, g.with_suffix(".new"))
                os.replace(g.with_suffix(".new"), g)


def _shape_of_run(name: str) -> str:
    """A seed's world size and stage (``z2_ws2``): files of one are another's only across
    these (two seeds of one shape may hold other models)."""
    return "_".join(name.removeprefix("syn_").split("_")[:2])


def _export(values: Any, out: Path) -> bytes:
    export_safetensors(values, out)
    data = out.read_bytes()
    out.unlink()
    return data


def _outcome(d: Path, torch_free: bool, out: Path) -> bytes | str:
    try:
        if torch_free:
            return _export(export_values(d), out)
        return _export(deepspeed_fp32_state_dict(d, lazy_mode=True), out)
    except zckpt.ZckptError as e:
        return f"refused: {type(e).__name__}: {str(e).split(': ', 1)[-1][:60]}"


# 60 examples by default (~6 s); ZCKPT_DS_FUZZ_EXAMPLES=2500 for a hunt (~45 s).
@settings(
    max_examples=int(os.environ.get("ZCKPT_DS_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 1 << 8),
    mutations=st.lists(MUTATIONS, min_size=1, max_size=2),
)
@example(seed=0, mutations=[("value", 0, 1)])
@example(seed=6, mutations=[("value", 4, 1)])  # z1_ws2_fp32: a slice mapping's start + 1
def test_the_torch_free_export_and_the_torch_path_agree(
    tmp_path: Path, seeds: dict[str, Path], seed: int, mutations: list[tuple[str, int, int]]
) -> None:
    names = sorted(seeds)
    base = seeds[names[seed % len(names)]]
    d = tmp_path / base.name
    ROUNDED.clear()
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d)
    try:
        for kind, a, delta in mutations:
            _mutate(d, kind, a, delta, seeds)
    except (zckpt.ZckptError, OSError):
        event("a mutation could not read what it changes")
        return  # an earlier mutation broke the file it changes
    free = _outcome(d, True, tmp_path / "free.safetensors")
    path = _outcome(d, False, tmp_path / "torch.safetensors")
    if isinstance(free, str):  # the refusals seen, with ZCKPT_DS_FUZZ_WHY=1
        event(free[:80] if os.environ.get("ZCKPT_DS_FUZZ_WHY") else "refused")
    else:
        event("compared")
    if isinstance(free, str) or isinstance(path, str):
        assert isinstance(free, str) and isinstance(path, str), (free[:40], path[:40])
        return
    assert free == path, "the torch-free export differs from the torch path's"
    # Read without an error, the damaged checkpoint must still give the saved values (a name
    # may be missing, e.g. a tie or buffer list edited away; none may hold other values).
    if ROUNDED:
        return
    got, want = load(free), reference(base)
    # (A shape every file states alike is the checkpoint's word: stage 3 pads each parameter
    # to ceil(numel / ws) per rank, so one element more may be read from the padding.)
    same = [k for k in got if k in want and got[k].shape == want[k].shape]
    wrong = [k for k in same if not torch.equal(got[k], want[k])]
    assert not wrong, f"read without an error as other values: {wrong}"


_REFERENCE: dict[Path, dict[str, torch.Tensor]] = {}


def reference(seed: Path) -> dict[str, torch.Tensor]:
    """The seed's own export (unmutated), by the torch path."""
    if seed not in _REFERENCE:
        _REFERENCE[seed] = load(_export(deepspeed_fp32_state_dict(seed, lazy_mode=True),
                                        seed.parent / f"{seed.name}.safetensors"))  # fmt: skip
    return _REFERENCE[seed]
