"""A full disk, for real: saves into a small tmpfs filled so that they run out of space at every
point (each blob, the client file, the manifest, ``latest``, retention).

For each amount of free space (swept around what one save needs): the save either commits
(the tag is listed and loads bitwise) or raises a zckpt error and then either (i) the tag is not
committed and nothing of the failed save remains (no blob of its generation, no temporary
file, no new tag directory), or (ii) the tag is committed, the error says so, and the tag loads.
In every case every earlier checkpoint and ``latest`` stay loadable and ``latest`` names a
committed tag. Needs root (``mount -t tmpfs``); skipped where mounting is not allowed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dir_mutations import file_tree as _tree

import zckpt
from zckpt.testing import assert_states_equal

PAGE = os.sysconf("SC_PAGE_SIZE")
SPEC = zckpt.ZeroSpec(2, 2)
N = 1 << 16  # fp32 elements per tensor: a save is about 160 pages


def state_for(value: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(value)
    master = torch.randn(N, generator=g)  # random: zstd cannot shrink it to nothing
    return {
        "module": {"w": master.bfloat16()},
        "master": {"w": master},
        "optimizer": {"state": {"w": {"exp_avg": torch.randn(N, generator=g)}}},
        "global_steps": value,
    }


def client_for(value: int) -> dict[str, Any]:
    return {"value": value, "t": torch.full((1000,), value, dtype=torch.int64)}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot mount a tmpfs here (needs root): {e} {err.decode(errors='replace')}")
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def empty(mnt: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(mnt, topdown=False):
        for n in filenames:
            os.unlink(os.path.join(dirpath, n))
        for n in dirnames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                os.unlink(p)
            else:
                os.rmdir(p)


def fill(mnt: Path, leave: int) -> None:
    """Leave ``leave`` bytes (whole pages) free on the mount."""
    need = free_bytes(mnt) - leave
    if need > 0:
        with open(mnt / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, need)
    assert abs(free_bytes(mnt) - leave) < PAGE, (free_bytes(mnt), leave)


def setup_earlier(save_dir: Path, codec: str) -> None:
    for v, tag in ((1, "old1"), (2, "old2")):
        zckpt.save_checkpoint(save_dir, state_for(v), SPEC, tag=tag, client_state=client_for(v),
                              codec=codec)  # fmt: skip


def save_new(save_dir: Path, codec: str) -> zckpt.Saved:
    return zckpt.save_checkpoint(
        save_dir,
        state_for(3),
        SPEC,
        tag="new",
        client_state=client_for(3),
        keep_last=2,
        save_latest=True,
        codec=codec,
    )


def loads_as(save_dir: Path, tag: str | None, value: int | None) -> str | None:
    """None if ``tag`` (None: latest) loads bitwise as ``value``'s state, else what is wrong."""
    try:
        got = zckpt.load_checkpoint(save_dir, tag=tag)
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:300]
    if got.load_path is None:
        return "nothing loaded"
    v = got.state["global_steps"] if value is None else value
    try:
        assert_states_equal(got.state, state_for(v))
        assert_states_equal(got.client_state, client_for(v))
    except AssertionError as e:
        return f"wrong data: {e}"
    return None


def leftovers(save_dir: Path) -> list[str]:
    """Temporary files and lock files anywhere, and the failed save's tag directory."""
    out = []
    for dirpath, dirnames, filenames in os.walk(save_dir):
        for n in filenames + dirnames:
            # temporaries, and lock files: a lock is removed by its holder when released
            if n.startswith(".") and (".tmp." in n or n.endswith((".zckpt-lock", ".zckpt.lock"))):
                out.append(os.path.relpath(os.path.join(dirpath, n), save_dir))
    if (save_dir / "new").exists():
        out.append(f"new/ (holding {sorted(os.listdir(save_dir / 'new'))})")
    return out


def sweep_points(need_pages: int) -> list[int]:
    pts = {0, 1, 2, 3, need_pages - 2, need_pages - 1, need_pages, need_pages + 1, need_pages + 2}
    pts |= {round(i * (need_pages + 4) / 21) for i in range(22)}
    return sorted(p for p in pts if p >= 0)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_saves_into_a_full_disk(tmpfs: Path, codec: str) -> None:
    save_dir = tmpfs / "ckpt"
    # What one save needs at its peak: measured on the same mount.
    setup_earlier(save_dir, codec)
    before = free_bytes(tmpfs)
    zckpt.save_checkpoint(save_dir, state_for(3), SPEC, tag="probe", client_state=client_for(3),
                          codec=codec)  # fmt: skip
    need_pages = -(-(before - free_bytes(tmpfs)) // PAGE) + 1  # + the new latest before rename
    empty(tmpfs)
    table, problems = [], []
    for k in sweep_points(need_pages):
        empty(tmpfs)
        setup_earlier(save_dir, codec)
        fill(tmpfs, k * PAGE)
        try:
            save_new(save_dir, codec)
            err: Exception | None = None
        except Exception as e:
            err = e
        tags = [c.tag for c in zckpt.list_tags(str(save_dir))]
        where = f"{k} pages free (a save needs ~{need_pages})"
        bad: list[str] = []
        if err is not None and not isinstance(err, zckpt.ZckptError):
            bad.append(f"raised {type(err).__name__} (not a zckpt error): {err}")
        if err is None:
            if "new" not in tags:
                bad.append("returned, but the tag is not committed")
            elif (why := loads_as(save_dir, "new", 3)) is not None:
                bad.append(f"returned, but the tag does not load: {why}")
            row = "returned; committed, loads"
        elif "new" not in tags:
            left = leftovers(save_dir)
            if left:
                bad.append(f"raised and not committed, but the failed save left {left}")
            for tag in ("old1", "old2"):
                if tag not in tags:
                    bad.append(f"raised and not committed, yet earlier tag {tag} is gone")
            row = f"raised {type(err).__name__}, not committed" + (f", left {left}" if left else "")
        else:
            flag = getattr(err, "committed", None)
            why = loads_as(save_dir, "new", 3)
            if why is not None:
                bad.append(f"raised, the tag is committed, but does not load: {why}")
            if flag is not True:
                bad.append(f"raised though the tag was committed, and the error does not say so "
                           f"(committed={flag!r})")  # fmt: skip
            row = f"raised {type(err).__name__} AFTER committing (committed={flag!r})"
        for tag, v in (("old1", 1), ("old2", 2)):
            if tag in tags and (why := loads_as(save_dir, tag, v)) is not None:
                bad.append(f"earlier tag {tag} does not load: {why}")
        latest = (save_dir / "latest").read_text() if (save_dir / "latest").exists() else None
        if latest not in tags:
            bad.append(f"latest names {latest!r}, committed are {tags}")
        elif (why := loads_as(save_dir, None, None)) is not None:
            bad.append(f"latest does not load: {why}")
        msg = "" if err is None else f": {' '.join(str(err).split())[:160]}"
        table.append(f"  {k:4d} pages free: {row}; latest={latest}; tags={tags}{msg}")
        problems += [f"{where}: {b}" for b in bad]
    print(f"\nfull-disk sweep ({codec}):\n" + "\n".join(table))
    assert not problems, "\n".join(problems) + "\nsweep:\n" + "\n".join(table)


# --- exports into a full disk -------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspeed"


def _run(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from zckpt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([*argv, "--quiet"])
    return code, err.getvalue()


#: command -> (source, other source, argv for (source, OUT)); OUT's contents are compared as
#: files, except for the save_dirs of reshard and convert, compared by what loads.
EXPORTS: dict[str, tuple[str, str, Any]] = {
    "consolidate-dir": ("A", "B", lambda s, o: ["consolidate", s, o, "--max-shard-size", "100KB"]),
    "consolidate-pt": ("A", "B", lambda s, o: ["consolidate", s, o + ".pt"]),
    "consolidate-ds": ("z2_ws2_bf16", "z2_ws2_fp32", lambda s, o: ["consolidate", s, o + "/"]),
    "reshard": ("A", "B", lambda s, o: ["reshard", s, o, "--world-size", "3"]),
    "convert": (
        "z2_ws2_bf16",
        "z3_ws2_bf16",
        lambda s, o: ["convert", "--from", "deepspeed", s, o],
    ),
}


@pytest.mark.parametrize("command", sorted(EXPORTS))
def test_exports_into_a_full_disk(tmpfs: Path, tmp_path: Path, command: str) -> None:
    """For each amount of free space (swept up to what the export needs), overwriting an
    earlier export: exit 0 and the new export, or exit 1 with a zckpt error and the earlier
    export untouched; never a temporary or lock file left behind."""
    first, second, argv = EXPORTS[command]
    srcs = {}
    for name in (first, second):
        if name in ("A", "B"):
            srcs[name] = str(tmp_path / name)
            zckpt.save_checkpoint(srcs[name], state_for(ord(name)), SPEC, tag="t")
        else:
            srcs[name] = str(FIXTURES / name / "checkpoint")
            if not os.path.isdir(srcs[name]):
                pytest.skip(f"no DeepSpeed fixture {srcs[name]}")
    out = str(tmpfs / "out")

    def content() -> Any:
        if command in ("reshard", "convert"):
            if not os.path.isdir(out) or "latest" not in os.listdir(out):
                return None
            got = zckpt.load_checkpoint(out).state
            return repr(zckpt.tree.flatten(got)[0]), [
                v.view(-1).view(torch.uint8).tolist() if isinstance(v, torch.Tensor) else v
                for v in zckpt.tree.flatten(got)[1]
            ]
        return _tree(Path(out + (".pt" if command == "consolidate-pt" else "")))

    refs = {}
    for name in (first, second):
        empty(tmpfs)
        assert _run(argv(srcs[name], out)) == (0, "")
        refs[name] = content()
    assert refs[first] != refs[second]
    # the new export's size (what the overwrite needs at its peak, the old one kept till then)
    empty(tmpfs)
    before = free_bytes(tmpfs)
    assert _run(argv(srcs[second], out))[0] == 0
    need = -(-(before - free_bytes(tmpfs)) // PAGE) + 2
    problems = []
    for k in sorted({0, 1, 2, need - 1, need} | {need * i // 8 for i in range(1, 8)}):
        empty(tmpfs)
        assert _run(argv(srcs[first], out))[0] == 0
        fill(tmpfs, k * PAGE)
        code, err = _run([*argv(srcs[second], out), "--overwrite"])
        got = content()
        stray = [
            str(p.relative_to(tmpfs))
            for p in tmpfs.rglob(".*")
            if ".tmp." in p.name or p.name.endswith(("zckpt-tmp", "zckpt-lock", ".zckpt.lock"))
        ]
        where = f"{command}, {k} pages free (it needs ~{need})"
        if code == 0 and got != refs[second]:
            problems.append(f"{where}: exit 0, but OUT is not the new export")
        elif code != 0 and (got != refs[first] or "zckpt: error:" not in err):
            problems.append(f"{where}: exit {code}, OUT changed or no zckpt error: {err[-300:]}")
        if stray:
            problems.append(f"{where}: left {stray}")
    assert not problems, "\n".join(problems)
