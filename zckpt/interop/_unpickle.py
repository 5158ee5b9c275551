"""Loading DeepSpeed's ``torch.save`` pickles without running their code.

``torch.load(weights_only=True)`` refuses every global outside PyTorch's own allow-list (tensor
rebuild functions, storages, dtypes, ``torch.Size``, ``collections.OrderedDict``). DeepSpeed's
optimizer files also reference four of its own classes; DeepSpeed is not needed (nor imported):
inert stand-ins are registered under those exact qualified names for the duration of one load.
Everything else is refused, before any unpickling, with :class:`UnsafePickleError` naming the
file and the types.

:func:`load_pickle` first tries ``_fastload.py``: the same load on Python's C unpickler, taken
only when a scan of the opcodes shows it builds exactly what torch's unpickler would (every
DeepSpeed-written file does); anything else goes the way described above.
"""

from __future__ import annotations

import enum
import os
import pickle
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zckpt.errors import FormatError

__all__ = [
    "ALLOWED_GLOBALS",
    "DeepSpeedFormatError",
    "FragmentAddress",
    "LossScaler",
    "UnsafePickleError",
    "ZeroStage",
    "get",
    "load_pickle",
]


class DeepSpeedFormatError(FormatError):
    """A DeepSpeed checkpoint that zckpt cannot read: missing or inconsistent files or keys.

    Example:
        >>> import zckpt
        >>> issubclass(DeepSpeedFormatError, zckpt.FormatError)
        True
    """


class UnsafePickleError(DeepSpeedFormatError):
    """A pickle references a global outside the allow-list; it was not unpickled.

    Example:
        >>> issubclass(UnsafePickleError, ValueError)
        True
    """


class LossScaler:
    """Inert stand-in for DeepSpeed's ``LossScaler`` and ``DynamicLossScaler``.

    Unpickling only sets attributes (``cur_scale``, ``dynamic``, ...); no method runs.

    Example:
        >>> s = LossScaler()
        >>> s.__dict__.update(cur_scale=256.0)
        >>> s.cur_scale, s.state()
        (256.0, {'cur_scale': 256.0})
    """

    def state(self) -> dict[str, Any]:
        """The attributes the pickle recorded."""
        return dict(vars(self))


class ZeroStage(enum.IntEnum):
    """Stand-in for DeepSpeed's ``ZeroStageEnum`` (the pickle records only the value).

    Example:
        >>> ZeroStage(2) == 2, ZeroStage(3).name
        (True, 'weights')
    """

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclass
class FragmentAddress:
    """Stand-in for DeepSpeed's ``fragment_address``: ``numel`` elements of a parameter held at
    offset ``start`` of a rank's flat fp32 partition.

    Example:
        >>> FragmentAddress(numel=3, start=10)
        FragmentAddress(numel=3, start=10)
    """

    numel: int
    start: int


def get(d: Any, key: str | int, where: str, kind: type | tuple[type, ...] = object) -> Any:
    """``d[key]``, checked to be a ``kind``; else a :class:`DeepSpeedFormatError` naming both.

    Example:
        >>> get({"a": 1}, "a", "f.pt", int)
        1
    """
    if not isinstance(d, Mapping) or key not in d:
        raise DeepSpeedFormatError(f"{where}: no '{key}' entry")
    v = d[key]
    if not isinstance(v, kind):
        raise DeepSpeedFormatError(f"{where}: '{key}' is a {type(v).__name__}, not {kind}")
    return v


_DS = "deepspeed."
#: Qualified name in DeepSpeed's pickles -> the stand-in registered under it.
ALLOWED_GLOBALS: dict[str, Any] = {
    _DS + "runtime.fp16.loss_scaler.LossScaler": LossScaler,
    _DS + "runtime.fp16.loss_scaler.DynamicLossScaler": LossScaler,
    _DS + "runtime.zero.config.ZeroStageEnum": ZeroStage,
    _DS + "utils.tensor_fragment.fragment_address": FragmentAddress,
}

# torch keeps the user allow-list in one process-wide set; one load at a time registers ours,
# so concurrent zckpt loads never remove each other's entries mid-load.
_LOCK = threading.Lock()
_ZIP_MAGIC = b"PK\x03\x04"


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def require_regular(path: str) -> None:
    """Refuse anything but a regular file (a FIFO would block any reader forever) with a
    :class:`DeepSpeedFormatError` naming it.

    Example:
        >>> import tempfile
        >>> require_regular(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        zckpt.interop._unpickle.DeepSpeedFormatError: /tmp/...: is a directory, ...
    """
    from zckpt.store._storage import StorageError, open_regular

    try:
        os.close(open_regular(path, follow=True))
    except StorageError as e:
        raise DeepSpeedFormatError(e.strerror or str(e)) from None


def load_pickle(path: str | os.PathLike[str], refs: bool = False) -> Any:
    """Load a DeepSpeed ``.pt`` file with ``weights_only=True`` and the allow-list, on CPU.

    Zip-format files (every ``torch.save`` since 1.6) go through zckpt's fast path
    (``_fastload.py``), whose tensors are memory-mapped and read from the page cache only when
    used; a file it does not take is read by torch's own load, into memory. With ``refs``,
    tensors are inert
    :class:`~zckpt.interop._refs.TensorRef` (and torch's other values the stand-ins of
    ``_refs.py``) wherever the fast path takes the file, and torch is not imported; where it
    does not, torch's own load runs and its tensors are returned.

    Raises:
        UnsafePickleError: the pickle references a global outside the allow-list (named).
        DeepSpeedFormatError: the file is not a loadable ``torch.save`` file.

    Example:
        >>> import tempfile, torch
        >>> p = tempfile.mkdtemp() + "/x.pt"
        >>> torch.save({"w": torch.ones(2), "shape": torch.Size([2])}, p)
        >>> load_pickle(p)["w"].tolist()
        [1.0, 1.0]
        >>> torch.save({"f": print}, p)
        >>> load_pickle(p)
        Traceback (most recent call last):
        ...
        zckpt.interop._unpickle.UnsafePickleError: .../x.pt: refused to unpickle builtins.print ...
    """
    path = os.fspath(path)
    require_regular(path)
    try:
        zipped = _is_zip(path)
    except OSError as e:
        raise DeepSpeedFormatError(f"{path}: cannot read ({e})") from None
    if zipped:
        from zckpt.interop._fastload import NOT_FAST, fast_load, load_refs

        # The C unpickler, where it gives torch's result exactly (as references, or built)
        fast = load_refs(path) if refs else fast_load(path)
        if fast is not NOT_FAST:
            return fast
    import torch
    import torch.serialization

    pairs: list[Any] = [(obj, name) for name, obj in ALLOWED_GLOBALS.items()]
    with _LOCK, torch.serialization.safe_globals(pairs):
        if zipped:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as e:  # a torn zip, an unknown opcode: nothing was run
                raise DeepSpeedFormatError(
                    f"{path}: not a readable torch.save file ({_reason(e)})"
                ) from None
            if unsafe:
                raise UnsafePickleError(
                    f"{path}: refused to unpickle {', '.join(sorted(unsafe))} (not in zckpt's "
                    "allow-list for DeepSpeed checkpoints; nothing from the file was run)"
                )
        try:
            # Not memory-mapped: torch's mmap load does not check a storage's size against its
            # record (a damaged file would give wrong values); its plain load does.
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if _refused(e):
                raise UnsafePickleError(f"{path}: refused to unpickle: {_first_line(e)}") from None
            # Not a refusal: the pickle itself is damaged (cut short, a bad opcode).
            raise DeepSpeedFormatError(
                f"{path}: not a readable torch.save file (damaged pickle: {_first_line(e)})"
            ) from None
        except Exception as e:  # e.g. a stand-in called with arguments: refused, nothing run
            raise DeepSpeedFormatError(
                f"{path}: not a readable torch.save file ({type(e).__name__}: {e})"
            ) from None


def _reason(e: BaseException) -> str:
    """An exception as ``Type: message`` (an ``EOFError`` often has no message: a file or a
    record cut short)."""
    text = str(e)
    if isinstance(e, EOFError):
        more = f": {text}" if text else ""
        return f"EOFError: the data ends early, the file is cut short or damaged{more}"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _refused(e: BaseException) -> bool:
    """Whether torch's weights-only unpickler refused a global or an operation (unsafe), as
    opposed to failing on a damaged pickle (truncated, garbage)."""
    text = str(e)
    return any(
        w in text for w in ("Unsupported global", "GLOBAL", "Unsupported operand", "Trying to")
    )


def _first_line(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported" in line or "Trying" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__
