"""The one place ranks synchronise: a tiny communicator protocol.

zckpt's collectives are a barrier and an all-gather of small metadata (tags, per-rank file
summaries, errors); tensor bytes never cross it. :class:`SingleProcess` serves one process that
plays every rank (tests, harnesses, offline tools); the ``torch.distributed`` implementation lives
beside it in this package, the only module that imports ``torch.distributed``.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Comm", "SingleProcess"]


class Comm(Protocol):
    """A group of processes that can agree on small values."""

    @property
    def rank(self) -> int:
        """This process's index in the group."""
        ...

    @property
    def size(self) -> int:
        """Number of processes in the group."""
        ...

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (msgpack-able), indexed by rank, on every process."""
        ...

    def barrier(self) -> None:
        """Return once every process has called it."""
        ...


class SingleProcess:
    """A group of one process, which then writes or reads every rank of a checkpoint itself.

    Example:
        >>> c = SingleProcess()
        >>> c.rank, c.size, c.all_gather("x")
        (0, 1, ['x'])
    """

    rank = 0
    size = 1

    def all_gather(self, obj: Any) -> list[Any]:
        """``[obj]``."""
        return [obj]

    def barrier(self) -> None:
        """Nothing to wait for."""
