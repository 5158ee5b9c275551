"""Names inside a checkpoint directory, tag rules, and the ``latest`` pointer.

::

    save_dir/
      latest                        the newest committed tag (text, no newline), replaced by rename
      <tag>/
        manifest.zckm               commits the tag; written last, replaced atomically
        <gen>.rank00003-of-00008.zck  one blob per rank of save generation <gen>
        <gen>.expert00002.zck       every tensor of MoE expert 2 (when the spec declares experts)
        <gen>.client.zck            client_state (when it is not empty)

A tag directory without a valid manifest is invisible to loads (a save that was interrupted).
Overwriting a tag writes a new generation beside the old one and then replaces the manifest, so
at every instant one complete generation is the committed one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import warnings
from collections.abc import Iterator
from typing import NamedTuple

from zckpt.errors import ZckptError
from zckpt.store._storage import Lock, Storage, StorageError, lock_owner_text

__all__ = [
    "DIR_LOCK",
    "LATEST",
    "LATEST_UNIVERSAL",
    "MANIFEST",
    "LockSeen",
    "TagError",
    "blob_name",
    "check_tag",
    "client_name",
    "dir_lock",
    "lock_name",
    "try_tag_lock",
    "new_generation",
    "wait_tag_lock",
    "read_latest",
    "write_latest",
]

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
MANIFEST = "manifest.zckm"
DIR_LOCK = ".zckpt.lock"  # held while a commit replaces latest and applies retention
_TAG_LOCK = re.compile(r"^\.(?P<tag>.+)\.zckpt-lock$")
_DIR_LOCK_WAIT = 300.0  # seconds a commit waits for another job's commit step
_BLOB = re.compile(
    r"^(?P<gen>[0-9a-f]{16})\.(rank(?P<rank>\d{5,8})-of-(?P<ws>\d{5,8})|expert(?P<e>\d{5,8})|client)\.zck$"
)
_MAX_TAG_BYTES = 200


class TagError(ZckptError, ValueError):
    """A tag that is not a safe path component, or tags that differ between ranks.

    Example:
        >>> issubclass(TagError, ValueError)
        True
    """


def check_tag(tag: object) -> str:
    """Return ``tag`` if it is a safe directory name, else raise :class:`TagError`.

    Safe: a non-empty ``str`` of at most 200 UTF-8 bytes, not ``.`` or ``..``, not starting
    with ``.`` (zckpt's temporary names do), with no path separator and no control character.

    Example:
        >>> check_tag("global_step100")
        'global_step100'
        >>> check_tag("../etc")
        Traceback (most recent call last):
        ...
        zckpt.store._layout.TagError: tag '../etc' is not a safe directory name: it contains a ...
    """
    if not isinstance(tag, str):
        raise TagError(f"tag must be a str, got {type(tag).__name__} {tag!r}")
    why = None
    if not tag:
        why = "it is empty"
    elif "/" in tag or "\\" in tag or (os.altsep and os.altsep in tag):
        why = "it contains a path separator"
    elif tag in (".", "..") or tag.startswith("."):
        why = "it starts with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in tag):
        why = "it contains a control character"
    elif len(tag.encode("utf-8", "surrogatepass")) > _MAX_TAG_BYTES:
        why = f"it is longer than {_MAX_TAG_BYTES} bytes"
    elif tag in (LATEST, LATEST_UNIVERSAL):
        why = "it is the name of the latest pointer"
    if why:
        raise TagError(f"tag {tag!r} is not a safe directory name: {why}")
    return tag


def check_same_tags(tags: list[str], mode: str) -> None:
    """Check the tag every rank passed; ``mode`` is ``"fail"``, ``"warn"`` or ``"ignore"``.

    Example:
        >>> check_same_tags(["a", "a"], "fail")
        >>> check_same_tags(["a", "b"], "fail")
        Traceback (most recent call last):
        ...
        zckpt.store._layout.TagError: ranks passed different tags: rank 0 'a', rank 1 'b'
    """
    if mode not in ("fail", "warn", "ignore"):
        raise TagError(f"tag_validation must be 'fail', 'warn' or 'ignore', got {mode!r}")
    if len(set(tags)) <= 1 or mode == "ignore":
        return
    shown = ", ".join(f"rank {r} {t!r}" for r, t in enumerate(tags[:8]))
    msg = f"ranks passed different tags: {shown}"
    if mode == "fail":
        raise TagError(msg)
    warnings.warn(msg + f"; using rank 0's {tags[0]!r}", stacklevel=3)


def new_generation() -> str:
    """A fresh 16-hex-digit save generation.

    Example:
        >>> len(new_generation())
        16
    """
    return os.urandom(8).hex()  # what secrets.token_hex(8) is, without importing secrets


def blob_name(gen: str, rank: int, world_size: int) -> str:
    """File name of rank ``rank``'s blob in generation ``gen``.

    Example:
        >>> blob_name("0123456789abcdef", 3, 8)
        '0123456789abcdef.rank00003-of-00008.zck'
    """
    return f"{gen}.rank{rank:05d}-of-{world_size:05d}.zck"


def expert_name(gen: str, expert: int) -> str:
    """File name of MoE expert ``expert``'s blob in generation ``gen``.

    Example:
        >>> expert_name("0123456789abcdef", 7)
        '0123456789abcdef.expert00007.zck'
    """
    return f"{gen}.expert{expert:05d}.zck"


def client_name(gen: str) -> str:
    """File name of the client_state blob of generation ``gen``.

    Example:
        >>> client_name("0123456789abcdef")
        '0123456789abcdef.client.zck'
    """
    return f"{gen}.client.zck"


def generation_of(name: str) -> str | None:
    """The generation a blob file name belongs to, or None for other names.

    Example:
        >>> generation_of("0123456789abcdef.client.zck")
        '0123456789abcdef'
    """
    m = _BLOB.match(name)
    return m.group("gen") if m else None


def lock_name(tag: str) -> str:
    """Name, in the save_dir, of the lock a save of ``tag`` holds from start to end.

    Example:
        >>> lock_name("global_step5")
        '.global_step5.zckpt-lock'
    """
    return f".{tag}.zckpt-lock"


def locked_tag(name: str) -> str | None:
    """The tag a save_dir entry is the lock of, or None.

    Example:
        >>> locked_tag(".step3.zckpt-lock"), locked_tag("step3")
        ('step3', None)
    """
    m = _TAG_LOCK.match(name)
    return m.group("tag") if m else None


def try_tag_lock(storage: Storage, save_dir: str, tag: str) -> Lock | None:
    """Take the lock on ``save_dir/tag`` without waiting; None when a live process holds it.

    A save holds it from before it writes anything until it has committed or cleaned up;
    retention and :func:`~zckpt.clean` take it before they delete a tag and leave a tag whose
    lock is held alone. The kernel drops it when its holder dies, so a killed save never blocks
    the next one.

    Example:
        >>> import tempfile
        >>> from zckpt.store._storage import LocalStorage
        >>> d, s = tempfile.mkdtemp(), LocalStorage()
        >>> held = try_tag_lock(s, d, "t")
        >>> try_tag_lock(s, d, "t") is None
        True
        >>> held.release()
    """
    return storage.try_lock(os.path.join(save_dir, lock_name(tag)), lock_owner_text())


class LockSeen(NamedTuple):
    """What a waiter sees of a lease lock another process holds (an object-store lock; a kernel
    lock has none: it is freed the moment its holder dies).

    Attributes:
        version: changes whenever the lock is written: its holder renewed it, or another took it.
        lease: seconds the lock stands unrenewed before it is stale and may be taken over.
    """

    version: str
    lease: float


def lock_seen(storage: Storage, path: str) -> LockSeen | None:
    """The lease lock ``path`` as a waiter sees it, or None: nothing there, or a storage whose
    locks are the kernel's (they need no waiting: a dead holder's lock is gone already).

    A storage with lease locks says so with a ``lock_state(path)`` method
    (:meth:`~zckpt.store.FsspecStorage.lock_state`); it is optional in
    :class:`~zckpt.store._storage.Storage`.

    Example:
        >>> import tempfile
        >>> from zckpt.store._storage import LocalStorage
        >>> lock_seen(LocalStorage(), tempfile.mkdtemp() + "/.lock") is None
        True
    """
    state = getattr(storage, "lock_state", None)
    if state is None:
        return None
    try:
        seen: LockSeen | None = state(path)
    except OSError:
        return None  # unreadable for now: the next look decides
    return seen


# Server clocks (HTTP dates) have whole seconds, and a lock is stale at age > lease + 1 s: a
# dead holder's lock may be taken between lease + 1 and lease + 2 s after its last renewal.
_LEASE_SLACK = 3.0


def wait_tag_lock(
    storage: Storage, save_dir: str, tag: str, patience: float
) -> tuple[Lock | None, float]:
    """Take the lock on ``save_dir/tag`` for a save; return it (None when a live process holds
    it) and the seconds waited.

    Waits ``patience`` seconds for a short holder (retention and :func:`~zckpt.clean` hold a
    tag's lock for a moment while they look at it; a save holds it for the whole save). A lease
    lock (object stores) is waited for longer, up to its holder's lease and a little slack: a
    holder that keeps renewing it is alive and keeps it (None once ``patience`` is over and a
    renewal has been seen), one that stopped renewing (a killed save) has its lock taken over
    once the lease lapses, by a conditional write on the stale lock's ETag, so of several
    waiters exactly one wins (the others see it change hands, and get None).

    Example:
        >>> import tempfile
        >>> from zckpt.store._storage import LocalStorage
        >>> d, s = tempfile.mkdtemp(), LocalStorage()
        >>> held = try_tag_lock(s, d, "t")
        >>> wait_tag_lock(s, d, "t", patience=0.1)[0] is None
        True
        >>> held.release(); wait_tag_lock(s, d, "t", patience=0.1)[0] is not None
        True
    """
    path = os.path.join(save_dir, lock_name(tag))
    start = time.monotonic()
    lock = try_tag_lock(storage, save_dir, tag)
    if lock is not None:
        return lock, 0.0
    first = lock_seen(storage, path)
    until = start + max(patience, first.lease + _LEASE_SLACK if first is not None else 0.0)
    poll = 0.05 if first is None else min(0.5, max(0.05, first.lease / 20))
    renewed = False
    while True:
        now = time.monotonic()
        if now >= until or (renewed and now >= start + patience):
            return None, now - start
        time.sleep(poll)
        lock = try_tag_lock(storage, save_dir, tag)
        if lock is not None:
            return lock, time.monotonic() - start
        seen = lock_seen(storage, path)
        if seen is not None and (first is None or seen.version != first.version):
            renewed = True  # written since we first looked: its holder is alive


@contextlib.contextmanager
def dir_lock(storage: Storage, save_dir: str, wait: float = _DIR_LOCK_WAIT) -> Iterator[Lock]:
    """Hold ``save_dir``'s commit lock: one commit step (manifest, ``latest``, retention) at a
    time per save_dir, whichever job it belongs to. Waits up to ``wait`` seconds.

    Example:
        >>> import tempfile
        >>> from zckpt.store._storage import LocalStorage
        >>> with dir_lock(LocalStorage(), tempfile.mkdtemp()) as held:
        ...     held.intact()
        True
    """
    path = os.path.join(save_dir, DIR_LOCK)
    deadline = time.monotonic() + wait
    delay = 0.001
    while True:
        lock = storage.try_lock(path, lock_owner_text())
        if lock is not None:
            break
        if time.monotonic() > deadline:
            raise StorageError(
                errno.EAGAIN,
                f"{save_dir}: waited {wait:.0f} s for another process's commit "
                f"({storage.lock_owner(path) or 'unknown owner'}) to finish",
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    try:
        yield lock
    finally:
        lock.release()


def read_latest(storage: Storage, save_dir: str, name: str = LATEST) -> str | None:
    """The tag ``save_dir/latest`` names, or None when there is no such file.

    Example:
        >>> import tempfile
        >>> from zckpt.store._storage import LocalStorage
        >>> d = tempfile.mkdtemp()
        >>> write_latest(LocalStorage(), d, "step3")
        >>> read_latest(LocalStorage(), d)
        'step3'
    """
    path = os.path.join(save_dir, name)
    whole = getattr(storage, "read_whole", None)  # an object store: one GET, None when absent
    if whole is not None:
        data = whole(path, 4096)
        if data is None:
            return None
    elif not storage.exists(path):
        return None
    else:
        data = storage.read(path, 0, 4096)
    try:
        tag = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TagError(f"{path}: not a UTF-8 tag name") from None
    try:
        return check_tag(tag)
    except TagError as e:  # name the file: a hostile or damaged pointer, not the caller's tag
        raise TagError(f"{path}: {e}") from None


def write_latest(storage: Storage, save_dir: str, tag: str, name: str = LATEST) -> None:
    """Point ``save_dir/latest`` at ``tag`` (atomic replace; DeepSpeed's format: no newline)."""
    storage.write_atomic(os.path.join(save_dir, name), [check_tag(tag).encode("utf-8")])
