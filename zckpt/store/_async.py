"""Asynchronous saves: snapshot into reused staging memory, write and commit in the background.

A save is two steps: :func:`prepare_save` (:mod:`zckpt.store._prepare`) validates and agrees on
the tag across ranks, :func:`write_and_commit` (:mod:`zckpt.store._commit`) writes every file and
commits. An asynchronous save runs the first step on the caller's thread, copies every fragment
the rank writes (and the client state's tensors) into a staging arena, and hands the second step
to a background thread. Training is blocked for the agreement round and one memory copy of the
rank's shard; it may mutate its tensors as soon as the call returns.

Why the pieces are as they are:

* **One byte arena per saver, reused.** Fresh memory costs page faults on first touch (about
  0.5 s/GiB on the machines measured) and pinned memory costs a ``cudaHostAlloc``; reusing one
  arena pays both once. It only grows (rounded up to 2 MiB), so a state whose size varies a
  little does not reallocate. Fragments start on 64-byte boundaries, so any dtype can view them.
* **torch** ``copy_`` **rather than** :func:`zckpt.kernels.copy_ranges`. Measured on the
  2-core build box (``bench/bench_async.py``, 512 MiB, a training step's in-place ops just
  before each save): blocked 46-50 ms with ``copy_`` against 58-82 ms with ``copy_ranges``,
  whose thread pool competes with the OpenMP threads training just used, and whose first call
  loads Numba (0.4-0.9 s more on the first save). With another process spinning on one of the
  two cores ``copy_ranges`` was steadier (57-69 ms against 71-102 ms), but such a box slows
  training's own OpenMP ops just as much. ``copy_`` also copies from CUDA memory.
* **Pinned staging for CUDA tensors**: ``non_blocking`` copies into page-locked memory overlap on
  the copy engine; one synchronize per device before returning makes the snapshot complete,
  whatever streams training uses afterwards.
* **A later save waits for the previous one**, so one arena is never overwritten while a
  background thread still writes from it, and the collectives of two saves never interleave on
  one communicator (a synchronous :func:`~zckpt.save_checkpoint` waits for the default saver's
  save too).
* **Errors reach every rank the same way.** A failure after the ranks agreed (a write, the
  commit, or the snapshot itself) goes through the collective inside :func:`write_and_commit`,
  so every rank's handle fails with the same :class:`~zckpt.SaveError`. It is raised by
  :meth:`PendingSave.wait` (every call) and, once, by the next save on the same saver, whether or
  not anyone waited: a rule that does not depend on what each rank did, so all ranks raise at the
  same save and none is left waiting in the next agreement round.
* **A non-daemon thread.** Python joins non-daemon threads at interpreter exit before it runs
  ``atexit`` handlers or tears modules down, so a script that ends (or raises) with a save in
  flight still commits it. A daemon thread would be killed at an arbitrary instant: the commit
  protocol keeps that atomic (no torn checkpoint is ever visible) but the save would be lost. An
  ``atexit`` handler then reports on stderr a background failure that nobody observed.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from zckpt.shard import Shard
from zckpt.spec import ZeroSpec
from zckpt.store._commit import write_and_commit
from zckpt.store._prepare import PreparedSave, prepare_save
from zckpt.store._save_result import Saved, SaveError
from zckpt.store._storage import Lock, Storage
from zckpt.tree import flatten, unflatten

__all__ = ["AsyncSaver", "PendingSave", "default_saver"]

# Every staged tensor starts on a multiple of this many bytes: any dtype can view it, and no two
# tensors share a cache line.
_ALIGN = 64
# The arena grows in steps of this many bytes.
_GROW = 2 << 20


class PendingSave:
    """A save whose files are being written in the background; see :meth:`AsyncSaver.save`.

    The tag is agreed and the state snapshotted when this object exists, so :attr:`tag` and
    :attr:`path` are final; the checkpoint is committed (visible to loads) once :meth:`wait`
    returns.

    Example:
        >>> import tempfile, torch, zckpt
        >>> w = torch.ones(4)
        >>> with zckpt.store.AsyncSaver() as saver:
        ...     pending = saver.save(tempfile.mkdtemp(), {"w": w}, zckpt.ZeroSpec(1, 1), tag="t")
        ...     _ = w.zero_()                        # training goes on at once
        ...     saved = pending.wait()
        >>> saved.tag, pending.done()
        ('t', True)
    """

    def __init__(self, prepared: PreparedSave) -> None:
        self._prepared = prepared
        self._finished = threading.Event()
        self._result: Saved | None = None
        self._error: BaseException | None = None
        self._observed = False

    @property
    def tag(self) -> str:
        """The tag every rank agreed on."""
        return self._prepared.tag

    @property
    def path(self) -> str:
        """The tag directory, ``save_dir/tag``."""
        return self._prepared.tag_dir

    @property
    def shards(self) -> tuple[Shard, ...]:
        """The snapshot being written: shards whose data live in the saver's staging memory.

        Valid until the next save on the same saver overwrites the staging memory.
        """
        return tuple(self._prepared.shards)

    def done(self) -> bool:
        """Whether the background work has finished (committed or failed); never blocks."""
        return self._finished.is_set()

    def __repr__(self) -> str:
        if not self.done():
            status = "writing"
        else:
            status = "committed" if self._error is None else f"failed: {self._error}"
        return f"PendingSave(tag={self.tag!r}, path={self.path!r}, {status})"

    def wait(self, timeout: float | None = None) -> Saved:
        """Block until the checkpoint is committed; return where it lives.

        Args:
            timeout: seconds to wait at most (None: as long as it takes).

        Raises:
            SaveError: the save failed on some rank (every rank raises it); nothing was
                committed. Raised again by every call, and once more by the next save.
            TimeoutError: still running after ``timeout`` seconds (the save goes on).
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the asynchronous save of {self.path} is still running")
        if self._error is not None:
            self._observed = True
            raise self._error
        if self._result is None:  # unreachable: the worker sets one or the other
            raise SaveError(f"the asynchronous save of {self.path} ended without a result")
        return self._result

    def _run(self) -> None:
        try:
            self._result = write_and_commit(self._prepared)
        except BaseException as e:  # kept for wait() and the next save; the thread ends quietly
            self._error = e
        finally:
            self._finished.set()

    def _failure(self) -> SaveError | None:
        """The error the next save raises (after waiting for this one), or None."""
        self._finished.wait()
        e = self._error
        if e is None:
            return None
        self._observed = True
        if isinstance(e, SaveError):
            errors = e.errors
        else:
            errors = {self._prepared.comm.rank: f"{type(e).__name__}: {e}"}
        err = SaveError(f"the previous asynchronous save of {self.path} failed: {e}", errors)
        err.__cause__ = e
        return err


class _Arena:
    """One reusable byte buffer, grown on demand, pinned when CUDA tensors are copied into it."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def reserve(self, nbytes: int, pinned: bool) -> torch.Tensor:
        buf = self.buffer
        if buf is None or buf.numel() < nbytes or (pinned and not buf.is_pinned()):
            self.buffer = None  # free the old one before allocating its successor
            size = max(_GROW, -(-nbytes // _GROW) * _GROW)
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
            self.buffer = buf
        return buf


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stage(
    sources: Sequence[torch.Tensor], arena: _Arena, pin_memory: bool | None
) -> list[torch.Tensor]:
    """Copies of ``sources`` (same dtype and shape, contiguous) in the arena, complete on return."""
    offsets, total = [], 0
    for t in sources:
        offsets.append(total)
        total += _aligned(_nbytes(t))
    cuda = {t.device for t in sources if t.device.type == "cuda"}
    buf = arena.reserve(total, bool(cuda) if pin_memory is None else pin_memory)
    pinned = buf.is_pinned()
    out = []
    for t, off in zip(sources, offsets):
        dst = buf[off : off + _nbytes(t)].view(t.dtype).view(t.shape)
        # detach: a copy from a tensor that requires grad would record autograd history on the
        # arena. non_blocking only into pinned memory (elsewhere it would be synchronous anyway).
        dst.copy_(t.detach(), non_blocking=pinned and t.device.type == "cuda")
        out.append(dst)
    for d in cuda:  # the snapshot is complete before training may touch its tensors again
        torch.cuda.synchronize(d)
    return out


def _snapshot(p: PreparedSave, arena: _Arena, pin_memory: bool | None) -> PreparedSave:
    """``p`` writing copies (in ``arena``) of its shards' data and client state's tensors."""
    data = [d for sh in p.shards for d in sh.data]
    # Only rank 0 writes the client state (write_and_commit); the others need no copy of it.
    client_skel, client_leaves = flatten(p.client if p.comm.rank == 0 else {})
    staged = iter(_stage([*data, *client_leaves], arena, pin_memory))
    shards = tuple(
        Shard(sh.rank, sh.spec, sh.skeleton, sh.fragments, tuple(next(staged) for _ in sh.data))
        for sh in p.shards
    )
    client = unflatten(client_skel, list(staged))
    return p.with_shards(shards, client)


def _failing(p: PreparedSave, error: Exception) -> PreparedSave:
    """``p`` made to fail at its first write with ``error`` (a snapshot that failed here).

    The ranks already agreed on this save, so the others are on their way into the collective
    inside :func:`write_and_commit`; running it with a write that fails reports the error to every
    rank through the same protocol as a failed write, without touching the caller's tensors.
    """
    empty = tuple(dataclasses.replace(sh, fragments=(), data=()) for sh in p.shards)
    failing = _FailingStorage(p.storage, error)
    return dataclasses.replace(p, shards=empty, client={}, storage=failing)


class _FailingStorage:
    """A :class:`Storage` whose writes raise a given error; everything else is delegated."""

    def __init__(self, inner: Storage, error: Exception) -> None:
        self._inner, self._error = inner, error

    def write_atomic(self, path: str, buffers: Iterable[memoryview | bytes]) -> tuple[int, int]:
        raise self._error

    def read(self, path: str, offset: int, length: int) -> bytes:
        return self._inner.read(path, offset, length)

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        return self._inner.read_into(path, offset, out)

    def size(self, path: str) -> int:
        return self._inner.size(path)

    def exists(self, path: str) -> bool:
        return self._inner.exists(path)

    def listdir(self, path: str) -> list[str]:
        return self._inner.listdir(path)

    def makedirs(self, path: str) -> None:
        self._inner.makedirs(path)

    def remove(self, path: str) -> None:
        self._inner.remove(path)

    def rmtree(self, path: str) -> None:
        self._inner.rmtree(path)

    def is_dir(self, path: str) -> bool:
        return self._inner.is_dir(path)

    def remove_dir(self, path: str) -> None:
        self._inner.remove_dir(path)

    def try_lock(self, path: str, owner: str) -> Lock | None:
        return self._inner.try_lock(path, owner)

    def lock_owner(self, path: str) -> str:
        return self._inner.lock_owner(path)


class AsyncSaver:
    """Owns the staging memory and the save in flight of asynchronous saves on one rank.

    ``zckpt.save_checkpoint(..., async_=True)`` uses the process-wide :func:`default_saver`;
    hold an ``AsyncSaver`` yourself (``async_=saver``) to free its memory when done
    (:meth:`close`, or a ``with`` block), or when one process plays several ranks as threads:
    each rank needs its own saver, since a saver runs one save at a time.

    Args:
        pin_memory: stage in page-locked memory (None: when some tensor of the save is on a
            CUDA device, the fast path for device-to-host copies).

    Example:
        >>> import tempfile, torch, zckpt
        >>> d, state = tempfile.mkdtemp(), {"w": torch.arange(4.0), "global_steps": 1}
        >>> saver = zckpt.store.AsyncSaver()
        >>> first = zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(2, 1), async_=saver)
        >>> state["w"] += 10; state["global_steps"] = 2
        >>> second = zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(2, 1), async_=saver)
        >>> first.done(), second.wait().tag                 # a save waits for the previous one
        (True, 'global_step2')
        >>> zckpt.load_checkpoint(d, tag="global_step1").state["w"].tolist()
        [0.0, 1.0, 2.0, 3.0]
        >>> saver.close()
    """

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self._pin_memory = pin_memory
        self._arena = _Arena()
        self._pending: PendingSave | None = None
        self._busy = threading.Lock()
        _live.add(self)

    @property
    def pending(self) -> PendingSave | None:
        """The last save started, until the next save (or :meth:`close`) settles it."""
        return self._pending

    @property
    def staging_nbytes(self) -> int:
        """Bytes of staging memory held (0 before the first save and after :meth:`close`)."""
        buf = self._arena.buffer
        return 0 if buf is None else buf.numel()

    def save(
        self,
        save_dir: str | os.PathLike[str],
        state: Any,
        spec: ZeroSpec | None = None,
        **options: Any,
    ) -> PendingSave:
        """Start a save; return once the state is snapshotted (training may then mutate it).

        Takes the arguments of :func:`~zckpt.save_checkpoint`; every rank calls it. First waits
        for this saver's previous save, and raises its error if it failed (on every rank, so all
        stop here together).

        Raises:
            SaveError: the previous save failed (nothing of this one happened), or this saver is
                already starting a save on another thread.
            TagError, StateError, SpecError: as :func:`~zckpt.save_checkpoint`, before anything
                is written.

        Example:
            >>> import tempfile, torch, zckpt
            >>> saver = zckpt.store.AsyncSaver()
            >>> p = saver.save(tempfile.mkdtemp(), {"w": torch.ones(2)}, zckpt.ZeroSpec(1, 1),
            ...                tag="a")
            >>> p.tag, p.wait().tag
            ('a', 'a')
        """
        if not self._busy.acquire(blocking=False):
            raise SaveError(
                "this AsyncSaver is starting a save on another thread; give each thread that "
                "saves (each rank, when ranks are threads) its own AsyncSaver"
            )
        try:
            self._settle()
            prepared = prepare_save(save_dir, state, spec, **options)
            try:
                staged = _snapshot(prepared, self._arena, self._pin_memory)
            except Exception as e:  # every rank must still learn it: see _failing
                staged = _failing(prepared, e)
            pending = PendingSave(staged)
            thread = threading.Thread(
                target=pending._run, name=f"zckpt-save-{prepared.tag}", daemon=False
            )
            self._pending = pending
            thread.start()
            return pending
        finally:
            self._busy.release()

    def wait(self) -> Saved | None:
        """Wait for the save in flight; return where it was committed (None if there is none).

        Raises:
            SaveError: it failed (the next save raises it too).

        Example:
            >>> AsyncSaver().wait() is None
            True
        """
        p = self._pending
        return None if p is None else p.wait()

    def close(self) -> None:
        """Wait for the save in flight and free the staging memory; raise the save's error.

        Example:
            >>> with AsyncSaver() as saver:
            ...     pass
            >>> saver.staging_nbytes
            0
        """
        try:
            self.wait()
        finally:
            self._pending = None
            self._arena.buffer = None

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _settle(self) -> None:
        """Wait for the previous save; raise its failure once (the "next save" rule)."""
        p, self._pending = self._pending, None
        err = None if p is None else p._failure()
        if err is not None:
            raise err


_live: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()
_default: AsyncSaver | None = None
_default_lock = threading.Lock()


def default_saver() -> AsyncSaver:
    """The process-wide saver behind ``save_checkpoint(..., async_=True)``.

    Example:
        >>> default_saver() is default_saver()
        True
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = AsyncSaver()
        return _default


def dispatch(
    async_: bool | AsyncSaver,
    save_dir: str | os.PathLike[str],
    state: Any,
    spec: ZeroSpec | None,
    options: dict[str, Any],
) -> Saved | PendingSave:
    """What :func:`~zckpt.save_checkpoint` does for each value of ``async_``."""
    if isinstance(async_, AsyncSaver):
        return async_.save(save_dir, state, spec, **options)
    if not isinstance(async_, bool):
        raise TypeError(f"async_ must be a bool or an AsyncSaver, not {type(async_).__name__}")
    if async_:
        return default_saver().save(save_dir, state, spec, **options)
    # A synchronous save is the "next save" too, and its collectives must not interleave with
    # those of a save still running in the background on the same process group.
    if _default is not None:
        _default._settle()
    return write_and_commit(prepare_save(save_dir, state, spec, **options))


def _forget_default() -> None:
    # A forked child inherits the saver but not its thread: it must not wait for it.
    global _default
    _default = None
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_default)


def _unobserved() -> Iterator[PendingSave]:
    for saver in list(_live):
        p = saver._pending
        if p is not None and p.done() and p._error is not None and not p._observed:
            yield p


@atexit.register
def _report_at_exit() -> None:
    # Runs after the interpreter joined the (non-daemon) save threads: nothing is in flight.
    for p in _unobserved():
        print(
            f"zckpt: the asynchronous save of {p.path} failed and nobody waited for it: {p._error}",
            file=sys.stderr,
        )
