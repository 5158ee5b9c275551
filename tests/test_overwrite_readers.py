"""Readers during an overwrite: a tag overwritten again and again while other threads (and a
process) load it, on local disk and on a real S3 server (moto on loopback). Every load returns
one complete committed state, bit for bit, never a mix of two; a load that read the old
manifest and then finds its blobs deleted (the old generation goes right after the new
commit) reads the manifest once more and loads the new generation (``_read.py:
following_latest``); only a checkpoint whose own blobs are gone is an error."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import zckpt
from zckpt.store import LocalStorage, StorageError
from zckpt.testing import assert_states_equal, run_ranks

_N = 3001  # elements of "w": not a multiple of any world size, so ranks hold uneven ranges


def _state(k: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(k)
    return {
        "module": {"w": torch.randn(_N, generator=g), "b": torch.randn(17, generator=g)},
        "k": torch.tensor([k]),
    }


def _save(url: str, k: int, ws: int, storage: Any) -> None:
    """Save ``_state(k)`` to tag ``t`` as ``ws`` ranks in threads (stage 3: every tensor cut
    across every rank's blob), overwriting what the tag held."""

    def rank(comm: Any) -> None:
        zckpt.save_checkpoint(
            url,
            _state(k),
            zckpt.ZeroSpec(ws, 3),
            tag="t",
            overwrite=True,
            comm=comm,
            storage=storage,
        )

    run_ranks(rank, ws)


def _which(state: dict[str, Any]) -> int:
    """The k of the committed ``_state(k)`` that ``state`` is, bit for bit (else it fails)."""
    k = int(state["k"].item())
    assert_states_equal(state, _state(k))
    return k


def _which_fp32(sd: dict[str, Any], committed: range) -> int:
    """The k whose module state ``sd`` (an fp32 state dict) is, bit for bit."""
    for k in committed:
        want = _state(k)["module"]
        if torch.equal(sd["w"], want["w"]):
            assert_states_equal(sd, want)
            return k
    raise AssertionError(f"an fp32 state dict that is none of the committed states {committed}")


_OPTIONS: dict[str, dict[str, Any]] = {}  # save_dir -> the storage_options a process needs


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any, Any]:
    """(save_dir, the storage to save with, a second storage of the same place for readers)."""
    if request.param == "local":
        return str(tmp_path / "run"), LocalStorage(), LocalStorage()
    pytest.importorskip("s3fs", reason="needs s3fs: pip install 'zckpt[test-s3]'")
    import s3fs
    from s3_support import BUCKET, KEY, SECRET

    from zckpt.store import FsspecStorage

    server = request.getfixturevalue("s3_server")

    def storage() -> FsspecStorage:
        fs = s3fs.S3FileSystem(
            endpoint_url=server.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True
        )
        return FsspecStorage(fs, lease=30)

    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    _OPTIONS[url] = {**server.options, "skip_instance_cache": True}
    return url, storage(), storage()


def _overwritten_after_manifest(reader: Any, do: Callable[[], None]) -> Any:
    """``reader``, changed to run ``do`` (an overwrite) once, right after the first read of a
    manifest: the load goes on from the old manifest, whose blobs ``do`` deletes."""
    armed = [True]

    def after(got: Any) -> Any:
        if armed[0]:
            armed[0] = False
            do()
        return got

    if hasattr(reader, "read_whole"):  # an object store: the manifest is one GET
        real_whole = reader.read_whole

        def read_whole(path: str, limit: int) -> bytes | None:
            got = real_whole(path, limit)
            return after(got) if path.endswith("manifest.zckm") and got is not None else got

        reader.read_whole = read_whole
    else:
        real_read = reader.read

        def read(path: str, offset: int, length: int) -> bytes:
            got = real_read(path, offset, length)
            return after(got) if path.endswith("manifest.zckm") else got

        reader.read = read
    return reader


@pytest.mark.parametrize("how", ["latest", "tag", "tag_dir", "fp32"])
def test_a_load_whose_blobs_an_overwrite_deleted_loads_the_new_generation(
    where: tuple[str, Any, Any], how: str
) -> None:
    """The overwrite commits between the load's manifest read and its blob reads, and deletes
    the old generation's blobs: the load reads the manifest once more and returns the new
    state whole (without the re-read it failed: its blobs were gone)."""
    url, saver, reader = where
    _save(url, 1, 2, saver)
    _overwritten_after_manifest(reader, lambda: _save(url, 2, 3, saver))
    if how == "fp32":
        sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(url, storage=reader)
        assert _which_fp32(sd, range(1, 3)) == 2
        return
    path, tag = {"latest": (url, None), "tag": (url, "t"), "tag_dir": (f"{url}/t", None)}[how]
    got = zckpt.load_checkpoint(path, tag=tag, storage=reader)
    assert _which(got.state) == 2
    assert got.load_path is not None and got.load_path.rstrip("/").endswith("/t")


def test_a_checkpoint_whose_own_blobs_are_gone_is_an_error_naming_the_file(
    where: tuple[str, Any, Any],
) -> None:
    """No overwrite: the committed generation's blob is deleted. Reading the manifest again
    finds the same generation, so the load fails, naming the missing blob (no loop, no silent
    answer)."""
    url, saver, reader = where
    _save(url, 1, 2, saver)
    gen = zckpt.open_checkpoint(url, storage=reader).manifest.generation
    blob = next(n for n in saver.listdir(f"{url}/t") if n.startswith(gen) and "rank00001" in n)
    saver.remove(f"{url}/t/{blob}")
    with pytest.raises(StorageError, match=blob):
        zckpt.load_checkpoint(url, storage=reader)


def test_a_second_overwrite_during_the_reload_fails_with_both_generations_named(
    where: tuple[str, Any, Any],
) -> None:
    """Re-located once, not in a loop: a tag overwritten again during the second attempt too
    fails, and the error says it was overwritten while being loaded (load again)."""
    url, saver, reader = where
    _save(url, 1, 1, saver)
    left = [2, 3]

    def again() -> None:
        if left:
            _save(url, left.pop(0), 2, saver)

    real = reader.read_whole if hasattr(reader, "read_whole") else reader.read
    name = "read_whole" if hasattr(reader, "read_whole") else "read"

    def hooked(path: str, *a: Any) -> Any:
        got = real(path, *a)
        if path.endswith("manifest.zckm") and got is not None:
            again()
        return got

    setattr(reader, name, hooked)
    with pytest.raises(StorageError, match="overwritten while it was being loaded") as e:
        zckpt.load_checkpoint(url, storage=reader)
    assert "twice" in str(e.value) and str(e.value).endswith("load again)")


_RETRY = "was overwritten while it was being loaded, twice"


def _retryable(e: BaseException) -> bool:
    """A load that lost the race twice in a row (the tag overwritten during the load and again
    during its second attempt): a clear error that says so, and to load again."""
    return _RETRY in str(e) and str(e).endswith("load again)")


_READER = r"""
import ast, os, sys, torch, zckpt
url, stop, opts, n = sys.argv[1], sys.argv[2], ast.literal_eval(sys.argv[3]), int(sys.argv[4])
seen, fails = set(), 0
print("READY", flush=True)
while (not os.path.exists(stop) or not seen) and fails < 100:
    try:
        st = zckpt.load_checkpoint(url, storage_options=opts).state
    except zckpt.ZckptError as e:
        fails += 1
        print("ERROR", type(e).__name__, e, file=sys.stderr, flush=True)
        continue
    k = int(st["k"].item())
    g = torch.Generator().manual_seed(k)
    ok = torch.equal(st["module"]["w"], torch.randn(n, generator=g)) and torch.equal(
        st["module"]["b"], torch.randn(17, generator=g))
    if not ok:
        print("MIXED", k, file=sys.stderr)
        sys.exit(3)
    seen.add(k)
print(sorted(seen), fails)
"""


def test_readers_in_threads_and_a_process_during_overwrites_see_whole_states(
    where: tuple[str, Any, Any], tmp_path: Path
) -> None:
    """A saver overwrites tag ``t`` with a new state each time (world size 1 to 4 in turn,
    a short pause between saves for the training step) while three reader threads load
    ``latest``, the tag by name, and the fp32 weights in a loop, and a reader process loads
    ``latest``: every load is one committed state, bit for bit. A load that lost the race for
    the old generation's blobs re-reads the manifest and loads the new one; the only error
    allowed is the one for a load that lost it twice in a row (the tag overwritten again
    during its second attempt), which says so and to load again."""
    url, saver, reader = where
    _save(url, 0, 1, saver)
    done, errors, lost = threading.Event(), [], []
    seen: list[tuple[str, int]] = []
    opts = _OPTIONS.get(url)
    stop = tmp_path / "stop"
    saves = 12

    def read(which: str) -> None:
        while not done.is_set():
            try:
                if which == "fp32":
                    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(url, storage=reader)
                    seen.append((which, _which_fp32(sd, range(saves + 1))))
                else:
                    tag = "t" if which == "tag" else None
                    state = zckpt.load_checkpoint(url, tag=tag, storage=reader).state
                    seen.append((which, _which(state)))
            except StorageError as e:
                if not _retryable(e):
                    errors.append((which, "".join(traceback.format_exception(e))))
                    return
                lost.append(which)
            except BaseException as e:  # reported below, with what kind of load it was
                errors.append((which, "".join(traceback.format_exception(e))))
                return

    threads = [threading.Thread(target=read, args=(w,)) for w in ("latest", "tag", "fp32")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _READER, url, str(stop), repr(opts), str(_N)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None and child.stdout.readline() == "READY\n"
    for t in threads:
        t.start()
    try:
        for k in range(1, saves + 1):
            _save(url, k, 1 + k % 4, saver)
            time.sleep(0.1)  # a training step between saves
    finally:
        done.set()
        for t in threads:
            t.join(120)
        stop.touch()
        out, err = child.communicate(timeout=120)
    assert not errors, "\n".join(f"{w}: {e}" for w, e in errors)
    assert child.returncode == 0, err
    assert all(_RETRY in line for line in err.splitlines()), err
    child_seen, child_lost = out.strip().rsplit("] ", 1)
    assert child_seen != "[", out  # it loaded at least one state whole
    assert int(child_lost) < 100, err
    assert {w for w, _ in seen} == {"latest", "tag", "fp32"}
    assert len({k for _, k in seen}) > 1  # the readers saw the tag change under them


def test_a_manifest_replaced_as_it_is_read_is_read_as_one_file(tmp_path: Path) -> None:
    """The manifest of a local checkpoint is read in one open and one read: before, its size
    was asked first, so a commit replacing it in between (an overwrite with another state, so
    another manifest length) was read to the old length, and the load failed on a torn
    manifest ("body is 416 bytes, the preamble says 542", found by the stress test above)."""

    d = tmp_path / "run"
    old = {"w": torch.arange(4.0)}
    new = {"w": torch.arange(40.0), "x": {"y": torch.ones(3), "z": torch.zeros(2)}}
    zckpt.save_checkpoint(d, old, zckpt.ZeroSpec(1, 1), tag="t")

    class CommitsAsItReads(LocalStorage):
        fired = False

        def read(self, path: str, offset: int, length: int) -> bytes:
            if path.endswith("manifest.zckm") and not self.fired:
                self.fired = True
                zckpt.save_checkpoint(d, new, zckpt.ZeroSpec(1, 1), tag="t", overwrite=True)
            return super().read(path, offset, length)

    reader = CommitsAsItReads()
    got = zckpt.load_checkpoint(d, tag="t", storage=reader).state
    assert reader.fired
    assert_states_equal(got, new)
