"""``file://`` URLs are local paths everywhere (issue 15): saves, loads, the fp32 state dict,
retention and every command take them, through :class:`~zckpt.store.LocalStorage`, with the
local commit protocol (temporary file, fsync, rename; ``flock`` locks), never through fsspec's
``LocalFileSystem`` (no rename, lease locks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.cli import main
from zckpt.store import LocalStorage, storage_for
from zckpt.testing import assert_states_equal

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    master = {"w": torch.randn(10, 3, generator=g), "b": torch.randn(5, generator=g)}
    return {"module": {k: v.bfloat16() for k, v in master.items()}, "master": master}


class _Recording(LocalStorage):
    """LocalStorage that records the paths of its atomic writes and of its locks."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.locks: list[str] = []

    def write_atomic(self, path: str, buffers: Any) -> tuple[int, int]:
        self.writes.append(path)
        return super().write_atomic(path, buffers)

    def try_lock(self, path: str, owner: str) -> Any:
        self.locks.append(path)
        return super().try_lock(path, owner)


def test_a_file_url_is_local_storage_with_the_local_path() -> None:
    storage, path = storage_for("file:///data/run1")
    assert type(storage) is LocalStorage and path == "/data/run1"
    assert storage_for("file:///data/run1/")[1] == "/data/run1/"


def test_an_explicit_local_storage_takes_a_file_urls_path_and_refuses_other_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found here: ``save_checkpoint("file:///x", storage=LocalStorage())`` wrote the
    checkpoint under ``./file:/x`` (the URL taken as a relative path), and an ``s3://`` URL
    with a LocalStorage under ``./s3:/``."""
    monkeypatch.chdir(tmp_path)
    st = LocalStorage()
    d = tmp_path / "run"
    zckpt.save_checkpoint(f"file://{d}", _state(5), zckpt.ZeroSpec(1, 1), tag="t", storage=st)
    assert (d / "t" / "manifest.zckm").exists() and os.listdir(tmp_path) == ["run"]
    assert_states_equal(zckpt.load_checkpoint(f"file://{d}", storage=st).state, _state(5))
    with pytest.raises(zckpt.ArgumentError, match="is a URL, and the storage given is local"):
        zckpt.save_checkpoint("s3://b/run", _state(5), zckpt.ZeroSpec(1, 1), tag="t", storage=st)
    assert os.listdir(tmp_path) == ["run"]


def test_save_load_and_fp32_through_a_file_url_are_the_local_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save to ``file://`` writes through LocalStorage (so: temporary file, fsync, rename,
    directory fsync; flock on the tag), never fsspec; loads and the fp32 state dict read it
    back bit for bit, by URL and by path alike."""
    from zckpt.store import FsspecStorage

    def refused(self: Any, *a: Any, **kw: Any) -> None:
        raise AssertionError("a file:// URL reached fsspec")

    monkeypatch.setattr(FsspecStorage, "__init__", refused)
    d = tmp_path / "run"
    url = f"file://{d}"
    state = _state(0)
    saved = zckpt.save_checkpoint(url, state, zckpt.ZeroSpec(2, 2), tag="t")
    assert saved.path == str(d / "t")
    names = sorted(os.listdir(d / "t"))
    assert "manifest.zckm" in names and not any(".tmp" in n for n in names)
    assert (d / "latest").read_text() == "t"
    assert_states_equal(zckpt.load_checkpoint(url).state, state)
    assert_states_equal(zckpt.load_checkpoint(str(d)).state, state)
    got = zckpt.load_checkpoint(f"{url}/t", world_size=3, rank=1)
    want = zckpt.load_checkpoint(d, world_size=3, rank=1)
    assert_states_equal(got.state, want.state)
    fp32 = zckpt.get_fp32_state_dict_from_zero_checkpoint(url)
    assert_states_equal(fp32, state["master"])
    lazy = zckpt.get_fp32_state_dict_from_zero_checkpoint(url, lazy_mode=True)
    assert_states_equal({k: v.contiguous() for k, v in lazy.items()}, state["master"])


def test_a_file_url_save_takes_flock_locks_and_renames(tmp_path: Path) -> None:
    """The same locks and atomic writes as a plain path's (the storage passed explicitly
    records them): the tag's and the save_dir's lock files, the blobs, manifest and latest."""
    st = _Recording()
    d = tmp_path / "run"
    zckpt.save_checkpoint(f"file://{d}", _state(1), zckpt.ZeroSpec(2, 2), tag="t", storage=st)
    assert all(not p.startswith("file:") for p in st.writes + st.locks), st.writes
    assert [os.path.basename(p) for p in st.locks] == [".t.zckpt-lock", ".zckpt.lock"]
    assert [os.path.basename(p) for p in st.writes][-2:] == ["manifest.zckm", "latest"]


def test_retention_prune_clean_and_list_tags_take_file_urls(tmp_path: Path) -> None:
    d = tmp_path / "run"
    url = f"file://{d}"
    for i, t in enumerate(("a", "b", "c")):
        zckpt.save_checkpoint(url, _state(i), zckpt.ZeroSpec(1, 1), tag=t, keep_last=2)
    assert [c.tag for c in zckpt.list_tags(url)] == ["b", "c"]
    assert sorted(os.listdir(d)) == ["b", "c", "latest"]
    assert zckpt.apply_retention(url, 1) == ["b"]
    assert [c.tag for c in zckpt.list_tags(url)] == ["c"]
    torn = d / "c" / ".0000000000000abc.rank00000-of-00001.zck.tmp.5f2a"  # a killed save's
    torn.write_bytes(b"torn")
    zckpt.clean(url)
    assert not torn.exists()
    assert_states_equal(zckpt.load_checkpoint(url).state, _state(2))


def test_the_commands_take_file_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect, verify, consolidate (IN and OUT), reshard, prune and clean with file:// URLs:
    what each does with the plain path."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    d = tmp_path / "run"
    url = f"file://{d}"
    state = _state(3)
    zckpt.save_checkpoint(url, state, zckpt.ZeroSpec(2, 2), tag="t")
    assert main(["inspect", url, "--json"]) == 0
    assert '"latest": "t"' in capsys.readouterr().out
    assert main(["verify", f"{url}/t"]) == 0
    assert "OK" in capsys.readouterr().out
    out = tmp_path / "m.safetensors"
    assert main(["consolidate", url, f"file://{out}", "--quiet"]) == 0
    assert_states_equal(safetensors_torch.load_file(out), dict(sorted(state["master"].items())))
    assert not (tmp_path / "file:").exists() and not Path("file:").exists()
    assert main(["consolidate", url, f"file://{tmp_path}/hf/", "--quiet"]) == 0
    assert any(n.endswith(".safetensors") for n in os.listdir(tmp_path / "hf"))
    assert main(["reshard", url, f"file://{tmp_path}/re", "--world-size", "3"]) == 0
    assert zckpt.open_checkpoint(tmp_path / "re").manifest.spec.world_size == 3
    zckpt.save_checkpoint(url, _state(4), zckpt.ZeroSpec(1, 1), tag="u")
    assert main(["prune", url, "--keep-last", "1"]) == 0
    assert "deleted t" in capsys.readouterr().out
    assert main(["clean", url]) == 0
    assert [c.tag for c in zckpt.list_tags(d)] == ["u"]


def test_convert_from_and_to_file_urls(tmp_path: Path) -> None:
    """``zckpt convert --from deepspeed file://... file://...``: the DeepSpeed reader takes the
    local path (it refused the URL as 'not a DeepSpeed checkpoint directory'), and the
    converted checkpoint verifies and loads as the plain path's conversion does."""
    cases = sorted(FIXTURES.glob("z2_ws2_*")) if FIXTURES.is_dir() else []
    if not cases:
        pytest.skip("DeepSpeed fixtures not found")
    src = cases[0] / "checkpoint"
    by_url, by_path = tmp_path / "by-url", tmp_path / "by-path"
    assert main(["convert", "--from", "deepspeed", f"file://{src}", f"file://{by_url}"]) == 0
    assert main(["convert", "--from", "deepspeed", str(src), str(by_path)]) == 0
    assert main(["verify", f"file://{by_url}"]) == 0
    assert main(["consolidate", f"file://{src}", f"file://{tmp_path}/ds.safetensors"]) == 0
    assert_states_equal(
        zckpt.load_checkpoint(f"file://{by_url}").state, zckpt.load_checkpoint(by_path).state
    )
