"""The error hierarchy: one root, builtin bases users already catch, clean pickling across
processes (spawned workers send errors back to the parent)."""

from __future__ import annotations

import pickle

import pytest

import zckpt
from zckpt import errors

LEAVES = [
    (zckpt.StateError, TypeError),
    (zckpt.SpecError, ValueError),
    (zckpt.CoverageError, ValueError),
    (zckpt.FormatError, ValueError),
    (zckpt.VersionError, ValueError),
    (zckpt.TruncatedError, ValueError),
    (zckpt.ChecksumError, ValueError),
    (zckpt.TagError, ValueError),
    (zckpt.LoadError, RuntimeError),
    (zckpt.SaveError, RuntimeError),
    (zckpt.StorageError, OSError),
    (zckpt.CheckpointNotFoundError, FileNotFoundError),
]


@pytest.mark.parametrize(("cls", "builtin"), LEAVES, ids=lambda c: getattr(c, "__name__", ""))
def test_leaves_inherit_root_and_builtin(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, zckpt.ZckptError)
    assert issubclass(cls, builtin)


def test_errors_pickle_cleanly() -> None:
    cases: list[Exception] = [
        zckpt.FormatError("blob: bad magic at byte 0"),
        zckpt.ChecksumError("rank 1 master/w chunk 3 at byte 4096"),
        zckpt.SaveError("saving failed: rank 2: disk full", {2: "OSError: disk full"}),
        zckpt.StorageError(28, "writing /x: No space left on device"),
        zckpt.CheckpointNotFoundError(2, "/ckpt/t: no committed checkpoint"),
    ]
    for e in cases:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e)
        assert str(back) == str(e)
    save = pickle.loads(pickle.dumps(cases[2]))
    assert isinstance(save, zckpt.SaveError)
    assert save.errors == {2: "OSError: disk full"}


def test_module_lists_every_error() -> None:
    assert set(errors.__all__) <= set(zckpt.__all__)
