"""Locks on object stores, which have no ``flock``: objects with a lease, held by a process
that renews them (:class:`LeaseLocks`, the lock half of :class:`~zckpt.store.FsspecStorage`).

A lock is a small object holding its owner's text and a random token, created with a
conditional write (``If-None-Match: *``: only if absent) and renewed every quarter ``lease`` by
a background thread; a lock not renewed for ``lease`` seconds (its holder died or lost the
network) is stale, and the next taker replaces it with ``If-Match`` on the stale object's ETag,
so of two takers only one wins. Staleness is judged by the server's clock where the store says
it (S3: its ``Date`` against the object's ``Last-Modified``), else by the time written in the
lock. A store that has no conditional writes (or a non-S3 filesystem: ``memory://``, or others
through fsspec) gets check-then-write instead, and the lock is then advisory only: two jobs
that start a save of one tag within the same moment (one round trip) may both believe they
hold it (``docs/layout.md``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from zckpt.store._fsbackend import Head, PreconditionFailedError, UnsupportedError
from zckpt.store._layout import LockSeen
from zckpt.store._storage import Lock, StorageError

__all__ = ["LeaseLocks"]


class _LockBody(NamedTuple):
    owner: str
    token: str
    stamp: float
    lease: float


def _lock_body(owner: str, token: str, lease: float) -> bytes:
    owner = " ".join(owner.split())
    return f"{owner}\n{token} {time.time():.3f} {lease:g}\n".encode("utf-8", "replace")


def _parse_lock(data: bytes) -> _LockBody:
    text = data.decode("utf-8", "replace")
    owner, _, rest = text.partition("\n")
    fields = rest.split()
    try:
        return _LockBody(owner, fields[0], float(fields[1]), float(fields[2]))
    except (IndexError, ValueError):
        return _LockBody(owner, "", 0.0, 0.0)  # not a lock zckpt wrote: stale once it is old


class _ObjectLock:
    """A lock object held by this process (see :meth:`LeaseLocks.try_lock`)."""

    def __init__(self, storage: LeaseLocks, path: str, owner: str, token: str) -> None:
        self.storage, self.path, self.owner, self.token = storage, path, owner, token
        self.etag = ""
        self.renewed = time.monotonic()
        self.lost = False
        self.released = False
        # A renewal and the release never overlap: a release reading the lock just before a
        # renewal rewrote it would delete if-match the old ETag, fail, and leave a live lock.
        self.mutex = threading.Lock()

    def intact(self) -> bool:
        if self.lost or self.released:
            return False
        try:
            got = self.storage._read_lock(self.path)
        except OSError:
            return False
        return got is not None and got[0].token == self.token

    def release(self) -> None:
        with self.mutex:
            if self.released:
                return
            self.released = True
            self.storage._forget(self)
            with contextlib.suppress(Exception):  # best effort: a lease that lapses frees it too
                self.storage._drop_lock(self)

    def renew_if_due(self, now: float, period: float) -> None:
        with self.mutex:
            if not self.released and not self.lost and now - self.renewed >= period:
                self.storage._renew(self)


_live: weakref.WeakSet[LeaseLocks] = weakref.WeakSet()


class LeaseLocks:
    """Lease locks on a store reached through ``_backend`` (an S3 or fsspec backend): the
    ``try_lock``, ``lock_owner`` and ``lock_state`` of :class:`~zckpt.store.FsspecStorage`,
    which inherits them and calls :meth:`_init_locks` when it is made.

    Example:
        >>> import fsspec
        >>> from zckpt.store import FsspecStorage
        >>> st = FsspecStorage(fsspec.filesystem("memory"), lease=8)
        >>> isinstance(st, LeaseLocks), st.try_lock("memory://doc/.l", "me") is not None
        (True, True)
    """

    # What the storage gives: its backend, its lease, whether it is S3, the mutex that guards
    # its shared state, and how it names objects and errors.
    _backend: Any
    lease: float
    _s3: bool
    _mutex: threading.Lock
    _key: Callable[[str], str]
    _fail: Callable[[str, str, BaseException], StorageError]

    def _init_locks(self, conditional_writes: bool | None) -> None:
        self._conditional = conditional_writes is not False
        # Whether the store has been seen to refuse a create (If-None-Match: *) of an object
        # that exists: then taking a lock needs no read first (see try_lock).
        self._refuses_creates = False
        self._held: dict[int, _ObjectLock] = {}
        self._wake = threading.Event()
        self._renewer: threading.Thread | None = None
        _live.add(self)

    def try_lock(self, path: str, owner: str) -> Lock | None:
        """Create the lock object ``path`` if it is absent or stale; None when a live holder
        has it. Renewed in the background until released (see :mod:`zckpt.store._lease`).

        Example:
            >>> import fsspec
            >>> from zckpt.store import FsspecStorage
            >>> st = FsspecStorage(fsspec.filesystem("memory"))
            >>> held = st.try_lock("memory://doc/.lock", "me")
            >>> st.try_lock("memory://doc/.lock", "other") is None, st.lock_owner("memory://doc/.lock")
            (True, 'me')
            >>> held.release(); st.try_lock("memory://doc/.lock", "other") is not None
            True
        """
        key = self._key(path)
        token = secrets.token_hex(8)
        body = _lock_body(owner, token, self.lease)
        lock = _ObjectLock(self, key, owner, token)
        try:
            if self._refuses_creates and self._atomic_conditions():
                # A store that refuses creates of existing objects: create it, and only if that
                # is refused read what is there (a live holder's, or a stale one to take over).
                with contextlib.suppress(PreconditionFailedError):
                    lock.etag = self._put_lock(key, body, if_absent=True)
                    if lock.etag:
                        self._hold(lock)
                        return lock
            for _ in range(16):
                current = self._read_lock(key)
                try:
                    if current is None:
                        lock.etag = self._put_lock(key, body, if_absent=True)
                        sure = self._atomic_conditions() and bool(lock.etag)
                        if sure and not self._refuses_creates:
                            sure = self._check_refuses_creates(lock, key, body)
                    elif current[0].token == token:  # our own write, answered ambiguously
                        lock.etag, sure = current[1].etag, True
                    elif not self._stale(current[0], current[1]):
                        return None
                    else:  # a dead holder's: replace it only if it is still that one
                        lock.etag = self._put_lock(key, body, if_match=current[1].etag)
                        sure = self._atomic_conditions() and bool(lock.etag)
                except PreconditionFailedError:
                    continue  # someone else took or changed it meanwhile: look again
                if not sure:  # check-then-write: read back whether our write is the one there
                    mine = self._read_lock(key)
                    if mine is None or mine[0].token != token:
                        continue  # overwritten at once (a store without conditional writes)
                    lock.etag = mine[1].etag
                self._hold(lock)
                return lock
        except Exception as e:
            raise self._fail("locking", path, e) from e
        raise StorageError(errno.EAGAIN, f"{path}: the lock keeps changing hands")

    def _check_refuses_creates(self, lock: _ObjectLock, key: str, body: bytes) -> bool:
        """Once per storage, right after creating a lock: create it again. A store that
        implements ``If-None-Match: *`` refuses (412), and later locks are created without a
        read first; one that ignores it has overwritten our own lock with the same body (the
        ETag it answered is now ours), and locks fall back to check-then-write. Returns
        whether the store's conditions can be trusted."""
        try:
            lock.etag = self._backend.put_small(key, body, if_absent=True)
        except PreconditionFailedError:
            self._refuses_creates = True
            return True
        except UnsupportedError:
            pass
        except Exception:
            return True  # no answer (a failure past the retries): as before, and ask next time
        self._conditional = False  # it ignores conditions: check-then-write from now on
        return False

    def lock_owner(self, path: str) -> str:
        """The owner text of the lock object ``path`` ("" when there is none)."""
        try:
            got = self._read_lock(self._key(path))
        except OSError:
            return ""
        return "" if got is None else got[0].owner

    def lock_state(self, path: str) -> LockSeen | None:
        """The lock object ``path`` as a waiter sees it (None when there is none): a version
        that changes with every renewal, and its holder's lease. A save of a tag whose lock
        another process holds watches it (:func:`~zckpt.store._layout.wait_tag_lock`): renewed
        means a live holder, unchanged for a lease means a dead one, whose lock it takes over.

        Example:
            >>> import fsspec
            >>> from zckpt.store import FsspecStorage
            >>> st = FsspecStorage(fsspec.filesystem("memory"), lease=8)
            >>> held = st.try_lock("memory://doc/.state-lock", "me")
            >>> st.lock_state("memory://doc/.state-lock").lease
            8.0
            >>> held.release(); st.lock_state("memory://doc/.state-lock") is None
            True
        """
        try:
            got = self._read_lock(self._key(path))
        except Exception as e:
            raise self._fail("reading the lock", path, e) from e
        if got is None:
            return None
        body, head = got
        return LockSeen(f"{body.token} {body.stamp:.3f} {head.etag}", body.lease or self.lease)

    def _read_lock(self, key: str) -> tuple[_LockBody, Head] | None:
        got = self._backend.get_small(key)
        if got is None:
            return None
        data, head = got
        return _parse_lock(data), head

    def _stale(self, body: _LockBody, head: Head) -> bool:
        lease = body.lease if body.lease > 0 else self.lease
        if head.age is not None:  # HTTP dates have whole seconds: one more of slack
            return head.age > lease + 1.0
        return time.time() - body.stamp > lease

    def _put_lock(
        self, key: str, body: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        if self._conditional:
            try:
                etag: str = self._backend.put_small(
                    key, body, if_absent=if_absent, if_match=if_match
                )
                return etag
            except UnsupportedError:
                self._conditional = False  # this store has none: check-then-write from now on
        current = self._read_lock(key)
        if (if_absent and current is not None) or (
            if_match is not None and (current is None or current[1].etag != if_match)
        ):
            raise PreconditionFailedError(key)
        etag = self._backend.put_small(key, body)
        return etag

    def _atomic_conditions(self) -> bool:
        """Whether conditional writes are the server's own (S3 that implements them): then a
        write that succeeded is known to be the one there, without reading it back."""
        return self._s3 and self._conditional

    def _drop_lock(self, lock: _ObjectLock) -> None:
        # Read first, though If-Match alone would do where the store honours it on DELETE:
        # one that ignores the header would delete a lock another job took over.
        got = self._read_lock(lock.path)
        if got is None or got[0].token != lock.token:
            return  # not ours any more: someone broke a lapsed lease
        try:
            self._backend.delete(lock.path, if_match=got[1].etag if self._conditional else None)
        except UnsupportedError:
            self._conditional = False
            self._backend.delete(lock.path)
        except PreconditionFailedError:
            pass

    def _renew(self, lock: _ObjectLock) -> None:
        body = _lock_body(lock.owner, lock.token, self.lease)
        try:
            lock.etag = self._put_lock(lock.path, body, if_match=lock.etag)
            if not (self._atomic_conditions() and lock.etag):
                mine = self._read_lock(lock.path)
                if mine is None or mine[0].token != lock.token:
                    lock.lost = True
                else:
                    lock.etag = mine[1].etag
        except PreconditionFailedError:
            lock.lost = True  # broken by another process after our lease lapsed
        except Exception:
            return  # a transient failure outlasting the retries: try again next round
        lock.renewed = time.monotonic()

    def _hold(self, lock: _ObjectLock) -> None:
        with self._mutex:
            self._held[id(lock)] = lock
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew_loop, name="zckpt-lock-lease", daemon=True
                )
                self._renewer.start()

    def _forget(self, lock: _ObjectLock) -> None:
        with self._mutex:
            self._held.pop(id(lock), None)

    def _renew_loop(self) -> None:
        period = self.lease / 4
        while True:
            self._wake.wait(period / 4)
            with self._mutex:
                locks = list(self._held.values())
                if not locks:
                    self._renewer = None
                    return
            now = time.monotonic()
            for lock in locks:
                lock.renew_if_due(now, period)


def _after_fork() -> None:
    # A forked child holds none of its parent's locks, and has no renewal thread.
    for st in list(_live):
        st._held.clear()
        st._renewer = None
        st._mutex = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
