"""``zckpt consolidate`` of a DeepSpeed checkpoint without torch (issue 14 part 3).

Where every value the export writes is a byte range of the checkpoint's files (fp32 masters,
tensors stored in the dtype the output keeps), the command reads the files as references
(``zckpt/interop/_refs.py``) and never imports torch (nor Numba, nor NumPy); where some value
must be computed (a 16-bit frozen parameter or buffer upcast to fp32), it imports torch for
that value. Either way its output is byte for byte the output of the torch path (the lazy
``deepspeed_fp32_state_dict`` exported by ``export_safetensors``, the path checked against
DeepSpeed's own ``zero_to_fp32`` tensor by tensor in tests/test_deepspeed.py). DeepSpeed's
``zero_to_fp32.py --safe_serialization`` itself refuses every fixture (their tied
``embed.weight``/``head.weight`` share memory, which ``safetensors`` refuses; the MoE case's
expert files it cannot read), so the byte-for-byte comparison with its file is made on the
suite's two checkpoints (``bench/suite.py --only export``), which have no tied weights.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import zckpt.interop as zi
from zckpt.cli import main
from zckpt.interop._deepspeed import deepspeed_fp32_state_dict, export_values
from zckpt.interop._fastload import NOT_FAST, load_refs
from zckpt.interop._pickle_scan import FAST_GLOBALS, _globals
from zckpt.interop._refs import TensorRef, to_torch
from zckpt.interop._safetensors import export_safetensors, module_key_order
from zckpt.interop._stream import FileRanges
from zckpt.interop._synthetic import write_zero_checkpoint
from zckpt.interop._unpickle import ALLOWED_GLOBALS
from zckpt.store._fp32 import LazyTensor

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "deepspeed"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/deepspeed")
CASES = sorted(p.name for p in FIXTURES.glob("z*") if (p / "checkpoint").is_dir())
HEAVY = ("torch", "numba", "numpy")


def torch_free(case: str) -> bool:
    """Whether a fixture's export is byte ranges only: fp32 training, or no frozen parameters
    (the bf16/fp16 cases keep a frozen parameter in the training dtype, upcast on export)."""
    return case.endswith(("_fp32", "_exclude_frozen", "_moe"))


# Runs `zckpt consolidate` (as zckpt.cli.main) for each (checkpoint, out) pair of sys.argv[1]
# in this one fresh process, and reports which heavy modules each left imported.
_CHILD = f"""
import json, sys
from zckpt.cli import main
out = []
for ckpt, dest in json.loads(sys.argv[1]):
    rc = main(["consolidate", ckpt, dest, "--max-shard-size", "5GB", "--quiet"])
    out.append([rc, [m for m in {HEAVY!r} if m in sys.modules]])
print("RESULT " + json.dumps(out))
"""


def _run_child(pairs: list[tuple[str, str]]) -> list[Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(pairs)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result: list[Any] = json.loads(line.removeprefix("RESULT "))
    return result


def _torch_path(ckpt: Path | str, out: Path) -> None:
    """The export as the torch path writes it (lazy state dict, streamed safetensors)."""
    sd = deepspeed_fp32_state_dict(ckpt, lazy_mode=True)
    export_safetensors(sd, out, max_shard_size="5GB", key_order=module_key_order(ckpt))


def _same_dirs(a: Path, b: Path) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.skipif(not CASES, reason="no DeepSpeed fixtures")
def test_every_fixture_without_torch_where_it_can_and_equal_to_the_torch_path(
    tmp_path: Path,
) -> None:
    free = [c for c in CASES if torch_free(c)]
    other = [c for c in CASES if not torch_free(c)]
    assert free and other
    # One process for all the torch-free cases: torch imported by one would show in the next.
    pairs = [(str(FIXTURES / c / "checkpoint"), str(tmp_path / "cli" / c)) for c in free]
    for c, (rc, heavy) in zip(free, _run_child(pairs)):
        assert rc == 0, c
        assert heavy == [], f"{c}: imported {heavy}"
    # The others upcast a 16-bit frozen parameter: torch, for that value only.
    pairs = [(str(FIXTURES / c / "checkpoint"), str(tmp_path / "cli" / c)) for c in other[:1]]
    ((rc, heavy),) = _run_child(pairs)
    assert rc == 0 and "torch" in heavy
    for c in other[1:]:
        args = ["consolidate", str(FIXTURES / c / "checkpoint"), str(tmp_path / "cli" / c)]
        assert main([*args, "--max-shard-size", "5GB", "--quiet"]) == 0, c
    for c in CASES:
        _torch_path(FIXTURES / c / "checkpoint", tmp_path / "torch" / c)
        _same_dirs(tmp_path / "cli" / c, tmp_path / "torch" / c)
        assert load_file(tmp_path / "cli" / c / "model.safetensors")


def test_a_bf16_checkpoint_like_the_suites_is_byte_ranges_and_torch_free(tmp_path: Path) -> None:
    # The suite's checkpoints: bf16 training, fp32 masters, no frozen parameters or buffers.
    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}.weight": torch.randn(33, 17, generator=g) for i in range(3)}
    for stage in (2, 3):
        d = tmp_path / f"z{stage}"
        write_zero_checkpoint(d, weights, world_size=2, stage=stage, dtype=torch.bfloat16)
        sd = export_values(d)
        assert all(isinstance(v, FileRanges) for v in sd.values())
        for k, w in weights.items():
            assert torch.equal(sd[k].contiguous(), w)
        ((rc, heavy),) = _run_child([(str(d), str(tmp_path / f"out{stage}"))])
        assert rc == 0 and heavy == []
        _torch_path(d, tmp_path / f"torch{stage}")
        _same_dirs(tmp_path / f"out{stage}", tmp_path / f"torch{stage}")


def test_values_that_must_be_computed_are_lazy_tensors_from_the_same_references(
    tmp_path: Path,
) -> None:
    w = torch.randn(5, 3)
    write_zero_checkpoint(
        tmp_path,
        {"w": w},
        world_size=2,
        stage=2,
        dtype=torch.bfloat16,
        buffers={"n": torch.arange(4, dtype=torch.bfloat16), "k": torch.tensor(7)},
        tied={"v": "w"},
    )
    sd = export_values(tmp_path)
    assert type(sd["n"]) is LazyTensor  # bf16 buffer, upcast: computed
    assert isinstance(sd["k"], FileRanges) and isinstance(sd["w"], FileRanges)
    assert sd["v"] is sd["w"]
    want = deepspeed_fp32_state_dict(tmp_path)
    assert list(sd) == list(want)
    for k, v in want.items():
        got = sd[k].contiguous()
        assert got.dtype == v.dtype and torch.equal(got, v), k


def test_a_hostile_global_is_refused_by_the_command_and_never_run(tmp_path: Path) -> None:
    write_zero_checkpoint(tmp_path / "c", {"w": torch.randn(4)}, world_size=2, stage=2)
    (optim,) = [p for p in (tmp_path / "c").rglob("*optim_states.pt") if "rank_1" in p.name]
    state = torch.load(optim, weights_only=False)
    state["evil"] = _Reduces(os.system, ("echo pwned > " + str(tmp_path / "ran"),))
    torch.save(state, optim)
    assert load_refs(str(optim)) is NOT_FAST
    with pytest.raises(zi.UnsafePickleError, match=r"optim_states\.pt.*system"):
        zi.load_pickle(optim, refs=True)
    assert main(["consolidate", str(tmp_path / "c"), str(tmp_path / "o"), "--quiet"]) == 1
    assert not (tmp_path / "ran").exists() and not (tmp_path / "o").exists()


class _Reduces:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def test_the_fast_globals_are_torch_allow_list_objects_by_name() -> None:
    # The stand-ins answer exactly the names the previous fast path took from torch's
    # allow-list, and each becomes the very object torch's allow-list maps the name to.
    import torch._weights_only_unpickler as wou

    allowed = wou._get_allowed_globals()
    named = {
        "collections.OrderedDict",
        "torch.Size",
        "torch.device",
        "torch.Tensor",
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
    }
    want = {
        n
        for n, o in allowed.items()
        if n in named or isinstance(o, (torch.dtype, torch.serialization.StorageType))
    }
    _globals()
    assert set(FAST_GLOBALS) - set(ALLOWED_GLOBALS) == want
    for name in want:
        got = to_torch([FAST_GLOBALS[name]])[0]
        assert got is allowed[name], name


def test_references_locate_the_bytes_torch_loads(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    p = tmp_path / "x.pt"
    torch.save({"a": base, "b": base[1:3], "t": base.t(), "h": base.half()[2]}, p)
    refs = load_refs(str(p))
    loaded = torch.load(p, weights_only=True, mmap=True)
    raw = p.read_bytes()
    for k in ("a", "b", "h"):
        r = refs[k]
        assert isinstance(r, TensorRef) and r.shape == tuple(loaded[k].shape)
        where = r.file_range()
        assert where is not None and where[0] == str(p)
        got = raw[where[1] : where[1] + where[2]]
        assert got == loaded[k].contiguous().numpy().tobytes(), k
    assert refs["t"].file_range() is None  # a transposed view is no byte range
