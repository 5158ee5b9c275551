"""Checkpoint directories (effects): atomic durable writes, manifests, ``latest``, retention.

Example:
    >>> import tempfile, torch, zckpt
    >>> d = tempfile.mkdtemp()
    >>> state = {"master": {"w": torch.arange(8.0)}, "global_steps": 5}
    >>> zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(world_size=4, stage=2)).tag
    'global_step5'
    >>> zckpt.load_checkpoint(d).state["master"]["w"].tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
"""

from typing import TYPE_CHECKING

from zckpt._lazy import attach

if TYPE_CHECKING:
    from zckpt.store._async import AsyncSaver, PendingSave, default_saver
    from zckpt.store._blobs import drop_frozen
    from zckpt.store._checkpoint import Checkpoint, FileSource
    from zckpt.store._fp32 import LazyTensor, get_fp32_state_dict_from_zero_checkpoint
    from zckpt.store._fsspec import FsspecStorage
    from zckpt.store._layout import TagError, check_tag
    from zckpt.store._load import SKIP, Loaded, LoadError, load_checkpoint
    from zckpt.store._read import CheckpointNotFoundError, open_checkpoint
    from zckpt.store._resolve import storage_for
    from zckpt.store._retention import CommittedTag, apply_retention, clean, list_tags
    from zckpt.store._save import save_checkpoint
    from zckpt.store._save_result import Saved, SaveError
    from zckpt.store._storage import LocalStorage, Storage, StorageError
    from zckpt.store._verify import TagReport, verify_checkpoint

__getattr__, __dir__ = attach(
    __name__,
    {
        "zckpt.store._async": (
            "AsyncSaver",
            "PendingSave",
            "default_saver",
        ),
        "zckpt.store._blobs": ("drop_frozen",),
        "zckpt.store._checkpoint": (
            "Checkpoint",
            "FileSource",
        ),
        "zckpt.store._fp32": (
            "LazyTensor",
            "get_fp32_state_dict_from_zero_checkpoint",
        ),
        "zckpt.store._fsspec": ("FsspecStorage",),
        "zckpt.store._layout": (
            "TagError",
            "check_tag",
        ),
        "zckpt.store._load": (
            "SKIP",
            "Loaded",
            "LoadError",
            "load_checkpoint",
        ),
        "zckpt.store._read": (
            "CheckpointNotFoundError",
            "open_checkpoint",
        ),
        "zckpt.store._resolve": ("storage_for",),
        "zckpt.store._retention": (
            "CommittedTag",
            "apply_retention",
            "clean",
            "list_tags",
        ),
        "zckpt.store._save": ("save_checkpoint",),
        "zckpt.store._save_result": (
            "Saved",
            "SaveError",
        ),
        "zckpt.store._storage": (
            "LocalStorage",
            "Storage",
            "StorageError",
        ),
        "zckpt.store._verify": (
            "TagReport",
            "verify_checkpoint",
        ),
    },
)

__all__ = [
    "SKIP",
    "AsyncSaver",
    "Checkpoint",
    "CheckpointNotFoundError",
    "CommittedTag",
    "FileSource",
    "FsspecStorage",
    "LazyTensor",
    "LoadError",
    "Loaded",
    "LocalStorage",
    "PendingSave",
    "SaveError",
    "Saved",
    "Storage",
    "StorageError",
    "TagError",
    "TagReport",
    "apply_retention",
    "check_tag",
    "clean",
    "default_saver",
    "drop_frozen",
    "get_fp32_state_dict_from_zero_checkpoint",
    "list_tags",
    "load_checkpoint",
    "open_checkpoint",
    "save_checkpoint",
    "storage_for",
    "verify_checkpoint",
]
