"""The ``zckpt`` command as a finished Unix tool (issue 12): a closed pipe, progress bars on
every long command, absurd world sizes, ``--help``, the codec a reshard keeps, inspect and
verify counting the same files, tied weights, DeepSpeed folders in prune/clean, output
suffixes, and advice in the command line's spelling."""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
import zckpt.cli._convert as convert_mod
import zckpt.cli._inspect as inspect_mod
from zckpt.cli import main
from zckpt.cli._main import EXIT_BROKEN_PIPE, _parser, cli_wording
from zckpt.spec._plan import FLAT, TENSOR

REPO = Path(__file__).resolve().parents[1]
DS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed" / "z2_ws2_bf16"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}


def _tied_state(n: int = 1000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(n, 16, generator=g)
    master = {"embed.weight": emb, "lm_head.weight": emb, "fc.bias": torch.zeros(16)}
    half: dict[int, torch.Tensor] = {}
    return {
        "module": {k: half.setdefault(id(v), v.bfloat16()) for k, v in master.items()},
        "master": master,
        "optimizer": {"state": {"embed.weight": {"exp_avg": torch.zeros_like(emb)}}},
        "global_steps": 3,
    }


def _save(d: Path, codec: str = "byteplane", **kw: Any) -> Path:
    kw.setdefault("client_state", {"epoch": 1})
    zckpt.save_checkpoint(d, _tied_state(), zckpt.ZeroSpec(4, 2), tag="step3", codec=codec, **kw)
    return d


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return _save(tmp_path / "ckpt")


def _cli(*argv: str, stdout: Any = subprocess.PIPE, **kw: Any) -> subprocess.CompletedProcess[Any]:
    cmd = [sys.executable, "-m", "zckpt", *argv]
    return subprocess.run(cmd, env=ENV, stdout=stdout, stderr=subprocess.PIPE, **kw)


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


# -- 1. a closed pipe -------------------------------------------------------------------------


def test_a_pipe_closed_before_any_output_exits_141_quietly(ckpt: Path) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before zckpt writes a byte: every write is EPIPE
    try:
        done = _cli("inspect", str(ckpt), stdout=w)
    finally:
        os.close(w)
    assert done.returncode == EXIT_BROKEN_PIPE == 141
    assert done.stderr == b""


def test_head_dash_1_reads_one_line_and_zckpt_stops_quietly(tmp_path: Path) -> None:
    many = {"module": {f"layer{i}.weight": torch.zeros(4) for i in range(3000)}}
    zckpt.save_checkpoint(tmp_path / "c", many, zckpt.ZeroSpec(1, 1), tag="t")
    cmd = [sys.executable, "-m", "zckpt", "inspect", str(tmp_path / "c")]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.readline()
    p.stdout.close()  # as head -1 does; the rest (over 200 KB) no longer fits in the pipe
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait() == 141
    assert first == b"format: zckpt\n" and err == b""


def test_help_into_a_closed_pipe_exits_141_quietly() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        done = _cli("reshard", "--help", stdout=w)
    finally:
        os.close(w)
    # argparse writes help itself and drops a failed write, so this may end 0: quietly either way.
    assert done.returncode in (0, 141) and done.stderr == b""


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(inspect_mod, "inspect", fails)
    assert main(["inspect", str(ckpt)]) == 1
    assert capsys.readouterr().err == "zckpt: error: Broken pipe\n"


# -- 2. progress bars -------------------------------------------------------------------------


class _Bar:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def update(self, n: int) -> None:
        self.record["updates"].append(n)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.record["closed"] = True


class _Recorder:
    """A stand-in for ``progress``: records each bar's total, description and updates."""

    def __init__(self) -> None:
        self.bars: list[dict[str, Any]] = []

    def __call__(
        self, args: argparse.Namespace, total: int | None, desc: str, unit: str = "B"
    ) -> _Bar:
        self.bars.append({"total": total, "desc": desc, "unit": unit, "updates": []})
        return _Bar(self.bars[-1])


def test_reshard_advances_its_bar_once_per_new_rank_to_the_total(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _Recorder()
    monkeypatch.setattr(convert_mod, "progress", rec)
    assert main(["reshard", str(ckpt), str(tmp_path / "r"), "--world-size", "3"]) == 0
    (bar,) = rec.bars
    assert bar["desc"] == "reshard" and bar["closed"]
    assert len(bar["updates"]) == 3 and sum(bar["updates"]) == bar["total"]
    skel = zckpt.open_checkpoint(ckpt).manifest.skeleton
    assert bar["total"] == sum(m.nbytes for m in skel.tensors)  # every element written once


def test_convert_and_deepspeed_reshard_show_import_and_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _Recorder()
    monkeypatch.setattr(convert_mod, "progress", rec)
    assert (
        main(["convert", "--from", "deepspeed", str(DS / "checkpoint"), str(tmp_path / "z")]) == 0
    )
    assert main(["reshard", str(DS / "checkpoint"), str(tmp_path / "r"), "--world-size", "3"]) == 0
    imp, write, imp2, write2 = rec.bars
    for b, ranks in ((imp, 2), (imp2, 2)):
        assert b["desc"] == "import" and b["updates"] == [1] * ranks and b["total"] == 2
    for b, ranks in ((write, 2), (write2, 3)):
        assert b["desc"] == "write" and len(b["updates"]) == ranks
        assert sum(b["updates"]) == b["total"] > 0


def _on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run ``python -m zckpt ARGV`` with stderr on a fresh pseudo-terminal (size 0 x 0, as
    some report); return its exit code and what the terminal showed."""
    leader, follower = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "zckpt", *argv],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return p.wait(), shown.decode(errors="replace")


def test_bars_are_drawn_on_a_terminal_and_quiet_silences_them(ckpt: Path, tmp_path: Path) -> None:
    code, shown = _on_a_terminal(["reshard", str(ckpt), str(tmp_path / "a"), "--world-size", "2"])
    assert code == 0 and re.search(r"reshard: 100%.*\|", shown), shown
    argv = ["convert", "--from", "deepspeed", str(DS / "checkpoint"), str(tmp_path / "b")]
    code, shown = _on_a_terminal(argv)
    assert code == 0 and "import: 100%" in shown and "write: 100%" in shown, shown
    code, shown = _on_a_terminal(["consolidate", str(ckpt), str(tmp_path / "m.safetensors")])
    assert code == 0 and "export: 100%" in shown, shown  # tied weights counted once
    argv = ["reshard", str(ckpt), str(tmp_path / "c"), "--world-size", "2", "--quiet"]
    code, shown = _on_a_terminal(argv)
    assert code == 0 and "reshard" not in shown and "%" not in shown


# -- 3. more ranks than elements --------------------------------------------------------------


def _empty_ranks(state: Any, spec: zckpt.ZeroSpec) -> int:
    plan = zckpt.plan_shards(state, spec)
    kinds = (FLAT, TENSOR)
    return sum(not any(plan.placements[f.leaf].kind in kinds for f in w) for w in plan.writes)


@pytest.mark.parametrize(("stage", "limit"), [(2, 5), (3, 10)])
def test_more_ranks_than_elements_is_refused_before_writing(
    stage: int, limit: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {"master": {"w": torch.arange(10.0)}, "module": {"w": torch.arange(10.0).half()}}
    src = tmp_path / "src"
    zckpt.save_checkpoint(src, state, zckpt.ZeroSpec(2, stage), tag="t")
    out = tmp_path / "out"
    ws = 1000
    assert main(["reshard", str(src), str(out), "--world-size", str(ws)]) == 1
    err = capsys.readouterr().err
    assert not out.exists()
    empty = _empty_ranks(state, zckpt.ZeroSpec(ws, stage))
    assert f"{empty:,} of the 1,000 ranks would hold no partitioned state" in err
    assert "10 elements" in err and f"--world-size {limit} or fewer" in err
    assert "--allow-empty-ranks" in err and err.count("\n") == 1
    # At the limit it writes; past it, the flag says so.
    assert main(["reshard", str(src), str(out), "--world-size", str(limit), "-q"]) == 0
    argv = ["reshard", str(src), str(tmp_path / "o2"), "--world-size", str(limit + 1)]
    assert main(argv) == 1
    assert main([*argv, "--allow-empty-ranks", "-q"]) == 0
    assert zckpt.open_checkpoint(tmp_path / "o2").manifest.spec.world_size == limit + 1


def test_absurd_world_size_is_refused_at_once_for_zckpt_and_deepspeed(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for src in (ckpt, DS / "checkpoint"):
        out = tmp_path / f"out-{src.name}"
        assert main(["reshard", str(src), str(out), "--world-size", "100000"]) == 1
        assert "of the 100,000 ranks would hold no partitioned state" in capsys.readouterr().err
        assert not out.exists()


def test_absurd_world_size_is_refused_when_nothing_is_partitioned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A module-only state at stage 1: every tensor replicated, each written once by one rank;
    # 100,000 ranks would write 99,998 empty files (it ran for minutes, found by hand).
    src = tmp_path / "ddp"
    state = {"module": {"w": torch.ones(4), "b": torch.ones(2)}}
    zckpt.save_checkpoint(src, state, zckpt.ZeroSpec(2, 1), tag="t")
    assert all(p.kind != FLAT for p in zckpt.open_checkpoint(src).manifest.plan().placements)
    out = tmp_path / "out"
    assert main(["reshard", str(src), str(out), "--world-size", "100000"]) == 1
    err = capsys.readouterr().err
    assert "99,998 of the 100,000 ranks would hold nothing" in err, err
    assert "--world-size 6 or fewer" in err and not out.exists()  # 4 + 2 elements
    assert main(["reshard", str(src), str(out), "--world-size", "6", "-q"]) == 0
    assert main(["reshard", str(src), str(tmp_path / "o7"), "--world-size", "7", "-q"]) == 1
    assert main(["reshard", str(src), str(tmp_path / "o7"), "--world-size", "7", "-q",
                 "--allow-empty-ranks"]) == 0  # fmt: skip


# -- 4. --help --------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


def test_top_level_help_lists_every_command_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in _subparsers(_parser()):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"  {name} ")]
        assert len(line.split(None, 1)[1]) > 20


def test_every_option_says_what_it_does_and_its_default() -> None:
    for name, sub in _subparsers(_parser()).items():
        for a in sub._actions:
            if isinstance(a, argparse._HelpAction) or not a.option_strings:
                continue
            assert a.help, (name, a.option_strings)
            said = "required" if a.required else "default"
            assert said in a.help, (name, a.option_strings)


def test_every_command_shows_an_example_that_parses(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    for name in _subparsers(parser):
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        example = text.split("example:\n", 1)[1].strip().splitlines()[0]
        argv = shlex.split(example, comments=True)
        assert argv[:2] == ["zckpt", name]
        parser.parse_args(argv[1:])


def test_reshard_help_says_the_codec_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reshard", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the source's, read from its blob headers; raw for DeepSpeed input" in text


# -- 4b. reshard keeps the codec ----------------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "zstd", "byteplane"])
def test_reshard_keeps_the_source_codec(
    codec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _save(tmp_path / "src", codec)
    assert main(["reshard", str(src), str(tmp_path / "r"), "--world-size", "3", "-q"]) == 0
    assert f"codec {codec} (the source's)" in capsys.readouterr().out
    old, new = zckpt.open_checkpoint(src), zckpt.open_checkpoint(tmp_path / "r")
    assert convert_mod.source_codec(new) == codec
    size = sum(r.size for r in new.manifest.files)
    assert size < 1.2 * sum(r.size for r in old.manifest.files)


def test_reshard_codec_flag_wins_and_deepspeed_defaults_to_raw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _save(tmp_path / "src", "byteplane")
    assert (
        main(["reshard", str(src), str(tmp_path / "r"), "--world-size", "2", "--codec", "raw"]) == 0
    )
    assert capsys.readouterr().out.rstrip().endswith("codec raw")
    assert convert_mod.source_codec(zckpt.open_checkpoint(tmp_path / "r")) == "raw"
    assert main(["reshard", str(DS / "checkpoint"), str(tmp_path / "d"), "--world-size", "3"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("codec raw")
    assert convert_mod.source_codec(zckpt.open_checkpoint(tmp_path / "d")) == "raw"


# -- 5. inspect and verify --------------------------------------------------------------------

#: The keys of ``zckpt inspect --json``, in order (docs/cli.md); tests/test_cli_inspect.py
#: holds DeepSpeed input to the same list.
INSPECT_KEYS = list(inspect_mod.INSPECT_SCHEMA)
TENSOR_KEYS = list(inspect_mod.TENSOR_KEYS)


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_layout_is_stable_and_documented(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _json(capsys, "inspect", str(ckpt))
    assert list(doc) == INSPECT_KEYS
    assert all(list(t) == TENSOR_KEYS for t in doc["tensors"])
    documented = (REPO / "docs" / "cli.md").read_text()
    for key in INSPECT_KEYS + TENSOR_KEYS:
        assert f"`{key}`" in documented, key


@pytest.mark.parametrize("client", [{"epoch": 1}, {}])
def test_inspect_and_verify_count_the_same_files(
    client: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _save(tmp_path / "c", client_state=client)
    doc = _json(capsys, "inspect", str(d))
    ver = _json(capsys, "verify", str(d))
    assert doc["files"] == ver["files"] == len(os.listdir(d / "step3")) - 1  # all but the manifest
    assert (doc["rank_blobs"], doc["expert_blobs"], doc["client_state_blob"]) == (
        4,
        0,
        bool(client),
    )
    said = "5 files (4 rank blobs + client state)" if client else "4 files (4 rank blobs)"
    assert main(["inspect", str(d)]) == 0
    assert f"files: {said.replace(' files', '', 1)}\n" in capsys.readouterr().out
    assert main(["verify", str(d)]) == 0
    assert f": {said}, " in capsys.readouterr().out


def test_expert_blobs_are_counted_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {"module": {f"experts.{e}.w": torch.ones(4) for e in range(2)} | {"g": torch.ones(4)}}
    spec = zckpt.ZeroSpec(2, 1, experts=(r"experts\.(\d+)\.",))
    zckpt.save_checkpoint(tmp_path / "m", state, spec, tag="t", client_state={"a": 1})
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert "files: 5 (2 rank blobs + 2 expert blobs + client state)\n" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "m")]) == 0
    assert "5 files (2 rank blobs + 2 expert blobs + client state)," in capsys.readouterr().out


def test_no_latest_and_nothing_frozen_are_never_printed_as_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _save(tmp_path / "c", save_latest=False)
    assert main(["inspect", str(d), "--tag", "step3"]) == 0
    out = capsys.readouterr().out
    assert "latest: (none)\n" in out and "frozen: (none)\n" in out
    assert "None" not in out and ": -\n" not in out
    assert _json(capsys, "inspect", str(d), "--tag", "step3")["latest"] is None


def test_inspect_shows_tied_aliases(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tied = {
        "module/lm_head.weight": "module/embed.weight",
        "master/lm_head.weight": "master/embed.weight",
    }
    assert _json(capsys, "inspect", str(ckpt))["tied"] == tied
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "tied (2, stored once):\n" in out
    assert re.search(r"\n  module/lm_head\.weight +-> +module/embed\.weight\n", out)
    untied = {"master": {"a": torch.ones(2), "b": torch.ones(2)}}
    zckpt.save_checkpoint(tmp := ckpt.parent / "u", untied, zckpt.ZeroSpec(1, 1), tag="t")
    assert _json(capsys, "inspect", str(tmp))["tied"] == {}
    assert main(["inspect", str(tmp)]) == 0
    assert "tied (" not in capsys.readouterr().out


# -- 6. prune and clean on DeepSpeed ----------------------------------------------------------


@pytest.mark.parametrize("command", [["prune", "--keep-last", "1"], ["clean"]])
@pytest.mark.parametrize("where", ["save_dir", "tag_dir", "no_latest"])
def test_prune_and_clean_refuse_deepspeed_folders(
    command: list[str], where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(DS / "checkpoint", root)
    if where == "no_latest":
        (root / "latest").unlink()
    path = root / "step3" if where == "tag_dir" else root
    before = _tree(root)
    assert main([command[0], str(path), *command[1:]]) == 1
    err = capsys.readouterr().err
    assert f"zckpt {command[0]} only manages zckpt checkpoints" in err and "DeepSpeed" in err
    assert _tree(root) == before


# -- 7. consolidate's output suffix -----------------------------------------------------------


@pytest.mark.parametrize("out", ["model.safetensor", "model.ckpt", "model.SAFETENSORS", "w.pth"])
def test_an_unknown_suffix_is_refused_with_what_is_accepted(
    out: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["consolidate", str(ckpt), str(tmp_path / "x" / out)]) == 1
    err = capsys.readouterr().err
    assert "unknown suffix" in err and ".safetensors" in err and ".pt or .bin" in err
    assert "end it with '/'" in err
    assert not (tmp_path / "x").exists()
    if out == "model.safetensor":
        assert "did you mean " + str(tmp_path / "x" / "model.safetensors") + "?" in err


@pytest.mark.parametrize("how", ["slash", "existing", "no_suffix", "max_shard_size"])
def test_the_ways_to_say_directory(how: str, ckpt: Path, tmp_path: Path) -> None:
    out = str(tmp_path / ("hf" if how == "no_suffix" else "hf.v2"))
    extra: list[str] = []
    if how == "slash":
        out += "/"
    elif how == "existing":
        os.mkdir(out)
    elif how == "max_shard_size":
        extra = ["--max-shard-size", "5GB"]
    assert main(["consolidate", str(ckpt), out, "-q", *extra]) == 0
    assert os.listdir(out) == ["model.safetensors"]


# -- 8. advice in the command line's spelling -------------------------------------------------


def test_advice_names_the_flag_not_the_python_argument(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_latest = tmp_path / "nl"
    _save(no_latest, save_latest=False)
    for argv in (
        ["inspect", str(no_latest)],
        ["consolidate", str(no_latest), str(tmp_path / "m.safetensors")],
        ["reshard", str(no_latest), str(tmp_path / "r"), "--world-size", "2"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "its committed tags are step3: pass one with --tag" in err, err
    # --debug shows the same exception (type kept), worded for the command line.
    with pytest.raises(zckpt.CheckpointNotFoundError, match="pass one with --tag"):
        main(["inspect", str(no_latest), "--debug"])


def test_the_stores_overwrite_advice_is_translated(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store's own refusal (a save racing the up-front check) says --overwrite."""
    out = tmp_path / "r"
    assert main(["reshard", str(ckpt), str(out), "--world-size", "2", "-q"]) == 0
    monkeypatch.setattr(convert_mod, "_check_run", lambda *a: None)  # let the store refuse
    monkeypatch.setattr(convert_mod, "_cli_wording", lambda *a: _nothing())
    assert main(["reshard", str(ckpt), str(out), "--world-size", "2", "-q"]) == 1
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def test_cli_wording_examples() -> None:
    assert cli_wording("x already holds a committed checkpoint; pass overwrite=True") == (
        "x already holds a committed checkpoint; pass --overwrite"
    )
    assert cli_wording("no tag given: pass tag=..., global_step=...") == (
        "no tag given: pass --tag TAG, global_step=..."
    )
    text = (
        "convert it with `zckpt convert --from deepspeed d OUT` (zckpt.interop.convert_deepspeed)"
    )
    assert cli_wording(text) == "convert it with `zckpt convert --from deepspeed d OUT`"
    assert cli_wording("nothing to translate") == "nothing to translate"


def test_no_error_of_these_commands_uses_python_spellings(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nl = _save(tmp_path / "nl", save_latest=False)
    cases = [
        ["inspect", str(nl)],
        ["verify", str(tmp_path / "nowhere")],
        ["consolidate", str(ckpt), str(tmp_path / "m.safetensor")],
        ["reshard", str(ckpt), str(ckpt / "x"), "--world-size", "2"],
        ["reshard", str(ckpt), str(tmp_path / "r"), "--world-size", "100000"],
        ["reshard", str(nl), str(tmp_path / "r"), "--world-size", "2", "--tag", "nope"],
        ["prune", str(DS / "checkpoint"), "--keep-last", "1"],
        ["convert", "--from", "deepspeed", str(ckpt), str(tmp_path / "z")],
    ]
    for argv in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("zckpt: error: ") and err.count("\n") == 1
        assert not re.search(r"\b[a-z_]+=(True|False|\.\.\.)|\btag=|pass one as the tag", err), err


# -- the helpers ------------------------------------------------------------------------------


def test_written_shards_reports_each_shard_after_the_writer_took_the_next() -> None:
    s = {"w": torch.zeros(10)}
    plan = zckpt.plan_shards(s, zckpt.ZeroSpec(2, 1))
    events: list[str] = []
    shards = convert_mod.WrittenShards(
        [zckpt.shard_state(s, plan, r) for r in range(2)], lambda n: events.append(f"done {n}")
    )
    for sh in shards:
        events.append(f"write {sh.rank}")
    assert events == ["write 0", "done 24", "write 1", "done 16"]
    assert len(shards) == 2 and shards[1].rank == 1 and [x.rank for x in shards[:1]] == [0]


def test_output_kind_on_existing_paths(tmp_path: Path) -> None:
    (tmp_path / "d.old").mkdir()
    (tmp_path / "f.ckpt").write_bytes(b"")
    assert convert_mod.output_kind(str(tmp_path / "d.old")) == "dir"
    with pytest.raises(zckpt.ZckptError, match=re.escape("unknown suffix '.ckpt'")):
        convert_mod.output_kind(str(tmp_path / "f.ckpt"))
    assert convert_mod.output_kind("x.bin", None) == "torch"
