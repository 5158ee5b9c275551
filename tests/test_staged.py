"""DeepSpeed and DCP checkpoints at URLs (issue 15: every API and subcommand takes URLs):
``get_fp32_state_dict_from_zero_checkpoint``, ``convert_deepspeed``, ``convert_dcp`` and the
commands read them through a staged local copy (``zckpt/interop/_staged.py``), and give what
the same checkpoint gives from local files; the copy is removed afterwards, an object replaced
during the copy is an error, and messages name the URL, never the private copy."""

from __future__ import annotations

import errno
import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zckpt
from zckpt.cli import main
from zckpt.interop import _staged, convert_dcp, convert_deepspeed
from zckpt.interop._output import OutputPathError
from zckpt.interop._synthetic import write_zero_checkpoint
from zckpt.store import StorageError, storage_for
from zckpt.testing import assert_states_equal

fsspec = pytest.importorskip("fsspec", reason="needs fsspec: pip install 'zckpt[s3]'")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"
fp32 = zckpt.get_fp32_state_dict_from_zero_checkpoint


@pytest.fixture
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Staged copies go under a directory of the test's own, checked empty afterwards."""
    import tempfile

    d = tmp_path / "staging"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    gc.collect()
    left = [n for n in os.listdir(d) if n.startswith("zckpt-staged-")]
    assert left == [], "a staged copy was left behind"


def _upload(local: Path, url: str) -> None:
    """Every file under ``local`` to the same names under ``url`` (as a sync would)."""
    storage, base = storage_for(url)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            storage.write_atomic(f"{base}/{f.relative_to(local).as_posix()}", [f.read_bytes()])


def _url() -> str:
    return f"memory://staged-{uuid.uuid4().hex[:12]}"


def _cases() -> list[Path]:
    found = sorted(p for p in FIXTURES.glob("z*") if (p / "checkpoint").is_dir())
    if not found:
        pytest.skip("DeepSpeed fixtures not found")
    return found


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["checkpoint", "universal"])
def test_deepspeed_fixtures_at_a_url_give_what_the_local_files_give(
    kind: str, staging: Path
) -> None:
    for case in _cases():
        if not (case / kind).is_dir():
            continue
        url = _url()
        _upload(case / kind, url)
        _same(fp32(url), fp32(case / kind))
        tag = case / kind / ("latest" if kind == "checkpoint" else "latest_universal")
        name = tag.read_text().strip()
        _same(fp32(f"{url}/{name}"), fp32(case / kind / name))  # the tag directory itself
        _same(fp32(url, tag=name, exclude_frozen_parameters=True),
              fp32(case / kind, tag=name, exclude_frozen_parameters=True))  # fmt: skip


def test_lazy_results_keep_the_copy_until_the_last_tensor_is_gone(staging: Path) -> None:
    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    lazy = fp32(url, lazy_mode=True)
    assert len(os.listdir(staging)) == 1  # held by the lazy tensors
    want = fp32(case)
    first = next(iter(lazy))
    del want[first]
    one = lazy.pop(first)
    for k, v in lazy.items():
        assert torch.equal(v.contiguous(), want[k]), k
    del lazy
    gc.collect()
    assert len(os.listdir(staging)) == 1  # ``one`` still reads from it
    assert one.contiguous().shape == one.shape
    del one
    gc.collect()  # the fixture checks it is gone


@settings(max_examples=12, deadline=None)
@given(
    world_size=st.integers(1, 4),
    stage=st.integers(1, 3),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_synthetic_deepspeed_checkpoints_round_trip_through_a_url(
    tmp_path_factory: pytest.TempPathFactory,
    world_size: int,
    stage: int,
    sizes: list[int],
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    src = tmp_path_factory.mktemp("ds")
    write_zero_checkpoint(src, params, world_size=world_size, stage=stage, tag="step7")
    url = _url()
    _upload(src, url)
    _same(fp32(url), fp32(src))
    dst = tmp_path_factory.mktemp("z")
    convert_deepspeed(url, dst / "from-url")
    convert_deepspeed(src, dst / "from-disk")
    for ws in (1, world_size + 1):
        a = zckpt.load_checkpoint(dst / "from-url", world_size=ws, rank=0).state
        b = zckpt.load_checkpoint(dst / "from-disk", world_size=ws, rank=0).state
        assert_states_equal(a, b)


def _dcp(root: Path, seed: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

    g = torch.Generator().manual_seed(seed)
    sd = {"model": {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5).half()}, "ep": 3}
    torch.save(sd, root / "sd.pt")
    torch_save_to_dcp(str(root / "sd.pt"), str(root / "step4"))
    (root / "sd.pt").unlink()
    return sd


def test_dcp_checkpoints_at_a_url(tmp_path: Path, staging: Path) -> None:
    sd = _dcp(tmp_path, 1)
    url = _url()
    _upload(tmp_path / "step4", f"{url}/step4")
    got = fp32(f"{url}/step4")
    assert torch.equal(got["w"], sd["model"]["w"])
    assert torch.equal(got["b"], sd["model"]["b"].float())
    _same(fp32(url, tag="step4"), got)
    saved = convert_dcp(f"{url}/step4", tmp_path / "z")
    assert saved.tag == "step4"  # the URL's name, as for a local directory
    state = zckpt.load_checkpoint(tmp_path / "z").state
    assert torch.equal(state["model"]["w"], sd["model"]["w"]) and state["ep"] == 3


def test_file_urls_are_local_paths_to_the_converters(tmp_path: Path, staging: Path) -> None:
    """Found here: ``convert_deepspeed("file:///.../checkpoint", dst)`` said "not a DeepSpeed
    checkpoint directory" (the URL taken as a relative path); so did ``convert_dcp``."""
    case = _cases()[0] / "checkpoint"
    assert convert_deepspeed(f"file://{case}", f"file://{tmp_path}/a").tag == "step3"
    assert convert_deepspeed(case, tmp_path / "b").tag == "step3"
    assert_states_equal(zckpt.load_checkpoint(tmp_path / "a").state,
                        zckpt.load_checkpoint(tmp_path / "b").state)  # fmt: skip
    _dcp(tmp_path, 2)
    assert convert_dcp(f"file://{tmp_path}/step4", tmp_path / "c").tag == "step4"
    with pytest.raises(OutputPathError):
        convert_deepspeed(f"file://{case}", case / "inside")


def test_errors_name_the_url_never_the_copy(tmp_path: Path, staging: Path) -> None:
    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    storage, base = storage_for(url)
    tag = (case / "latest").read_text().strip()
    optim = sorted(n for n in storage.listdir(f"{base}/{tag}") if "optim" in n)
    storage.remove(f"{base}/{tag}/{optim[-1]}")
    for call in (lambda: fp32(url), lambda: convert_deepspeed(url, tmp_path / "z")):
        with pytest.raises(zckpt.ZckptError) as e:
            call()
        assert url in str(e.value) and str(staging) not in str(e.value), str(e.value)
    assert not (tmp_path / "z").exists()
    with pytest.raises(zckpt.ZckptError, match="not a DeepSpeed checkpoint") as e:
        convert_deepspeed(f"{url}-nothing", tmp_path / "z")
    assert f"{url}-nothing" in str(e.value)
    with pytest.raises(zckpt.ZckptError) as e:
        fp32(f"{url}-nothing")
    assert f"{url}-nothing" in str(e.value)
    with pytest.raises(OutputPathError):
        convert_deepspeed(url, f"{url}/inside")


class _Replacing:
    """A storage that replaces ``victim`` with ``make(old bytes)`` after the first piece of it
    is read: a sync overwriting the checkpoint while it is copied."""

    def __init__(self, inner: Any, victim: str, make: Any) -> None:
        self.inner, self.victim, self.make, self.done = inner, victim, make, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, path: str, offset: int, length: int) -> bytes:
        data: bytes = self.inner.read(path, offset, length)
        if path == self.victim and not self.done:
            self.done = True
            old = self.inner.read(path, 0, self.inner.size(path))
            self.inner.write_atomic(path, [self.make(old)])
        return data


def _flip_last(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 1])


def _replaced_mid_copy(url: str, storage: Any, make: Any, monkeypatch: Any) -> StorageError:
    case = _cases()[0] / "checkpoint"
    tag = (case / "latest").read_text().strip()
    base = storage_for(url, storage)[1]
    for f in sorted(case.rglob("*")):
        if f.is_file():
            storage.write_atomic(f"{base}/{f.relative_to(case).as_posix()}", [f.read_bytes()])
    victim = sorted(n for n in storage.listdir(f"{base}/{tag}") if "optim" in n)[0]
    monkeypatch.setattr(_staged, "PIECE", 4096)
    monkeypatch.setattr(_staged, "IN_FLIGHT", 1)  # the victim's first piece read, then the rest
    with pytest.raises(StorageError) as e:
        fp32(url, storage=_Replacing(storage, f"{base}/{tag}/{victim}", make))
    assert victim in str(e.value) and e.value.errno == errno.ESTALE, str(e.value)
    return e.value


def test_an_object_replaced_while_it_is_copied_is_an_error(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory:// keeps no ETags: a replacement of another size is what it can tell."""
    url = _url()
    err = _replaced_mid_copy(url, storage_for(url)[0], lambda b: b + b"x", monkeypatch)
    assert "changed while it was copied" in str(err) or "replaced" in str(err)


def test_an_s3_object_replaced_by_one_of_its_size_is_an_error(
    s3_server: Any, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same bytes count, one bit flipped near the end: only the ETag tells."""
    from s3_support import BUCKET, KEY, SECRET

    so = {"endpoint_url": s3_server.endpoint, "key": KEY, "secret": SECRET}
    url = f"s3://{BUCKET}/replaced-{uuid.uuid4().hex[:12]}"
    err = _replaced_mid_copy(url, storage_for(url, storage_options=so)[0], _flip_last, monkeypatch)
    assert "replaced while it was copied" in str(err)


def test_no_room_for_the_copy_is_an_error_before_anything_is_copied(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    real = shutil.disk_usage
    monkeypatch.setattr(_staged.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(StorageError, match="set TMPDIR") as e:
        fp32(url)
    assert e.value.errno == errno.ENOSPC and url in str(e.value)


def test_a_zckpt_checkpoint_at_a_url_is_read_in_place(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*a: Any) -> None:
        raise AssertionError("a zckpt checkpoint was staged")

    monkeypatch.setattr(_staged, "stage", refuse)
    url = _url()
    w = torch.randn(5, 2)
    zckpt.save_checkpoint(url, {"module": {"w": w}}, zckpt.ZeroSpec(2, 1), tag="t")
    assert torch.equal(fp32(url)["w"], w)
    assert main(["inspect", url, "-q"]) == 0 and main(["verify", url]) == 0


def test_commands_read_foreign_checkpoints_at_urls(
    tmp_path: Path, staging: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    capsys.readouterr()
    for argv in (["inspect", url], ["inspect", url, "--json"], ["verify", url]):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert url in out and str(staging) not in out, out
    local = tmp_path / "local.safetensors"
    remote = tmp_path / "remote.safetensors"
    assert main(["consolidate", str(case), str(local), "-q"]) == 0
    assert main(["consolidate", url, str(remote), "-q"]) == 0
    assert local.read_bytes() == remote.read_bytes()
    assert main(["convert", "--from", "deepspeed", url, f"{url}-z", "-q"]) == 0
    assert main(["reshard", url, str(tmp_path / "r"), "--world-size", "3", "-q"]) == 0
    converted = zckpt.load_checkpoint(f"{url}-z", world_size=3, rank=1).state
    assert_states_equal(
        converted, zckpt.load_checkpoint(tmp_path / "r", world_size=3, rank=1).state
    )
    capsys.readouterr()
    assert main(["inspect", url, "--tag", "nope"]) == 1
    err = capsys.readouterr().err
    assert f"{url} is a DeepSpeed checkpoint directory with no tag 'nope'" in err, err
    assert str(staging) not in err
    assert main(["inspect", str(case), "--tag", "nope"]) == 1  # as on disk
    assert (
        f"{case} is a DeepSpeed checkpoint directory with no tag 'nope'" in capsys.readouterr().err
    )


def _s3_case(s3_server: Any, name: str) -> tuple[Path, str, dict[str, str], Any, str]:
    """The first DeepSpeed fixture uploaded under a fresh S3 prefix: (its local directory, the
    URL, the storage options, the storage and its base path)."""
    from s3_support import BUCKET, KEY, SECRET

    case = _cases()[0] / "checkpoint"
    so = {"endpoint_url": s3_server.endpoint, "key": KEY, "secret": SECRET}
    url = f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:12]}"
    storage, base = storage_for(url, storage_options=so)
    for f in sorted(case.rglob("*")):
        if f.is_file():
            storage.write_atomic(f"{base}/{f.relative_to(case).as_posix()}", [f.read_bytes()])
    return case, url, so, storage, base


def test_s3_deepspeed_checkpoint(s3_server: Any, tmp_path: Path, staging: Path) -> None:
    case, url, so, _, _ = _s3_case(s3_server, "ds")
    _same(fp32(url, storage_options=so), fp32(case))
    saved = convert_deepspeed(url, f"{url}-z", storage_options=so)
    assert saved.tag == "step3"
    convert_deepspeed(case, tmp_path / "z")
    assert_states_equal(
        zckpt.load_checkpoint(f"{url}-z", world_size=2, rank=0, storage_options=so).state,
        zckpt.load_checkpoint(tmp_path / "z", world_size=2, rank=0).state,
    )
    opts = [f"--storage-option={k}={v}" for k, v in so.items()]
    out = tmp_path / "s3.safetensors"
    assert main(["consolidate", url, str(out), "-q", *opts]) == 0
    assert main(["consolidate", str(case), str(tmp_path / "l.safetensors"), "-q"]) == 0
    assert out.read_bytes() == (tmp_path / "l.safetensors").read_bytes()


def test_the_format_predicates_take_urls(tmp_path: Path) -> None:
    """Found here: ``is_deepspeed_checkpoint`` and ``is_dcp_checkpoint`` said False of any URL
    (a ``file://`` one too), where the readers now take them."""
    from zckpt.interop import is_dcp_checkpoint, is_deepspeed_checkpoint

    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    tag = (case / "latest").read_text().strip()
    assert is_deepspeed_checkpoint(url) and is_deepspeed_checkpoint(f"{url}/{tag}")
    assert is_deepspeed_checkpoint(url, tag) and not is_deepspeed_checkpoint(url, "nope")
    assert is_deepspeed_checkpoint(f"file://{case}") and not is_dcp_checkpoint(url)
    _dcp(tmp_path, 3)
    _upload(tmp_path / "step4", f"{url}-dcp/step4")
    assert is_dcp_checkpoint(f"{url}-dcp/step4") and not is_dcp_checkpoint(f"{url}-dcp")
    assert is_dcp_checkpoint(f"file://{tmp_path}/step4")
    assert not is_deepspeed_checkpoint(f"{url}-dcp/step4") and not is_dcp_checkpoint(_url())


def test_prune_and_clean_refuse_a_deepspeed_save_dir_at_a_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found here: at a URL they said "kept 0" and "removed 0 item(s)" of a DeepSpeed save_dir
    with no ``latest`` (``deepspeed_tags`` listed local directories only), where a local one
    is refused; nothing was deleted either way."""
    case = _cases()[0] / "checkpoint"
    tag = (case / "latest").read_text().strip()
    url = _url()
    for t in ("global_step10", "global_step9"):
        _upload(case / tag, f"{url}/{t}")
    storage, base = storage_for(url)
    before = sorted(storage.listdir(f"{base}/global_step9"))
    from zckpt.interop import deepspeed_tags

    assert deepspeed_tags(url) == ["global_step9", "global_step10"]
    for argv in (["clean", url], ["prune", url, "--keep-last", "1"]):
        assert main(argv) == 1
        assert "is a DeepSpeed checkpoint" in capsys.readouterr().err
    assert sorted(storage.listdir(f"{base}/global_step9")) == before


def test_the_interop_readers_take_urls_or_say_which_calls_do(tmp_path: Path, staging: Path) -> None:
    """Found here: ``deepspeed_fp32_state_dict``, ``dcp_state_dict``, ``open_deepspeed`` and
    ``open_dcp`` said "not a DeepSpeed checkpoint directory" / "not a DCP checkpoint" of a URL
    where there was one."""
    from zckpt.interop import dcp_state_dict, deepspeed_fp32_state_dict, open_dcp, open_deepspeed

    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    _same(deepspeed_fp32_state_dict(url), deepspeed_fp32_state_dict(case))
    lazy = deepspeed_fp32_state_dict(url, lazy_mode=True)
    assert {k: v.contiguous().shape for k, v in lazy.items()} == {
        k: v.shape for k, v in deepspeed_fp32_state_dict(case).items()
    }
    sd = _dcp(tmp_path, 4)
    _upload(tmp_path / "step4", f"{url}-dcp/step4")
    got = dcp_state_dict(f"{url}-dcp/step4")
    assert torch.equal(got["model"]["w"], sd["model"]["w"]) and got["ep"] == 3
    nested = dcp_state_dict(f"{url}-dcp/step4", lazy_mode=True)
    assert torch.equal(nested["model"]["b"].contiguous(), sd["model"]["b"])
    for reader, target in ((open_deepspeed, url), (open_dcp, f"{url}-dcp/step4")):
        with pytest.raises(zckpt.errors.ArgumentError, match="reads local files"):
            reader(target)
    assert open_deepspeed(f"file://{case}").world_size >= 1
    assert open_dcp(f"file://{tmp_path}/step4").ranks >= 1
    del lazy, nested


def test_commands_refuse_before_copying_anything(
    tmp_path: Path, staging: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A command that would refuse its arguments refuses before the checkpoint at a URL is
    downloaded (found here: ``consolidate URL s3://out`` copied the checkpoint, then refused
    the URL OUT that its own check refuses "before anything is read")."""
    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    _dcp(tmp_path, 5)
    _upload(tmp_path / "step4", f"{url}-dcp/step4")
    run = tmp_path / "run"
    zckpt.save_checkpoint(run, {"w": torch.ones(2)}, zckpt.ZeroSpec(1, 1), tag="t")
    real = _staged.stage
    copies: list[str] = []

    def counting(storage: Any, path: str, found: Any) -> Any:
        copies.append(path)
        return real(storage, path, found)

    monkeypatch.setattr(_staged, "stage", counting)
    out, dcp = str(tmp_path / "o"), f"{url}-dcp/step4"
    refused = {
        "is a URL": ["consolidate", url, "memory://out/m.safetensors"],
        "unknown suffix": ["consolidate", url, str(tmp_path / "m.safetensor")],
        "is a DCP checkpoint": ["reshard", dcp, out, "--world-size", "2"],
        "already holds a training run": ["convert", "--from", "deepspeed", url, str(run)],
        "not a DCP checkpoint": ["convert", "--from", "dcp", url, out],
        "not a DeepSpeed checkpoint": ["convert", "--from", "deepspeed", dcp, out],
        "--world-size must be": ["reshard", url, out, "--world-size", "0"],
    }
    for message, argv in refused.items():
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert copies == [] and not (tmp_path / "o").exists()
    argv = ["convert", "--from", "dcp", f"{url}-dcp/step4", str(tmp_path / "o"), "--tag", "x9"]
    assert main([*argv, "-q"]) == 0  # --tag is the tag written, not one looked for
    assert [c.tag for c in zckpt.list_tags(tmp_path / "o")] == ["x9"] and len(copies) == 1


def test_an_object_named_like_a_folder_of_others_is_refused_before_copying(
    s3_server: Any, staging: Path
) -> None:
    """S3 holds ``extra`` beside ``extra/x``; a file system cannot. Staging said FileExistsError
    from os.makedirs half-way through the copy; now a StorageError names the object first."""
    case, url, so, storage, base = _s3_case(s3_server, "clash")
    tag = (case / "latest").read_text().strip()
    storage.write_atomic(f"{base}/{tag}/extra/x", [b"inner"])
    storage.write_atomic(f"{base}/{tag}/extra", [b"outer"])
    with pytest.raises(StorageError, match=rf"{tag}/extra: an object with the name of a folder"):
        fp32(url, storage_options=so)
    assert not [p for p in staging.iterdir() if p.name.startswith("zckpt-staged-")]


def test_folder_markers_are_skipped_and_dot_dot_names_refused(staging: Path) -> None:
    """S3 consoles make empty ``dir/`` objects ("Create folder"); a key with a ``..`` part
    would be copied outside the private directory."""
    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    storage, base = storage_for(url)
    tag = (case / "latest").read_text().strip()
    listing = _staged._listing(storage, f"{base}/{tag}")
    assert sorted(listing) == sorted(p.name for p in (case / tag).iterdir())

    class Listed:
        def __init__(self, names: list[tuple[str, int, str]]) -> None:
            self.names = names

        def files_under(self, path: str) -> list[tuple[str, int, str]]:
            return self.names

    got = _staged._listing(Listed([("a.pt", 3, "e"), ("zero/", 0, "")]), "s3://b/ck")  # type: ignore[arg-type]
    assert got == {"a.pt": (3, "e")}
    for bad in ("../x.pt", "zero/./x.pt", "zero//x.pt"):
        with pytest.raises(StorageError, match="cannot be copied as a file"):
            _staged._listing(Listed([(bad, 3, "")]), "s3://b/ck")  # type: ignore[arg-type]
    for clash in (["a/b/c", "a/b"], ["a", "a/b/c"]):
        with pytest.raises(StorageError, match=r"ck/a.*: an object with the name of a folder"):
            _staged._listing(Listed([(n, 1, "") for n in clash]), "s3://b/ck")  # type: ignore[arg-type]
    assert len(_staged._listing(Listed([("ab", 1, ""), ("a/b", 1, "")]), "s3://b/ck")) == 2  # type: ignore[arg-type]


def test_a_copy_left_by_a_killed_process_is_removed_by_the_next_one(staging: Path) -> None:
    """A process SIGKILLed while it holds a copy (an interrupted ``zckpt consolidate``) runs
    no cleanup; the next copy made on the host removes it, and never a live process's."""
    import signal
    import subprocess
    import sys

    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(60)"],
        stdin=subprocess.PIPE,
    )
    dead = staging / f"{_staged._prefix(child.pid)}abc"
    live = staging / f"{_staged._prefix(os.getppid())}def"  # the test runner's parent
    other = staging / f"{_staged._STAGED}otherhost-{child.pid}-ghi"
    for d in (dead, live, other):
        (d / "step3").mkdir(parents=True)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.stdin is not None
    child.stdin.close()
    _same(fp32(url), fp32(case))  # stages (and removes) a copy of its own
    assert not dead.exists() and live.exists() and other.exists()
    for d in (live, other):
        import shutil

        shutil.rmtree(d)


def _outcome(call: Any, root: str) -> tuple[str, Any]:
    """What ``call()`` gives: ("ok", its tensors as bytes) or (error type, message with
    ``root`` spelled ``<root>``)."""
    try:
        got = call()
    except Exception as e:
        return type(e).__name__, str(e).replace(root, "<root>")
    return "ok", {k: (v.dtype, v.shape, v.numpy().tobytes()) for k, v in got.items()}


_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 99), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("truncate"), st.integers(0, 99), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("delete"), st.integers(0, 99), st.just(0.0)),
    st.tuples(st.just("latest"), st.sampled_from(["step7", "nope", "../x", ""]), st.just(0.0)),
    st.tuples(st.just("none"), st.just(0), st.just(0.0)),
)


@settings(max_examples=25, deadline=None)
@given(
    world_size=st.integers(1, 3),
    stage=st.integers(1, 3),
    mutation=_MUTATIONS,
    seed=st.integers(0, 2**16),
)
def test_a_damaged_deepspeed_checkpoint_reads_the_same_at_a_url_as_on_disk(
    tmp_path_factory: pytest.TempPathFactory,
    world_size: int,
    stage: int,
    mutation: tuple[str, Any, float],
    seed: int,
) -> None:
    """Whatever is wrong with it, a checkpoint at a URL gives what the same files give on disk:
    the same tensors, or the same error naming the URL where the local one names the path."""
    g = torch.Generator().manual_seed(seed)
    params = {"a": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g)}
    src = tmp_path_factory.mktemp("ds")
    write_zero_checkpoint(src, params, world_size=world_size, stage=stage, tag="step7")
    _mutate(src, mutation)
    url = _url()
    _upload(src, url)
    _same_outcomes(
        str(src),
        url,
        (
            lambda root: fp32(root),
            lambda root: fp32(root, lazy_mode=True),
            lambda root: convert_deepspeed(root, tmp_path_factory.mktemp("z") / "out").tag,
        ),
        mutation,
    )


def _mutate(src: Path, mutation: tuple[str, Any, float]) -> None:
    kind, which, where = mutation
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "latest")
    victim = files[int(which) % len(files)] if kind in ("flip", "truncate", "delete") else None
    if victim is not None:
        data = victim.read_bytes()
        at = int(where * len(data))
        if kind == "flip" and data:
            victim.write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :])
        elif kind == "truncate":
            victim.write_bytes(data[:at])
        elif kind == "delete":
            victim.unlink()
    elif kind == "latest":
        (src / "latest").write_text(str(which))


def _same_outcomes(src: str, url: str, calls: Any, mutation: Any) -> None:
    for call in calls:
        local = _outcome(lambda call=call: _tensors(call(src)), src)  # type: ignore[misc]
        remote = _outcome(lambda call=call: _tensors(call(url)), url)  # type: ignore[misc]
        assert local == remote, (mutation, local[:1], remote[:1])


@settings(max_examples=20, deadline=None)
@given(mutation=_MUTATIONS, seed=st.integers(0, 2**16))
def test_a_damaged_dcp_checkpoint_reads_the_same_at_a_url_as_on_disk(
    tmp_path_factory: pytest.TempPathFactory, mutation: tuple[str, Any, float], seed: int
) -> None:
    from zckpt.interop import dcp_state_dict

    root = tmp_path_factory.mktemp("dcp")
    _dcp(root, seed)
    _mutate(root / "step4", mutation)
    url = _url()
    _upload(root, url)
    _same_outcomes(
        str(root),
        url,
        (
            lambda r: fp32(f"{r}/step4"),
            lambda r: fp32(r, tag="step4", lazy_mode=True),
            lambda r: _flat(dcp_state_dict(f"{r}/step4")),
            lambda r: convert_dcp(f"{r}/step4", tmp_path_factory.mktemp("z") / "out").tag,
        ),
        mutation,
    )


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, torch.Tensor) or hasattr(v, "contiguous"):
            out[prefix + k] = v
        else:
            out[prefix + k] = torch.tensor(list(repr(v).encode()))
    return out


def _tensors(got: Any) -> dict[str, torch.Tensor]:
    if isinstance(got, str):
        return {"tag": torch.tensor(list(got.encode()))}
    return {k: v.contiguous() if not isinstance(v, torch.Tensor) else v for k, v in got.items()}


def test_loading_a_foreign_checkpoint_as_zckpt_raises_naming_its_kind(
    tmp_path: Path, staging: Path
) -> None:
    """Found here: ``load_checkpoint`` of a DCP directory warned "nothing loaded" and returned
    an empty state (a resume that quietly starts from step 0), and of a DeepSpeed or DCP
    checkpoint at a URL explained it in terms of zckpt's manifest."""
    import warnings

    from zckpt.adapters import Checkpointer

    _dcp(tmp_path, 6)
    case = _cases()[0] / "checkpoint"
    url = _url()
    _upload(case, url)
    _upload(tmp_path / "step4", f"{url}-dcp/step4")
    _upload(case, f"{url}-nest/run1")
    cases = {
        str(tmp_path / "step4"): "is a PyTorch DCP checkpoint",
        f"{url}-dcp/step4": "is a PyTorch DCP checkpoint",
        url: "is a DeepSpeed checkpoint",
        f"{url}-nest": "its subdirectory 'run1' is a DeepSpeed checkpoint",
    }
    model = torch.nn.Linear(2, 2)
    ckpt = Checkpointer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never a "nothing loaded" warning
        for where, message in cases.items():
            for load in (
                lambda w=where: zckpt.load_checkpoint(w, world_size=1, rank=0),
                lambda w=where: zckpt.open_checkpoint(w),
                lambda w=where: ckpt.load_checkpoint(w),
            ):
                with pytest.raises(zckpt.CheckpointNotFoundError, match=message):
                    load()
    with pytest.raises(zckpt.CheckpointNotFoundError, match="convert it once"):
        zckpt.load_checkpoint(url, tag="step3", world_size=1, rank=0)


def test_inspect_at_a_url_lists_the_save_dirs_tags_as_on_disk(
    tmp_path: Path, staging: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the tag being read is copied; ``inspect`` said ``tags: step3`` of a save_dir at a
    URL holding two, and no ``latest`` for a tag directory given by its URL."""
    import json
    import shutil

    case = tmp_path / "ds"
    shutil.copytree(_cases()[0] / "checkpoint", case)
    tag = (case / "latest").read_text().strip()
    shutil.copytree(case / tag, case / "global_step1")
    url = _url()
    _upload(case, url)
    for where, extra in (("", []), ("", ["--tag", "global_step1"]), (f"/{tag}", [])):
        capsys.readouterr()
        assert main(["inspect", f"{case}{where}", "--json", *extra]) == 0
        local = json.loads(capsys.readouterr().out)
        assert main(["inspect", f"{url}{where}", "--json", *extra]) == 0
        remote = json.loads(capsys.readouterr().out.replace(url, str(case)))
        assert remote["tags"] == local["tags"] == ["global_step1", tag], (where, extra)
        assert remote["latest"] == local["latest"] == tag
        assert remote == local, (where, extra)
