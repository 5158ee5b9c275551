"""What a save returns (:class:`Saved`) or raises (:class:`SaveError`, and
:class:`ConcurrentSaveError` when another save holds the tag).

Both halves of the save protocol report through these, round 1 (``_prepare.py``) and rounds 2
and 3 (``_commit.py``), and ``save_checkpoint`` and asynchronous saves hand them to the caller;
they are a module of their own so that each half imports them without importing the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from zckpt.errors import ZckptError

__all__ = ["ConcurrentSaveError", "SaveError", "Saved"]


class SaveError(ZckptError, RuntimeError):
    """A save failed. ``errors`` maps rank -> text; ``committed`` tells the truth about the tag.

    ``committed`` is False when nothing of the save was committed (the tag, if it existed, still
    holds what it held); True when the tag was committed and loads by name but a step after the
    commit failed (replacing ``latest``, or retention): the message says which.

    Example:
        >>> e = SaveError("rank 1 failed", {1: "OSError: disk full"})
        >>> e.errors, e.committed
        ({1: 'OSError: disk full'}, False)
    """

    def __init__(
        self, message: str, errors: Mapping[int, str] | None = None, committed: bool = False
    ) -> None:
        super().__init__(message, dict(errors or {}), committed)

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def errors(self) -> dict[int, str]:
        """Each failed rank's error."""
        return dict(self.args[1])

    @property
    def committed(self) -> bool:
        """Whether the tag was committed despite the error."""
        return bool(self.args[2]) if len(self.args) > 2 else False


class ConcurrentSaveError(SaveError):
    """Another save of the same tag is running (a second job writing into the same directory);
    nothing was written. The message names the other writer.

    Example:
        >>> issubclass(ConcurrentSaveError, SaveError)
        True
    """


@dataclass(frozen=True)
class Saved:
    """Where a committed checkpoint lives.

    Example:
        >>> Saved("/ckpt/step3", "step3").tag
        'step3'
    """

    path: str
    tag: str


def _failure_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
