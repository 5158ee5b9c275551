"""The ``torch.distributed`` communicator: zckpt's only import of ``torch.distributed``.

zckpt's collectives are an all-gather of small msgpack-encoded values and a barrier. They run
on a dedicated gloo group over the caller's ranks, created once per :class:`TorchComm`, so they
never interleave with the training loop's own collectives (an asynchronous save runs them from
a background thread while training keeps all-reducing), and they use CPU tensors whatever the
training backend is (NCCL included). Values travel as msgpack bytes in uint8 tensors: no pickle,
so ``all_gather_object`` is never used.
"""

from __future__ import annotations

import datetime
import inspect
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from zckpt.dist._comm import Comm, SingleProcess
from zckpt.errors import ZckptError

__all__ = ["TorchComm", "all_gather_flat", "default_comm"]


def _pack(obj: Any) -> bytes:
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ZckptError(f"cannot all-gather {type(obj).__name__} value: {e}") from None
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class TorchComm:
    """zckpt's communicator over a ``torch.distributed`` process group.

    ``rank`` and ``size`` are this process's rank in ``group`` and the group's size, so a
    data-parallel group inside a larger job saves its own checkpoint. The constructor is a
    collective over the group's members (it creates zckpt's gloo group): every member constructs
    its :class:`TorchComm` for the group, in the same order relative to other group creations.
    Non-members need not take part.

    Args:
        group: the caller's process group (any backend); None for the default (world) group.
        timeout: how long a collective waits for the other ranks before it raises (default:
            ``torch.distributed``'s gloo default, 30 minutes).

    Raises:
        ZckptError: ``torch.distributed`` is not initialised, or this process is not a member
            of ``group``.

    Example:
        >>> import os, tempfile, torch.distributed as dist
        >>> from zckpt.dist import TorchComm
        >>> init = f"file://{tempfile.mkdtemp()}/rendezvous"
        >>> dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        >>> comm = TorchComm()
        >>> comm.rank, comm.size, comm.all_gather({"tag": "step3", "n": [1, 2]})
        (0, 1, [{'tag': 'step3', 'n': [1, 2]}])
        >>> comm.barrier()
        >>> dist.destroy_process_group()
    """

    def __init__(
        self, group: Any | None = None, *, timeout: datetime.timedelta | None = None
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ZckptError(
                "TorchComm needs an initialised torch.distributed (call "
                "init_process_group first); one process writing every rank uses SingleProcess"
            )
        parent = dist.group.WORLD if group is None else group
        if parent is None or dist.get_rank(parent) < 0:
            raise ZckptError(
                f"rank {dist.get_rank()} (global) is not a member of the process group it "
                "passed to TorchComm"
            )
        self._rank = dist.get_rank(parent)
        self._size = dist.get_world_size(parent)
        # Global ranks in the order of their rank in the caller's group, which zckpt's group
        # keeps, so that all_gather results are indexed by the caller's ranks.
        ranks = list(dist.get_process_group_ranks(parent))
        ranks.sort(key=lambda g: dist.get_group_rank(parent, g))
        options: dict[str, Any] = {}
        accepted = inspect.signature(dist.new_group).parameters
        if "group_desc" in accepted:
            options["group_desc"] = "zckpt"
        if ranks != sorted(ranks):
            if "sort_ranks" not in accepted:
                raise ZckptError("this PyTorch cannot keep a process group's custom rank order")
            options["sort_ranks"] = False
        # A group of zckpt's own: its collectives never meet training's in one queue, and gloo
        # runs them on CPU tensors whatever the training backend is. Local synchronisation:
        # only the members create it, so data-parallel groups of a larger job each make their
        # own without the rest of the job taking part.
        self._group = dist.new_group(
            ranks=ranks,
            timeout=timeout,
            backend="gloo",
            use_local_synchronization=True,
            **options,
        )
        if dist.get_rank(self._group) != self._rank:  # never expected: checked, not assumed
            raise ZckptError(
                f"zckpt's gloo group gave rank {dist.get_rank(self._group)} to the caller's "
                f"rank {self._rank}"
            )

    @property
    def rank(self) -> int:
        """This process's rank in the caller's group."""
        return self._rank

    @property
    def size(self) -> int:
        """Number of processes in the caller's group."""
        return self._size

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (a msgpack-able value), indexed by rank, on every rank.

        Tuples come back as lists (msgpack has one array type).

        Raises:
            ZckptError: the value is not msgpack-able, or the collective failed (a rank died
                or the timeout passed); names this rank.
        """
        data = _pack(obj)
        try:
            size = torch.tensor([len(data)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self._size)]
            dist.all_gather(sizes, size, group=self._group)
            longest = max(int(s.item()) for s in sizes)
            buf = torch.zeros(longest, dtype=torch.uint8)
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self._size)]
            dist.all_gather(bufs, buf, group=self._group)
        except RuntimeError as e:
            raise ZckptError(f"rank {self._rank}: zckpt's all-gather failed: {e}") from e
        return [_unpack(b[: int(n.item())].numpy().tobytes()) for b, n in zip(bufs, sizes)]

    def barrier(self) -> None:
        """Return once every rank of the group has called it.

        Raises:
            ZckptError: the collective failed (a rank died or the timeout passed).
        """
        try:
            dist.barrier(group=self._group)
        except RuntimeError as e:
            raise ZckptError(f"rank {self._rank}: zckpt's barrier failed: {e}") from e


_DEFAULT: tuple[Any, TorchComm] | None = None


def default_comm() -> Comm:
    """:class:`TorchComm` over the world group when ``torch.distributed`` is initialised, else
    :class:`~zckpt.dist.SingleProcess`.

    The world group's :class:`TorchComm` is made once per initialisation and reused, so calling
    this at every save creates no new process group (on every rank alike: the first call is a
    collective).

    Example:
        >>> from zckpt.dist import default_comm
        >>> type(default_comm()).__name__        # no process group here
        'SingleProcess'
    """
    global _DEFAULT
    if not (dist.is_available() and dist.is_initialized()):
        return SingleProcess()
    world = dist.group.WORLD
    if _DEFAULT is None or _DEFAULT[0] is not world:
        _DEFAULT = (world, TorchComm())
    return _DEFAULT[1]


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group: Any = None) -> None:
    """Gather every rank's ``input`` into ``output`` in rank order (one flat tensor).

    ``torch.distributed.all_gather_single`` where it exists (torch 2.13 deprecates
    ``all_gather_into_tensor`` for it), else ``all_gather_into_tensor``: the function to pass as
    ``ZeroAdamW(all_gather=...)`` on any supported torch.

    Example:
        >>> import torch
        >>> out = torch.zeros(2)
        >>> callable(all_gather_flat)
        True
    """
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)
