"""Outputs written whole or not at all: the rules behind ``zckpt consolidate`` and
:func:`zckpt.interop.export_safetensors`.

Every output is built under a temporary, dot-prefixed name beside it, in the same directory
(so the final rename never crosses a filesystem), fsynced (each file, then its directory),
and renamed into place; a failed build removes what it wrote.

- A **file** (``model.safetensors``, ``model.pt``) is written as ``.NAME.<id>.zckpt-tmp/NAME``
  (a private directory beside it: writers such as ``safetensors`` make temporary files of
  their own next to the file they write, and these land inside it too), then renamed over
  ``NAME``. ``rename`` replaces atomically: a reader sees the old file or the new one.
- A **directory** (safetensors shards and index) is built whole as ``.NAME.<id>.zckpt-tmp``,
  then swapped with ``NAME``. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``: there is
  no instant at which ``NAME`` is missing. Where the filesystem cannot exchange, the old
  directory is first renamed to ``.NAME.<id>.zckpt-old``, then the new one to ``NAME``; if the
  process dies between those two renames, ``NAME`` is missing and ``.NAME.<id>.zckpt-old`` is
  the old output, complete (and ``.NAME.<id>.zckpt-tmp`` the new one, complete): rename either
  to ``NAME``. After the swap the old directory is deleted.

An existing output is refused (:class:`OutputExistsError`) unless ``overwrite`` is asked for, and
a directory is only replaced when it holds nothing but what a safetensors export writes, so a
mistyped OUT cannot delete unrelated files. A process killed by SIGKILL may leave
``.NAME.<id>.zckpt-tmp`` or ``.NAME.<id>.zckpt-old`` beside the output: such names are never the
output; delete them (:func:`is_temp_name` recognises them). New files get ``0o666 & ~umask`` and
new directories ``0o777 & ~umask``, as files made by ``open`` and ``mkdir`` do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import posixpath
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from zckpt.errors import ZckptError

__all__ = [
    "OutputExistsError",
    "OutputPathError",
    "building_dir",
    "building_file",
    "check_dir_output",
    "check_disjoint",
    "check_file_output",
    "finish_file",
    "is_export_entry",
    "is_temp_name",
    "new_dir_mode",
    "new_file_mode",
    "read_umask",
    "url_options",
]

TEMP_SUFFIX = ".zckpt-tmp"
OLD_SUFFIX = ".zckpt-old"
PYTHON_FLAG = "overwrite=True"

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_EXPORT_NAME = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors"  # the shards, or the one file
    r"|model\.safetensors\.index\.json"
    r"|\.tmp[A-Za-z0-9]{6}"  # safetensors' own temporary file, left by a killed writer
    r"|model[-\w.]*\.tmp\.\d+"  # earlier zckpt versions wrote NAME.tmp.PID in place
)


class OutputExistsError(ZckptError, FileExistsError):
    """An output path is taken and replacing it was not asked for, or would not be safe.

    Example:
        >>> issubclass(OutputExistsError, FileExistsError)
        True
    """


class OutputPathError(ZckptError, ValueError):
    """An output path overlaps its input: writing it would modify or delete what is being read.

    Example:
        >>> issubclass(OutputPathError, ValueError)
        True
    """


def read_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc``).

    Example:
        >>> 0 <= read_umask() <= 0o777
        True
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # elsewhere: set and restore at once
    os.umask(old)
    return old


def new_file_mode() -> int:
    """The permission bits ``open`` gives a new file: ``0o666 & ~umask``.

    Example:
        >>> new_file_mode() == 0o666 & ~read_umask()
        True
    """
    return 0o666 & ~read_umask()


def new_dir_mode() -> int:
    """The permission bits ``mkdir`` gives a new directory: ``0o777 & ~umask``.

    Example:
        >>> new_dir_mode() == 0o777 & ~read_umask()
        True
    """
    return 0o777 & ~read_umask()


def is_temp_name(name: str) -> bool:
    """Whether a directory entry is an unfinished or leftover output, never the output itself.

    Example:
        >>> is_temp_name(".model.safetensors.1234-9f3c.zckpt-tmp"), is_temp_name("model.pt")
        (True, False)
    """
    return name.startswith(".") and name.endswith((TEMP_SUFFIX, OLD_SUFFIX))


def is_export_entry(name: str) -> bool:
    """Whether a directory entry is one that a safetensors export writes (or leaves, killed).

    Example:
        >>> [is_export_entry(n) for n in ("model-00001-of-00002.safetensors", "config.json")]
        [True, False]
    """
    return _EXPORT_NAME.fullmatch(name) is not None


def _exists_message(out: str, flag: str) -> str:
    return f"{out} already exists; pass {flag} to replace it (atomically), or choose another path"


def check_file_output(
    out: str | os.PathLike[str], *, overwrite: bool, flag: str = PYTHON_FLAG
) -> None:
    """Refuse a file output that is taken (unless ``overwrite``) or is a directory.

    ``flag`` is how the caller asks for a replacement, named in the message: ``"--overwrite"``
    on the command line, ``"overwrite=True"`` in Python.

    Raises:
        OutputExistsError: the path exists and ``overwrite`` is false, or it is a directory.

    Example:
        >>> import tempfile
        >>> check_file_output(tempfile.mkdtemp() + "/new.pt", overwrite=False)
        >>> check_file_output(tempfile.mkdtemp(), overwrite=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        zckpt.interop._output.OutputExistsError: ... is a directory; ...
    """
    path = os.fspath(out)
    if os.path.isdir(path):
        raise OutputExistsError(
            f"{path} is a directory; a single-file output cannot replace it: choose a file path "
            "(or a directory output: no .safetensors/.pt/.bin suffix)"
        )
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(_exists_message(path, flag))


def check_dir_output(
    out: str | os.PathLike[str],
    *,
    overwrite: bool,
    flag: str = PYTHON_FLAG,
    allowed: Callable[[str], bool] = is_export_entry,
) -> None:
    """Refuse a directory output that is taken (unless ``overwrite``) or holds other files.

    A missing path or an empty directory is free. A directory whose entries all pass
    ``allowed`` (what an earlier export wrote) is replaced whole with ``overwrite``; one
    holding anything else is refused even then, since replacing it would delete those files.

    Raises:
        OutputExistsError: as above, naming the path and the first foreign entries.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> check_dir_output(d, overwrite=False)  # empty: free
        >>> open(os.path.join(d, "config.json"), "w").close()
        >>> check_dir_output(d, overwrite=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        zckpt.interop._output.OutputExistsError: ... holds entries a safetensors export ...
    """
    path = os.fspath(out)
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OutputExistsError(
            f"{path} exists and is not a directory; a sharded safetensors output is a directory: "
            "choose another path (or OUT.safetensors without --max-shard-size for one file)"
        )
    entries = sorted(os.listdir(path))
    if not entries:
        return
    foreign = [e for e in entries if not allowed(e)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{path} holds entries a safetensors export does not write ({shown}); replacing "
            "the directory would delete them: move them out, or choose another directory"
        )
    if not overwrite:
        raise OutputExistsError(_exists_message(path, flag))


def _as_path(url: str) -> str:
    """A URL as a path that compares like it: ``s3://b/run/`` is ``/s3/b/run``."""
    scheme, rest = url.split("://", 1)
    return posixpath.join("/", scheme.lower(), posixpath.normpath("/" + rest).lstrip("/"))


def check_disjoint(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    what: str = "output",
    allow_inside: bool = False,
) -> None:
    """Refuse an output that is its input, contains it, or (unless ``allow_inside``) lies
    inside it; paths are compared after resolving symlinks, URLs as names (``file://`` ones
    as the local paths they are; an object store's are never local files).

    ``allow_inside`` suits outputs that only add a new name under the input (a consolidated
    file written into the checkpoint's directory, as DeepSpeed's ``zero_to_fp32.py`` does).

    Raises:
        OutputPathError: naming both paths.

    Example:
        >>> check_disjoint("/data/ckpt", "/data/export")
        >>> check_disjoint("/data/ckpt", "/data/ckpt/model.pt", allow_inside=True)
        >>> check_disjoint("s3://b/ckpt", "/data/ckpt/out")
        >>> check_disjoint("/data/ckpt", "/data/ckpt/out")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        zckpt.interop._output.OutputPathError: the output /data/ckpt/out is inside the input ...
    """
    from zckpt.store._resolve import is_url, local_path

    s, o = local_path(os.fspath(src)), local_path(os.fspath(out))
    if is_url(s) != is_url(o):
        return  # an object store's and local files: never the same
    if is_url(s):  # two URLs: compared as names (an object store has no links)
        s, o = _as_path(s), _as_path(o)
    else:
        s, o = os.path.realpath(s), os.path.realpath(o)
    common = os.path.commonpath([s, o])
    if s == o:
        how = "is"
    elif common == o:
        how = "contains"
    elif common == s and not allow_inside:
        how = "is inside"
    else:
        return
    raise OutputPathError(
        f"the {what} {os.fspath(out)} {how} the input {os.fspath(src)}: writing it would change "
        f"or delete the files being read; choose an {what} outside the input"
    )


def url_options(
    src: str | os.PathLike[str], out: str | os.PathLike[str], options: Mapping[str, Any] | None
) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """``options`` (one ``storage_options`` for a conversion) split into the input's and the
    output's: each gets them only when it is an fsspec URL (a path or a ``file://`` URL takes
    none).

    Example:
        >>> url_options("ds_ckpt", "s3://b/run", {"anon": True})
        (None, {'anon': True})
    """
    from zckpt.store._resolve import is_url, local_path

    def remote(p: str | os.PathLike[str]) -> bool:
        return is_url(local_path(os.fspath(p)))

    return (options if remote(src) else None), (options if remote(out) else None)


def _fsync_path(path: str, *, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; the data is synced
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def finish_file(path: str) -> None:
    """Give a finished file the permissions of a new file and make it durable (fsync).

    Writers that choose their own mode (``safetensors`` makes ``0o600`` files) are corrected.

    Example:
        >>> import os, stat, tempfile
        >>> p = tempfile.mkstemp()[1]  # mkstemp makes 0o600
        >>> finish_file(p)
        >>> stat.S_IMODE(os.stat(p).st_mode) == new_file_mode()
        True
    """
    os.chmod(path, new_file_mode())
    _fsync_path(path, directory=False)


_renameat2: Any = None
_renameat2_loaded = False


def _libc_renameat2() -> Any:
    global _renameat2, _renameat2_loaded
    if not _renameat2_loaded:
        _renameat2_loaded = True
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
                fn.argtypes += [ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
            except (AttributeError, OSError):
                _renameat2 = None
    return _renameat2


def _rename2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True if done, False if this system or filesystem has no
    such rename (the caller falls back); other failures raise ``OSError``."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def _publish_noreplace(src: str, dst: str, flag: str) -> None:
    try:
        done = _rename2(src, dst, _RENAME_NOREPLACE)
    except FileExistsError:
        raise OutputExistsError(_exists_message(dst, flag)) from None
    if done:
        return
    if os.path.lexists(dst):  # no atomic no-replace rename here: check, then rename
        raise OutputExistsError(_exists_message(dst, flag))
    os.rename(src, dst)


def _temp_names(out: str) -> tuple[str, str]:
    parent, base = os.path.split(out)
    stem = f".{base[:200]}.{os.getpid()}-{secrets.token_hex(4)}"
    return os.path.join(parent, stem + TEMP_SUFFIX), os.path.join(parent, stem + OLD_SUFFIX)


def _resolve(out: str | os.PathLike[str]) -> str:
    """The absolute path to replace: a symlink's target (the link keeps pointing at it)."""
    return os.path.realpath(os.path.abspath(os.fspath(out)))


def _make_parents(parent: str) -> list[str]:
    """Create missing parent directories; return those created, outermost first."""
    made: list[str] = []
    p = parent
    while not os.path.isdir(p):
        made.append(p)
        up = os.path.dirname(p)
        if up == p:
            break
        p = up
    made.reverse()
    for d in made:
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o777)  # the umask applies, as for any new directory
    return made


def _remove_parents(made: list[str]) -> None:
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            break  # not empty (someone else uses it) or gone


def _rmtree_quiet(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


@contextlib.contextmanager
def building_file(
    out: str | os.PathLike[str], *, overwrite: bool, flag: str = PYTHON_FLAG
) -> Iterator[str]:
    """Yield a temporary path to write a file at; on success it replaces ``out`` atomically.

    The path is ``.NAME.<id>.zckpt-tmp/NAME`` beside ``out``. When the block ends without an
    error the file gets ``0o666 & ~umask``, is fsynced, renamed to ``out`` and the directory
    fsynced; on any error (``KeyboardInterrupt`` included) the temporary directory is removed,
    and any parent directories this call created.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before writing and
            again, atomically where the system allows, at the rename), or it is a directory.

    Example:
        >>> import os, tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> with building_file(out, overwrite=False) as tmp:
        ...     with open(tmp, "wb") as f:
        ...         _ = f.write(b"hello")
        >>> with open(out, "rb") as f:
        ...     f.read(), os.listdir(os.path.dirname(out))
        (b'hello', ['x.bin'])
    """
    check_file_output(out, overwrite=overwrite, flag=flag)
    final = _resolve(out)
    parent = os.path.dirname(final)
    made = _make_parents(parent)
    tmp_dir, _ = _temp_names(final)
    ok = False
    try:
        os.mkdir(tmp_dir, 0o700)
        tmp = os.path.join(tmp_dir, os.path.basename(final))
        yield tmp
        finish_file(tmp)
        check_file_output(out, overwrite=overwrite, flag=flag)  # it may have appeared since
        if overwrite:
            os.replace(tmp, final)
        else:
            _publish_noreplace(tmp, final, flag)
        _fsync_path(parent, directory=True)
        ok = True
    finally:
        _rmtree_quiet(tmp_dir)
        if not ok:
            _remove_parents(made)


def _swap_dirs(new: str, final: str, old: str) -> str:
    """Put directory ``new`` at ``final`` (which exists); return where the old one now is."""
    if _rename2(new, final, _RENAME_EXCHANGE):
        return new  # one step: ``final`` was never missing
    # No exchange here: two renames. Between them ``final`` is missing and ``old`` holds the
    # previous output, complete (``new`` the next one, complete): see the module docstring.
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, final)  # put it back
        raise
    return old


@contextlib.contextmanager
def building_dir(
    out: str | os.PathLike[str],
    *,
    overwrite: bool,
    flag: str = PYTHON_FLAG,
    allowed: Callable[[str], bool] = is_export_entry,
) -> Iterator[str]:
    """Yield a temporary directory to build an output in; on success it replaces ``out`` whole.

    The directory is ``.NAME.<id>.zckpt-tmp`` beside ``out``, made with ``0o777 & ~umask``.
    Files written in it should be finished with :func:`finish_file`. When the block ends without
    an error the directory is fsynced and swapped in (see the module docstring), the parent
    fsynced and the old output deleted; on any error the temporary directory is removed.

    Raises:
        OutputExistsError: as :func:`check_dir_output` (checked before and again at the swap).

    Example:
        >>> import os, tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "hf")
        >>> for text in (b"old", b"new"):
        ...     with building_dir(out, overwrite=True, allowed=lambda n: True) as tmp:
        ...         with open(os.path.join(tmp, "a.txt"), "wb") as f:
        ...             _ = f.write(text)
        >>> with open(os.path.join(out, "a.txt"), "rb") as f:
        ...     f.read(), os.listdir(os.path.dirname(out))
        (b'new', ['hf'])
    """
    check_dir_output(out, overwrite=overwrite, flag=flag, allowed=allowed)
    final = _resolve(out)
    parent = os.path.dirname(final)
    made = _make_parents(parent)
    tmp_dir, old_dir = _temp_names(final)
    ok = False
    leftover: str | None = None
    try:
        os.mkdir(tmp_dir, 0o777)
        os.chmod(tmp_dir, new_dir_mode())
        yield tmp_dir
        _fsync_path(tmp_dir, directory=True)
        check_dir_output(out, overwrite=overwrite, flag=flag, allowed=allowed)
        if not os.path.lexists(final):
            _publish_noreplace(tmp_dir, final, flag)
        elif not os.listdir(final):
            os.rename(tmp_dir, final)  # POSIX rename replaces an empty directory
        else:
            leftover = _swap_dirs(tmp_dir, final, old_dir)
        _fsync_path(parent, directory=True)
        ok = True
    finally:
        if leftover is not None:
            _rmtree_quiet(leftover)
        if not ok:
            _rmtree_quiet(tmp_dir)
            _remove_parents(made)
        elif leftover is not None:
            with contextlib.suppress(OSError):
                _fsync_path(parent, directory=True)
