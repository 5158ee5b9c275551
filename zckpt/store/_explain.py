"""Why nothing loads from a path: one precise reason per case, for errors and warnings.

A typo in a resume path must not read like "nothing to load" (which quietly restarts training
from step 0), and a DeepSpeed or DCP folder (local or at a URL) must not be described in terms
of zckpt's manifest. Every
entry point that finds no checkpoint (``open_checkpoint``, ``load_checkpoint``, ``Checkpointer``,
``zckpt inspect``/``verify``) words its message from :func:`explain`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from zckpt.errors import ZckptError
from zckpt.store._layout import LATEST, LATEST_UNIVERSAL, MANIFEST, check_tag, read_latest
from zckpt.store._resolve import storage_for
from zckpt.store._storage import LocalStorage, Storage

__all__ = ["Reason", "explain"]

_SHOWN = 5

# The kinds of reason; ``EMPTY`` is a directory meant to hold checkpoints that holds none yet
# (a fresh run), the one case that is not a mistake.
MISSING = "missing"
NOT_A_DIRECTORY = "not_a_directory"
DEEPSPEED = "deepspeed"
DCP = "dcp"
EMPTY = "empty"
NOT_A_CHECKPOINT = "not_a_checkpoint"
NESTED = "nested"
NO_LATEST = "no_latest"
DANGLING_LATEST = "dangling_latest"
NO_SUCH_TAG = "no_such_tag"
UNCOMMITTED_TAG = "uncommitted_tag"

_MAGICS = (
    (b"\x89ZCK\r\n\x1a\n", "a zckpt blob (one rank's file): pass the checkpoint's directory"),
    (b"\x89ZCKMAN\n", "a zckpt manifest: pass the directory that holds it"),
    (b"PK\x03\x04", "a zip file (torch.save writes these), not a checkpoint directory"),
)


@dataclass(frozen=True)
class Reason:
    """Why ``path`` (with ``tag``) holds no loadable zckpt checkpoint.

    Example:
        >>> Reason("missing", "/x: no such file or directory").fresh
        False
    """

    kind: str
    message: str

    @property
    def fresh(self) -> bool:
        """An existing directory with no checkpoint in it yet: a fresh run, not a mistake."""
        return self.kind == EMPTY


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _committed_tags(storage: Storage, path: str) -> list[str]:
    from zckpt.store._retention import list_tags

    try:
        return [c.tag for c in list_tags(path, storage=storage)]
    except (ZckptError, OSError):
        return []


def _file_kind(path: str) -> str:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        from zckpt.store._storage import open_regular

        fd = open_regular(path)
        try:
            head = os.pread(fd, 16, 0)
        finally:
            os.close(fd)
    except (ZckptError, OSError):
        return "a file"
    for magic, what in _MAGICS:
        if head.startswith(magic):
            return f"a file: {what}"
    if path.endswith(".safetensors"):
        return "a safetensors file (an export), not a checkpoint directory"
    return "a file, not a checkpoint directory"


def _foreign(storage: Storage, path: str, tag: str | None) -> str | None:
    """``"deepspeed"`` or ``"dcp"`` when ``path`` (with ``tag``) is such a checkpoint."""
    try:
        if isinstance(storage, LocalStorage):
            from zckpt.interop import is_deepspeed_checkpoint
            from zckpt.interop._detect import find_dcp

            if is_deepspeed_checkpoint(path, tag):
                return "deepspeed"
            return "dcp" if find_dcp(path if tag is None else os.path.join(path, tag)) else None
        from zckpt.interop._staged import find_foreign

        found = find_foreign(storage, path, tag)
        return None if found is None else found.kind
    except (ZckptError, OSError):
        return None


def _deepspeed_tags(storage: Storage, path: str) -> list[str]:
    """The tags of ``path`` when it is a DeepSpeed save_dir (tag folders of model states)."""
    from zckpt.interop import deepspeed_tags

    try:
        if isinstance(storage, LocalStorage):
            return deepspeed_tags(path)
        from zckpt.interop._detect import natural_order
        from zckpt.interop._staged import foreign_tags

        return natural_order(foreign_tags(storage, path))
    except (ZckptError, OSError):
        return []


def explain(
    path: str | os.PathLike[str], tag: str | None = None, *, storage: Storage | None = None
) -> Reason:
    """The reason ``path`` (and ``tag``) holds no loadable zckpt checkpoint.

    Call it once a load found nothing; it looks again, from the outside in: the path, what it
    is, what kind of checkpoint, the tag, ``latest``.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> explain(os.path.join(d, "typo")).message.endswith("no such file or directory")
        True
        >>> explain(d).kind
        'empty'
    """
    storage, path = storage_for(path, storage)
    local = isinstance(storage, LocalStorage)
    if local and not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        hint = "" if os.path.isdir(parent) else f" (nor does its parent {parent})"
        return Reason(MISSING, f"{path}: no such file or directory{hint}")
    if local and not os.path.isdir(path):
        return Reason(NOT_A_DIRECTORY, f"{path} is {_file_kind(path)}")
    foreign = _foreign(storage, path, tag)
    if foreign == "deepspeed":
        return Reason(
            DEEPSPEED,
            f"{path} is a DeepSpeed checkpoint, not a zckpt one: convert it once with "
            f"`zckpt convert --from deepspeed {path} OUT` (zckpt.interop.convert_deepspeed), "
            "then load OUT at any world size; its fp32 weights load directly with "
            "zckpt.get_fp32_state_dict_from_zero_checkpoint",
        )
    if foreign == "dcp":
        where = path if tag is None else os.path.join(path, tag)
        return Reason(
            DCP,
            f"{where} is a PyTorch DCP checkpoint, not a zckpt one: convert it once with "
            f"`zckpt convert --from dcp {where} OUT` (zckpt.interop.convert_dcp), then load OUT "
            "at any world size; its module weights load directly with "
            "zckpt.get_fp32_state_dict_from_zero_checkpoint, its whole state with "
            "zckpt.interop.dcp_state_dict",
        )
    ds_tags = _deepspeed_tags(storage, path)
    if tag is not None and ds_tags:
        return Reason(
            DEEPSPEED,
            f"{path} is a DeepSpeed checkpoint directory with no tag {tag!r}; its tags: "
            f"{_listing(ds_tags)}",
        )
    if tag is not None:
        check_tag(tag)
        tag_dir = os.path.join(path, tag)
        tags = _committed_tags(storage, path)
        known = f"; its committed tags: {_listing(tags)}" if tags else "; it holds no committed tag"
        if not storage.exists(tag_dir):
            return Reason(NO_SUCH_TAG, f"{tag_dir}: no such tag directory{known}")
        return Reason(
            UNCOMMITTED_TAG,
            f"{tag_dir} holds no committed checkpoint (no valid {MANIFEST}: an interrupted save, "
            f"or not a zckpt tag){known}",
        )
    names = [n for n in storage.listdir(path) if not n.startswith(".")]
    if not names:
        return Reason(EMPTY, f"{path} is empty: no checkpoint saved there yet")
    for pointer in (LATEST, LATEST_UNIVERSAL):
        if pointer not in names:
            continue
        try:
            named = read_latest(storage, path, pointer)
        except (ZckptError, OSError) as e:
            return Reason(DANGLING_LATEST, f"{os.path.join(path, pointer)} is unreadable: {e}")
        tags = _committed_tags(storage, path)
        known = f" (committed tags: {_listing(tags)})" if tags else " (no tag is committed)"
        return Reason(
            DANGLING_LATEST,
            f"{os.path.join(path, pointer)} names {named!r}, which holds no committed "
            f"checkpoint{known}",
        )
    tags = _committed_tags(storage, path)
    if tags:
        return Reason(
            NO_LATEST,
            f"{path} has no '{LATEST}' file; its committed tags are {_listing(tags)}: pass one "
            "as the tag",
        )
    if ds_tags:  # a DeepSpeed save_dir whose latest is missing
        return Reason(
            DEEPSPEED,
            f"{path} is a DeepSpeed checkpoint directory with no '{LATEST}' file; its tags: "
            f"{_listing(ds_tags)}: pass one as the tag (to load it with zckpt, convert it once: "
            f"`zckpt convert --from deepspeed {path} OUT --tag {ds_tags[-1]}`)",
        )
    nested = [
        n for n in sorted(names)
        if (os.path.isdir(os.path.join(path, n)) if local else True)
        and _foreign(storage, os.path.join(path, n), None) == "deepspeed"
    ]  # fmt: skip
    if nested:
        many = len(nested) > 1
        quoted = ", ".join(repr(n) for n in nested[:_SHOWN])
        first = os.path.join(path, nested[0])
        return Reason(
            DEEPSPEED,
            f"{path} holds no checkpoint itself, but its "
            f"{'subdirectories' if many else 'subdirectory'} {quoted} "
            f"{'are DeepSpeed checkpoints' if many else 'is a DeepSpeed checkpoint'}: pass "
            f"{first} (to load it with zckpt, convert it once: "
            f"`zckpt convert --from deepspeed {first} OUT`)",
        )
    for name in names:
        sub = os.path.join(path, name)
        if storage.is_dir(sub) and (
            storage.exists(os.path.join(sub, LATEST)) or storage.exists(os.path.join(sub, MANIFEST))
        ):
            return Reason(
                NESTED, f"{path} holds no checkpoint itself, but its subdirectory {name!r} does"
            )
    if all(storage.is_dir(os.path.join(path, n)) for n in names):
        return Reason(
            EMPTY,
            f"{path} holds no committed checkpoint (only uncommitted tag directories: "
            f"{_listing(names)})",
        )
    return Reason(
        NOT_A_CHECKPOINT,
        f"{path} holds no zckpt checkpoint (no '{LATEST}' file, no {MANIFEST}); it holds "
        f"{_listing(sorted(names))}",
    )
