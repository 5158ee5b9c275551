"""The fp32 module state dict of a DCP checkpoint: what
:func:`zckpt.get_fp32_state_dict_from_zero_checkpoint` returns for a directory ``dcp.save``
wrote.

A training script's DCP checkpoint is usually ``{"model": model.state_dict(), "optim": ...}``
(``dcp.save`` flattens it to ``model.<param>``, ``optim.state.<param>.exp_avg``, ...); a model
exported alone is ``dcp.save(model.state_dict())``. The module's tensors are the ones under the
top-level key ``model`` when there are any (their keys relative to it, as ``model.state_dict()``
named them), else every tensor: :func:`module_keys`. Nothing is unpickled beyond
``.metadata``'s allow-list, and the tensors are assembled from their saved chunks by the same
code as :func:`~zckpt.interop.dcp_state_dict`.
"""

from __future__ import annotations

import os
from typing import Any

from zckpt.interop._dcp import open_dcp
from zckpt.interop._dcp_metadata import DcpMetadata
from zckpt.interop._dcp_state import dcp_tensors

__all__ = ["dcp_fp32_state_dict", "module_keys", "module_scope"]

#: The top-level key under which training scripts (torch's DCP recipes, torchtitan's and
#: Lightning's FSDP checkpoints) keep the model's state dict.
MODULE_KEY = "model"


def module_keys(md: DcpMetadata) -> dict[str, str]:
    """The module's tensors of a DCP checkpoint: DCP name -> key in the module's state dict.

    Example:
        >>> from zckpt.interop._dcp_metadata import DcpMetadata
        >>> md = DcpMetadata(dict.fromkeys(["model.w", "optim.state.w.exp_avg"]), (), {},
        ...                  {"model.w": ("model", "w"),
        ...                   "optim.state.w.exp_avg": ("optim", "state", "w", "exp_avg")},
        ...                  None, ())
        >>> module_keys(md)
        {'model.w': 'w'}
        >>> module_keys(DcpMetadata(dict.fromkeys(["model.w"]), (), {}, {}, None, ()))
        {'model.w': 'model.w'}
    """
    return module_scope(md)[0]


def module_scope(md: DcpMetadata) -> tuple[dict[str, str], list[str]]:
    """The module's tensors (as :func:`module_keys`) and the names of its non-tensor values:
    those under ``model`` too when the tensors are, else all of them.

    Example:
        >>> from zckpt.interop._dcp_metadata import DcpMetadata
        >>> md = DcpMetadata(dict.fromkeys(["model.w"]), ("model.k", "step"), {},
        ...                  {"model.w": ("model", "w"), "model.k": ("model", "k")}, None, ())
        >>> module_scope(md)
        ({'model.w': 'w'}, ['model.k'])
    """

    def key(name: str) -> str | None:
        path = md.path_of(name)
        return (
            ".".join(str(k) for k in path[1:]) if len(path) > 1 and path[0] == MODULE_KEY else None
        )

    under = {name: k for name in md.tensors if (k := key(name)) is not None}
    if not under:
        return {name: name for name in md.tensors}, list(md.values)
    return under, [name for name in md.values if key(name) is not None]


def dcp_fp32_state_dict(path: str | os.PathLike[str], lazy_mode: bool = False) -> dict[str, Any]:
    """The module state dict of the DCP checkpoint directory ``path``, 16-bit floating tensors
    upcast to fp32 (other dtypes kept), keyed as :func:`module_keys` says, at any source
    world size; ``lazy_mode``: :class:`zckpt.LazyTensor` values, each assembled on
    ``.contiguous()``.

    DCP records no frozen flag, so ``exclude_frozen_parameters`` has nothing to exclude; and
    no fp32 master copy: a 16-bit model's weights are upcast, as DeepSpeed's reader does for
    a checkpoint without optimizer state.

    Raises:
        DcpUnsafePickleError: ``.metadata`` references a global outside the allow-list.
        DcpFormatError: files missing or inconsistent, chunks overlapping or leaving a gap.

    Example:
        >>> import tempfile, torch, zckpt
        >>> from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
        >>> d = tempfile.mkdtemp()
        >>> w = torch.randn(3, 4).bfloat16()
        >>> torch.save({"model": {"w": w}, "optim": {"m": torch.ones(2)}}, d + "/sd.pt")
        >>> torch_save_to_dcp(d + "/sd.pt", d + "/ck")
        >>> sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(d + "/ck")
        >>> list(sd), sd["w"].dtype, torch.equal(sd["w"], w.float())
        (['w'], torch.float32, True)
    """
    ck = open_dcp(path)
    return dcp_tensors(ck, lazy_mode, module_keys(ck.metadata), upcast=True)
