"""Rank synchronisation: the communicator protocol and its implementations.

:class:`SingleProcess` is one process playing every rank; :class:`TorchComm` runs over a
``torch.distributed`` process group (the only module of zckpt that imports it);
:func:`default_comm` picks between them.

Example:
    >>> from zckpt.dist import SingleProcess
    >>> SingleProcess().all_gather({"ok": True})
    [{'ok': True}]
"""

from zckpt.dist._comm import Comm, SingleProcess
from zckpt.dist._torch import TorchComm, all_gather_flat, default_comm

__all__ = ["Comm", "SingleProcess", "TorchComm", "all_gather_flat", "default_comm"]
