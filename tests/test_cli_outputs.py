"""What the CLI writes: outputs appear whole or not at all, an existing one is refused without
``--overwrite``, permissions follow the umask, bad arguments write nothing, and a consolidate
killed at any instant leaves the old export or the new one, never a mix."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dir_mutations import file_tree as _tree
from safetensors.torch import load_file

import zckpt
from zckpt.cli import main
from zckpt.interop import _output as output
from zckpt.interop import export_safetensors
from zckpt.interop._output import OutputExistsError, is_temp_name
from zckpt.interop._synthetic import write_zero_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCALE = float(os.environ.get("ZCKPT_SLOW_SCALE", "1"))


def _state(seed: int, n: int = 8, numel: int = 1 << 18) -> dict[str, Any]:
    """A training state whose fp32 masters are ``n`` tensors of ``numel`` floats (1 MiB each)."""
    g = torch.Generator().manual_seed(seed)
    master = {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n)}
    return {
        "module": {k: v.bfloat16() for k, v in master.items()},
        "master": master,
        "global_steps": seed,
    }


@pytest.fixture(scope="module")
def cks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two checkpoints, A and B, with different values (so exports of each differ)."""
    root = tmp_path_factory.mktemp("cks")
    for name, seed in (("A", 1), ("B", 2)):
        zckpt.save_checkpoint(root / name, _state(seed), zckpt.ZeroSpec(2, 2), tag="t")
    return root / "A", root / "B"


@pytest.fixture
def small(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    zckpt.save_checkpoint(d, _state(3, n=3, numel=64), zckpt.ZeroSpec(2, 2), tag="step7")
    return d


KINDS: dict[str, tuple[str, list[str]]] = {
    "file": ("model.safetensors", []),
    "dir": ("hf", ["--max-shard-size", "1MB"]),
    "pt": ("model.pt", []),
}


def _argv(kind: str, ck: Path, out: Path, *extra: str) -> list[str]:
    return ["consolidate", str(ck), str(out), *KINDS[kind][1], "--quiet", *extra]


def _content(path: Path) -> Any:
    """What an export holds, comparable: the bytes of each file, or a .pt file's tensors."""
    if path.suffix == ".pt":
        loaded = torch.load(path, weights_only=True)
        return {k: v.numpy().tobytes() for k, v in loaded.items()}
    return _tree(path)


def _visible(parent: Path) -> list[str]:
    """Entries a user would take for outputs; the dot-prefixed temporaries must all be ours."""
    names = sorted(os.listdir(parent))
    strays = [n for n in names if n.startswith(".")]
    assert all(is_temp_name(n) for n in strays), strays
    return [n for n in names if not n.startswith(".")]


def _remove_strays(parent: Path) -> list[str]:
    strays = [n for n in os.listdir(parent) if is_temp_name(n)]
    for n in strays:
        output._rmtree_quiet(str(parent / n))
    return strays


# --- refusing, replacing, permissions -----------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(
    kind: str, cks: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = cks
    out = tmp_path / KINDS[kind][0]
    assert main(_argv(kind, a, out)) == 0
    old = _content(out)
    capsys.readouterr()
    assert main(_argv(kind, b, out)) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "overwrite=True" not in err, err
    assert _content(out) == old
    assert main(_argv(kind, b, out, "--overwrite")) == 0
    new = _content(out)
    assert new != old
    ref = tmp_path / "ref" / KINDS[kind][0]
    assert main(_argv(kind, b, ref)) == 0
    assert new == _content(ref)
    assert _visible(tmp_path) == sorted([out.name, "ref"])


def test_shard_directory_is_replaced_whole_no_stale_shards(
    cks: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = cks
    out = tmp_path / "hf"
    assert main(["consolidate", str(a), str(out), "--max-shard-size", "1MB", "-q"]) == 0
    assert len(os.listdir(out)) > 2
    assert (
        main(["consolidate", str(b), str(out), "--max-shard-size", "1GB", "-q", "--overwrite"]) == 0
    )
    assert os.listdir(out) == ["model.safetensors"]  # no index or shards of the old export
    want = zckpt.get_fp32_state_dict_from_zero_checkpoint(b)
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_directory_with_other_files_is_never_replaced(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    assert main(["consolidate", str(small), str(out), "-q"]) == 0
    (out / "config.json").write_text("{}")
    before = _tree(out)
    assert main(["consolidate", str(small), str(out), "-q", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and str(out) in err
    assert _tree(out) == before
    # the source itself, as OUT: refused (it would be swapped away)
    before = _tree(small)
    assert main(["consolidate", str(small), str(small), "-q", "--overwrite"]) == 1
    assert _tree(small) == before
    # a file inside the checkpoint directory is fine (DeepSpeed's zero_to_fp32 habit)
    assert main(["consolidate", str(small), str(small / "model.pt"), "-q"]) == 0


def test_output_kind_mismatch_is_refused(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d.safetensors").mkdir()
    assert main(["consolidate", str(small), str(tmp_path / "d.safetensors"), "--overwrite"]) == 1
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["consolidate", str(small), str(tmp_path / "f"), "--overwrite"]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"


def test_python_export_refuses_existing_and_says_overwrite_true(tmp_path: Path) -> None:
    sd = {"w": torch.ones(3)}
    one = tmp_path / "m.safetensors"
    export_safetensors(sd, one)
    before = one.read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite=True") as e:
        export_safetensors({"w": torch.zeros(3)}, one)
    assert str(one) in str(e.value) and "--overwrite" not in str(e.value)
    assert isinstance(e.value, zckpt.ZckptError) and isinstance(e.value, FileExistsError)
    assert one.read_bytes() == before
    export_safetensors({"w": torch.zeros(3)}, one, overwrite=True)
    assert torch.equal(load_file(one)["w"], torch.zeros(3))
    d = tmp_path / "sh"
    export_safetensors({"a": torch.ones(4), "b": torch.ones(4)}, d, max_shard_size=16)
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        export_safetensors(sd, d, max_shard_size=16)
    r = export_safetensors(sd, d, max_shard_size=16, overwrite=True)
    assert sorted(os.listdir(d)) == ["model.safetensors"] and r.index_path is None
    assert _visible(tmp_path) == ["m.safetensors", "sh"]


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_outputs_get_the_permissions_of_new_files(mask: int, small: Path, tmp_path: Path) -> None:
    with _umask(mask):
        assert output.read_umask() == mask and output.read_umask() == mask  # read, not changed
        for kind, (name, _) in KINDS.items():
            assert main(_argv(kind, small, tmp_path / "new" / name)) == 0
        assert main(_argv("dir", small, tmp_path / "hf2", "--max-shard-size", "300B")) == 0
        export_safetensors({"w": torch.ones(2)}, tmp_path / "py.safetensors")
    files = [tmp_path / "py.safetensors", *(tmp_path / "new").rglob("*"), *tmp_path.glob("hf2/*")]
    for f in files:
        want = (0o777 if f.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(f.stat().st_mode) == want, (f, oct(f.stat().st_mode))
    assert len(list(tmp_path.glob("hf2/*"))) > 2
    for d in (tmp_path / "new", tmp_path / "new" / "hf", tmp_path / "hf2"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask, d


# --- failures leave the old output and no temporaries -------------------------------------------


def _fail_writer(
    kind: str, exc: BaseException, monkeypatch: pytest.MonkeyPatch, at_call: int = 1
) -> None:
    """Make the kind's writer raise ``exc`` at its ``at_call``-th call (earlier calls work)."""
    import zckpt.interop._safetensors as st

    owner: Any = torch if kind == "pt" else st
    name = "save" if kind == "pt" else "_write"
    real = getattr(owner, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at_call:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_failed_overwrite_keeps_the_old_output_and_removes_temporaries(
    kind: str,
    exc: BaseException,
    cks: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = cks
    out = tmp_path / KINDS[kind][0]
    assert main(_argv(kind, a, out)) == 0
    old = _content(out)
    _fail_writer(kind, exc, monkeypatch, at_call=3 if kind == "dir" else 1)  # dir: 2 shards in
    code = main(_argv(kind, b, out, "--overwrite"))
    assert code == (130 if isinstance(exc, KeyboardInterrupt) else 1), capsys.readouterr().err
    assert _content(out) == old
    assert os.listdir(tmp_path) == [out.name]  # no temporary of any kind


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_failed_new_export_leaves_nothing_not_even_parents(
    kind: str, small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_writer(kind, OSError(5, "Input/output error"), monkeypatch)
    out = tmp_path / "a" / "b" / KINDS[kind][0]
    assert main(_argv(kind, small, out)) == 1
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_overwrite_without_renameat2_still_replaces(
    kind: str,
    exchange: bool,
    cks: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where renameat2 is missing (not Linux, old glibc, a filesystem without it), the
    fallbacks give the same results."""
    if not exchange:
        monkeypatch.setattr(output, "_rename2", lambda *a: False)
    a, b = cks
    out = tmp_path / KINDS[kind][0]
    ref = tmp_path / "ref" / KINDS[kind][0]
    assert main(_argv(kind, b, ref)) == 0
    assert main(_argv(kind, a, out)) == 0
    assert main(_argv(kind, b, out)) == 1
    assert main(_argv(kind, b, out, "--overwrite")) == 0
    assert _content(out) == _content(ref)
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, "ref"])


# --- bad arguments write nothing ----------------------------------------------------------------


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    ck = src / "ck"
    zckpt.save_checkpoint(ck, _state(3, n=3, numel=64), zckpt.ZeroSpec(2, 2), tag="step7")
    g = torch.Generator().manual_seed(1)
    master = {f"moe.experts.{i}.w": torch.randn(40, generator=g) for i in range(2)}
    state = {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}
    spec = zckpt.ZeroSpec(4, 2, experts=(r"experts\.(\d+)\.",), expert_parallel_size=2)
    zckpt.save_checkpoint(src / "moe", state, spec, tag="t")
    write_zero_checkpoint(src / "ds", {"w": torch.randn(7, generator=g)}, world_size=2, stage=1)
    return {"ck": ck, "moe": src / "moe", "ds": src / "ds", "missing": tmp_path / "missing"}


BAD_ARGS = [
    ["consolidate", "{ck}", "{out}", "--max-shard-size", "lots"],
    ["consolidate", "{ck}", "{out}", "--max-shard-size", "0"],
    ["consolidate", "{ck}", "{out}/a/b/m.safetensors", "--max-shard-size", "-1GB"],
    ["consolidate", "{ck}", "{out}/m.pt", "--max-shard-size", "1MB"],
    ["consolidate", "{missing}", "{out}/m.safetensors"],
    ["consolidate", "{ck}", "{out}/x/m.safetensors", "--tag", "nope"],
    ["consolidate", "{ck}", "{out}", "--dtype", "fp8"],
    ["reshard", "{ck}", "{out}", "--world-size", "0"],
    ["reshard", "{ck}", "{out}", "--world-size", "-3"],
    ["reshard", "{ck}", "{out}", "--world-size", "two"],
    ["reshard", "{moe}", "{out}", "--world-size", "3"],
    ["reshard", "{moe}", "{out}", "--world-size", "5", "--stage", "3"],
    ["reshard", "{ds}", "{out}", "--world-size", "0"],
    ["reshard", "{ck}", "{out}", "--world-size", "2", "--tag", "nope"],
    ["reshard", "{ck}", "{out}", "--world-size", "2", "--stage", "4"],
    ["reshard", "{ck}", "{out}", "--world-size", "2", "--codec", "lz4"],
    ["reshard", "{missing}", "{out}", "--world-size", "2"],
    ["convert", "--from", "deepspeed", "{missing}", "{out}"],
    ["convert", "--from", "deepspeed", "{ck}", "{out}"],
    ["convert", "--from", "deepspeed", "{ds}", "{out}", "--tag", "../x"],
    ["convert", "--from", "deepspeed", "{ds}", "{out}", "--tag", "nope"],
    ["convert", "--from", "zckpt", "{ds}", "{out}"],
    ["prune", "{out}", "--keep-last", "0"],
    ["prune", "{out}", "--keep-last", "-1"],
    ["prune", "{out}", "--keep-last", "2"],
    ["prune", "{ck}", "--keep-last", "0"],
    ["clean", "{out}"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=[" ".join(a) for a in BAD_ARGS])
def test_bad_arguments_create_nothing(
    argv: list[str],
    sources: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    before = _tree(tmp_path)
    args = [a.format(out=out, **{k: str(v) for k, v in sources.items()}) for a in argv]
    assert main([*args, "--quiet"]) in (1, 2)
    assert capsys.readouterr().err.startswith(("zckpt: error: ", "usage: "))
    assert not os.path.lexists(out)
    assert _tree(tmp_path) == before  # the sources are untouched too


def test_bad_argument_messages_use_the_flags(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    cases = [
        (["reshard", str(sources["ck"]), out, "--world-size", "0"], "--world-size must be"),
        (["reshard", str(sources["moe"]), out, "--world-size", "3"], "--world-size 3"),
        (["prune", str(sources["ck"]), "--keep-last", "0"], "--keep-last must be"),
        (["consolidate", str(sources["ck"]), out, "--max-shard-size", "x"], "--max-shard-size"),
    ]
    for argv, want in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert want in err and "keep_last" not in err, err


# --- reshard and convert: overlapping paths, existing runs --------------------------------------


def _ds(tmp_path: Path, name: str = "ds", tag: str = "step1") -> Path:
    d = tmp_path / name
    write_zero_checkpoint(d, {"w": torch.arange(7.0)}, world_size=2, stage=1, tag=tag)
    return d


def test_convert_refuses_to_write_over_or_inside_its_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = _ds(tmp_path)
    before = _tree(tmp_path)
    pairs = [(ds, ds), (ds, ds / "z"), (ds, ds / "step1"), (ds / "step1", ds), (ds, tmp_path)]
    for src, out in pairs:
        for extra in ([], ["--overwrite"]):
            assert main(["convert", "--from", "deepspeed", str(src), str(out), *extra]) == 1
            err = capsys.readouterr().err
            assert "the input" in err and str(out) in err, err
    assert _tree(tmp_path) == before
    with pytest.raises(output.OutputPathError):
        zckpt.interop.convert_deepspeed(ds, ds / "z")
    assert _tree(tmp_path) == before


def test_convert_into_an_existing_run_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = _ds(tmp_path)
    out = tmp_path / "z"
    zckpt.save_checkpoint(out, {"w": torch.ones(2)}, zckpt.ZeroSpec(1, 1), tag="other")
    convert = ["convert", "--from", "deepspeed", str(ds), str(out)]
    before = _tree(out)
    assert main(convert) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "training run" in err and "'other'" in err
    assert "--overwrite" in err and "overwrite=True" not in err
    assert _tree(out) == before  # nothing written before the refusal: no tag dir, no lock
    assert main([*convert, "--overwrite"]) == 0
    assert (out / "latest").read_text().strip() == "step1"
    assert [c.tag for c in zckpt.list_tags(str(out))] == ["other", "step1"]
    before = _tree(out)
    assert main(convert) == 1  # the same tag again
    err = capsys.readouterr().err
    assert "'step1'" in err and "--overwrite" in err and "overwrite=True" not in err
    assert _tree(out) == before
    assert main([*convert, "--overwrite"]) == 0
    assert torch.equal(zckpt.load_checkpoint(out).state["master"]["w"], torch.arange(7.0))
    # a directory holding only a 'latest' file (another DeepSpeed run) counts as a run
    other = _ds(tmp_path, "ds2", tag="step9")
    before = _tree(other)
    assert main(["convert", "--from", "deepspeed", str(ds), str(other)]) == 1
    assert "'latest'" in capsys.readouterr().err
    assert _tree(other) == before
    # --overwrite never lets zckpt files land in a DeepSpeed tag folder of the same name
    same = _ds(tmp_path, "ds3")
    before = _tree(same)
    assert main(["convert", "--from", "deepspeed", str(ds), str(same), "--overwrite"]) == 1
    assert "not a zckpt checkpoint" in capsys.readouterr().err
    assert _tree(same) == before


def test_reshard_refuses_overlap_and_existing_runs(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _tree(small)
    pairs = [
        (small, small),
        (small, small / "x"),
        (small, small / "step7"),
        (small / "step7", small),
    ]
    for src, out in pairs:
        for extra in ([], ["--overwrite"]):
            assert main(["reshard", str(src), str(out), "--world-size", "3", *extra]) == 1
            assert "the input" in capsys.readouterr().err
    assert _tree(small) == before
    out = tmp_path / "re"
    reshard = ["reshard", str(small), str(out), "--world-size", "3"]
    assert main(reshard) == 0
    before = _tree(out)
    assert main(reshard) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "overwrite=True" not in err
    assert _tree(out) == before
    assert main([*reshard[:-1], "1", "--overwrite"]) == 0
    assert zckpt.open_checkpoint(out).manifest.spec.world_size == 1
    (tmp_path / "file").write_text("x")
    assert main(["reshard", str(small), str(tmp_path / "file"), "--world-size", "2"]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_a_save_that_races_the_check_is_still_refused_with_the_cli_flag(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "re"
    assert main(["reshard", str(small), str(out), "--world-size", "3"]) == 0
    import zckpt.cli._convert as cli_convert

    monkeypatch.setattr(cli_convert, "_check_run", lambda *a: None)  # the tag appears later
    assert main(["reshard", str(small), str(out), "--world-size", "3"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err, err


# --- killed exports -----------------------------------------------------------------------------


Launch = Callable[[list[str]], Any]

RUN_MAIN = r"""
import os
from zckpt.cli import main
os._exit(main(ARGV))
"""


@pytest.fixture(scope="module")
def forked() -> Launch:
    """Start ``zckpt.cli.main(argv)`` in a child forked from a server that has already imported
    zckpt, torch and safetensors: a child is a real process (SIGKILL kills it mid-write) that
    starts in milliseconds instead of the seconds ``python -m zckpt.cli`` spends importing."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "zckpt.cli._convert", "safetensors.torch"])

    def launch(argv: list[str], code: str = RUN_MAIN, **env: Any) -> Any:
        p = ctx.Process(target=exec, args=(code, {"ARGV": argv, **env}))
        p.start()
        return p

    # Start the server now (seconds: its imports), so that no test times the startup.
    assert _wait(launch([], "import os\nos._exit(0)")) == 0
    return launch


def _wait(p: Any) -> int:
    if isinstance(p, subprocess.Popen):
        return int(p.wait())
    p.join()
    return int(p.exitcode)


def _settle(work: Path, name: str, refs: dict[str, Any]) -> None:
    """OUT is whole. Only where no atomic exchange exists may it be missing, between the two
    renames: then ``.NAME.*.zckpt-old`` is the old output, complete, and goes back."""
    if not os.path.lexists(work / name):
        olds = [n for n in os.listdir(work) if n.endswith(output.OLD_SUFFIX)]
        assert len(olds) == 1, os.listdir(work)
        assert _content(work / olds[0]) in refs.values()
        os.rename(work / olds[0], work / name)


def _kill_trials(
    kind: str,
    cks: tuple[Path, Path],
    root: Path,
    launch: Launch,
    trials: int,
    seed: int,
    startup: float = 0.0,
    lo: float = 0.0,
) -> list[str]:
    """Overwrite an export of A with one of B (and back) ``trials`` times, SIGKILLing the child
    at a random instant; after each kill OUT must be exactly one of the two exports."""
    a, b = cks
    name = KINDS[kind][0]
    refs: dict[str, Any] = {}
    for label, ck in (("A", a), ("B", b)):
        ref = root / "refs" / label / name
        assert main(_argv(kind, ck, ref)) == 0
        refs[label] = _content(ref)
    work = root / "work"
    work.mkdir()
    out = work / name
    t0 = time.monotonic()
    assert main(_argv(kind, a, out)) == 0
    inproc = time.monotonic() - t0

    def which() -> str:
        got = _content(out)
        for label, want in refs.items():
            if got == want:
                return label
        raise AssertionError(f"{out} is neither the old export nor the new one")

    current = "A"
    if startup:  # a fresh interpreter: its imports, then about the in-process time
        full = startup + 2 * inproc + 0.1
    else:  # an uninterrupted run, timed
        t0 = time.monotonic()
        assert _wait(launch(_argv(kind, b, out, "--overwrite"))) == 0
        full = time.monotonic() - t0
        assert which() == "B" and os.listdir(work) == [name]
        current = "B"
    rng = random.Random(seed)
    seen = []
    for _ in range(trials):
        target = "A" if current == "B" else "B"
        child = launch(_argv(kind, a if target == "A" else b, out, "--overwrite"))
        time.sleep(rng.uniform(max(0.9 * startup, lo * full), full * 1.05))
        (child.send_signal(signal.SIGKILL) if isinstance(child, subprocess.Popen) else child.kill())
        _wait(child)
        _settle(work, name, refs)
        assert _visible(work) == [name]
        current = which()
        strays = _remove_strays(work)
        seen.append("new" if current == target else "old, killed mid-write" if strays else "old")
    return seen


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_killed_overwrite_leaves_old_or_new_never_a_mix(
    kind: str, cks: tuple[Path, Path], tmp_path: Path, forked: Launch
) -> None:
    # A child runs for ~0.1-0.3 s; the kills fall from a fifth of that (reading is done about
    # halfway) to just after it ends. 6 x 3 instants, about 3 s in all.
    _kill_trials(kind, cks, tmp_path, forked, trials=6, seed=sorted(KINDS).index(kind), lo=0.2)


CRASH_AT = r"""
import os
import zckpt.interop._output as o
from zckpt.cli import main

calls = [0]

def at_call(fn):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == K and not AFTER:
            os._exit(9)
        result = fn(*args, **kwargs)
        if calls[0] == K and AFTER:
            os._exit(9)
        return result
    return wrapped

os.rename = at_call(os.rename)
os.replace = at_call(os.replace)
o._rename2 = (lambda *args: False) if NO_EXCHANGE else at_call(o._rename2)
os._exit(main(ARGV))
"""

# (kind, no exchange): what OUT holds when the process dies before / after each rename step.
STEPS = {
    ("file", False): ["old", "new"],  # os.replace
    ("pt", False): ["old", "new"],
    ("dir", False): ["old", "new"],  # renameat2(RENAME_EXCHANGE)
    ("dir", True): ["old", "missing", "new"],  # rename OUT away, rename the new one in
}


@pytest.mark.parametrize(("kind", "no_exchange"), sorted(STEPS), ids=lambda x: str(x))
def test_death_at_each_rename_step_is_recoverable(
    kind: str, no_exchange: bool, cks: tuple[Path, Path], tmp_path: Path, forked: Launch
) -> None:
    """Die (``os._exit``) just before and just after every rename of the protocol."""
    a, b = cks
    name = KINDS[kind][0]
    refs = {}
    for label, ck in (("old", a), ("new", b)):
        assert main(_argv(kind, ck, tmp_path / "refs" / label / name)) == 0
        refs[label] = _content(tmp_path / "refs" / label / name)
    states = STEPS[(kind, no_exchange)]
    for k in range(1, len(states)):  # the k-th rename of the protocol
        for after in (False, True):
            want = states[k if after else k - 1]
            work = tmp_path / f"w{k}{int(after)}"
            out = work / name
            assert main(_argv(kind, a, out)) == 0
            argv = _argv(kind, b, out, "--overwrite")
            env = {"K": k, "AFTER": after, "NO_EXCHANGE": no_exchange}
            assert _wait(forked(argv, CRASH_AT, **env)) == 9
            strays = [n for n in os.listdir(work) if n != name]
            assert strays and all(is_temp_name(n) for n in strays), strays
            if want == "missing":
                assert not os.path.lexists(out)
                (old,) = [n for n in strays if n.endswith(output.OLD_SUFFIX)]
                (new,) = [n for n in strays if n.endswith(output.TEMP_SUFFIX)]
                assert _content(work / new) == refs["new"]
                os.rename(work / old, out)  # the documented recovery
                assert _content(out) == refs["old"]
            else:
                assert _content(out) == refs[want], (k, after)
    # and with no crash at all, nothing is left over
    work = tmp_path / "done"
    assert main(_argv(kind, a, work / name)) == 0
    env = {"K": 0, "AFTER": False, "NO_EXCHANGE": no_exchange}
    assert _wait(forked(_argv(kind, b, work / name, "--overwrite"), CRASH_AT, **env)) == 0
    assert os.listdir(work) == [name] and _content(work / name) == refs["new"]


@pytest.fixture(scope="module")
def import_time(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Seconds ``python -m zckpt.cli`` takes to start: a run that fails at once."""
    d = tmp_path_factory.mktemp("imports")
    t0 = time.monotonic()
    bad = _python_m(["consolidate", str(d / "nope"), str(d / "x.safetensors"), "-q"])
    assert _wait(bad) == 1
    return time.monotonic() - t0


def _python_m(argv: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    cmd = [sys.executable, "-m", "zckpt.cli", *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_killed_python_dash_m_consolidate_many_instants(
    kind: str, cks: tuple[Path, Path], tmp_path: Path, import_time: float
) -> None:
    """The real entry point, ``python -m zckpt.cli consolidate``, SIGKILLed at random instants
    between the end of its imports and the end of its export (about 4 s a trial)."""
    trials = max(2, int(10 * SCALE))
    _kill_trials(kind, cks, tmp_path, _python_m, trials, seed=7, startup=import_time)


def test_a_symlinked_output_keeps_its_link(cks: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = cks
    for kind in ("dir", "file", "pt"):
        real = tmp_path / "real" / KINDS[kind][0]
        link = tmp_path / f"link-{KINDS[kind][0]}"
        assert main(_argv(kind, a, real)) == 0
        link.symlink_to(real)
        assert main(_argv(kind, b, link, "--overwrite")) == 0
        assert link.is_symlink() and _content(real) == _content(link)
        assert main(_argv(kind, b, tmp_path / "ref" / KINDS[kind][0])) == 0
        assert _content(real) == _content(tmp_path / "ref" / KINDS[kind][0])
