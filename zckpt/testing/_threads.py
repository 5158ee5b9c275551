"""Run ranks as threads of one process, with a real communicator between them.

For tests and harnesses of the collective code paths (tag checks, error propagation, commit
ordering) without spawning processes: each rank is a thread, and :class:`ThreadComm` implements
:class:`zckpt.dist.Comm` with a barrier, so a rank that never arrives makes the others fail after
``timeout`` seconds instead of hanging forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ThreadComm", "run_ranks"]

T = TypeVar("T")


class _Shared:
    def __init__(self, size: int, timeout: float) -> None:
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[Any] = [None] * size


class ThreadComm:
    """One rank's view of a group of threads.

    Example:
        >>> run_ranks(lambda comm: comm.all_gather(comm.rank * 10), 3)
        [[0, 10, 20], [0, 10, 20], [0, 10, 20]]
    """

    def __init__(self, shared: _Shared, rank: int, size: int) -> None:
        self._shared, self._rank, self._size = shared, rank, size

    @property
    def rank(self) -> int:
        """This thread's rank."""
        return self._rank

    @property
    def size(self) -> int:
        """Number of ranks."""
        return self._size

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank."""
        sh = self._shared
        sh.barrier.wait()  # everyone has read the previous round
        sh.slots[self._rank] = obj
        sh.barrier.wait()  # everyone has written this round
        return list(sh.slots)

    def barrier(self) -> None:
        """Wait for every rank."""
        self._shared.barrier.wait()


def run_ranks(fn: Callable[[ThreadComm], T], world_size: int, timeout: float = 60.0) -> list[T]:
    """Run ``fn(comm)`` on ``world_size`` threads; return each rank's result, or raise.

    If ranks raise, the exception of the lowest failing rank is re-raised (the others are
    attached as ``__notes__``).

    Example:
        >>> run_ranks(lambda comm: comm.rank, 2)
        [0, 1]
    """
    shared = _Shared(world_size, timeout)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def main(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(shared, rank, world_size))
        except BaseException as e:
            errors[rank] = e

    threads = [threading.Thread(target=main, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        _, first = failed[0]
        for r, e in failed[1:]:
            first.add_note(f"rank {r} also raised {type(e).__name__}: {e}")
        raise first
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"ranks still running after {timeout * 4} s")
    return results


def gather_errors(fn: Callable[[ThreadComm], Any], world_size: int) -> list[BaseException | None]:
    """Run ``fn`` on every rank; return each rank's exception (None where it returned).

    Example:
        >>> gather_errors(lambda comm: 1 / comm.rank, 2)[0].__class__.__name__
        'ZeroDivisionError'
    """
    out: list[BaseException | None] = [None] * world_size

    def wrapped(comm: ThreadComm) -> None:
        try:
            fn(comm)
        except BaseException as e:
            out[comm.rank] = e

    run_ranks(wrapped, world_size)
    return out
