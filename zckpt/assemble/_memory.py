"""Fresh output memory: how zckpt allocates the tensors it hands out (issue 14, part 2).

Every new tensor zckpt returns or writes from (a load without ``into=``, consolidation, a
safetensors export, a DeepSpeed import, ``reshard``) comes from :func:`empty`, through
``assemble.new_tensor``. Filling fresh memory costs a page fault per 4 KiB page the first time
it is written; when a ``preadv`` or a copy takes those faults one by one, inside the kernel's
copy loop, that is what dominates a load from the page cache.

``empty`` is ``torch.empty``. With ``ZCKPT_ALLOC=prefault``, a tensor of at least
:data:`PREFAULT_MIN_BYTES` then gets ``madvise(MADV_POPULATE_WRITE)`` on the whole pages inside
it: the kernel faults them in one call, before the data arrives, instead of one trap per page
during the copy. The tensor is an
ordinary tensor of torch's own allocator (freeing it frees the memory; ``pin_memory()``,
``share_memory_()`` and ``load_state_dict`` behave as for any other), only its pages are
resident already. Where the call is not available (not Linux, a kernel before 5.14, no
``madvise``) it fails and is not tried again: the tensor stays as ``torch.empty`` made it.

The default is plain ``torch.empty`` (``ZCKPT_ALLOC`` unset or ``plain``; read at each
allocation): measured on the loaded 2-core VM this project is built on, pre-faulting was never
behind plain but not ahead by more than the noise, and huge pages (``MADV_HUGEPAGE``, torch's
``THP_MEM_ALLOC_ENABLE``) were 2-4x slower (synchronous compaction); see docs/benchmarks.md,
"Fresh memory", for the numbers and when pre-faulting cannot win.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import torch

__all__ = ["PREFAULT_MIN_BYTES", "empty", "strategy"]

#: Tensors smaller than this are left to ``torch.empty`` alone (one syscall per tensor costs
#: more than it saves on a few pages; glibc also serves small blocks from reused heap memory).
PREFAULT_MIN_BYTES = 1 << 20

_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE
_state: dict[str, object] = {}


def _madvise() -> object:
    if "fn" not in _state:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _state["fn"] = fn
        except (OSError, AttributeError):
            _state["fn"] = None
    return _state["fn"]


def strategy() -> str:
    """The allocation strategy in effect: ``"plain"`` (the default) or ``"prefault"``
    (``ZCKPT_ALLOC=prefault``, where this kernel supports it).

    Example:
        >>> strategy() in ("prefault", "plain")
        True
    """
    if os.environ.get("ZCKPT_ALLOC", "").strip().lower() != "prefault":
        return "plain"
    if _state.get("unsupported") or _madvise() is None:
        return "plain"
    return "prefault"


def _prefault(t: torch.Tensor) -> None:
    fn = _madvise()
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    first, last = -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE
    if fn is None or last <= first:
        return
    # On ENOMEM and the like the pages fault on first write instead, as without it; EINVAL or
    # ENOSYS mean this kernel lacks the call: it is not tried again.
    failed = fn(first, last - first, _MADV_POPULATE_WRITE) != 0  # type: ignore[operator]
    if failed and ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):
        _state["unsupported"] = True


def empty(dims: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(dims, dtype)``, its pages faulted in up front when it is large and
    ``ZCKPT_ALLOC=prefault`` (see the module docstring); raises what ``torch.empty`` raises.

    Example:
        >>> t = empty((1024, 1024), torch.float32)
        >>> t.shape, t.dtype, t.is_contiguous()
        (torch.Size([1024, 1024]), torch.float32, True)
    """
    t = torch.empty(dims, dtype=dtype)
    if t.numel() * t.element_size() >= PREFAULT_MIN_BYTES and strategy() == "prefault":
        _prefault(t)
    return t
