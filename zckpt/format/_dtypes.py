"""The fixed table of on-disk dtype codes (docs/format.md, "Dtype codes").

A code names a dtype forever: codes are only ever appended, never reused or renumbered. A dtype
this torch build lacks keeps its code; a tensor holding it fails to resolve its torch dtype here
with a clear error.

The table itself needs no torch: a dtype is known by its torch attribute name (``"bfloat16"``),
so skeletons, manifests and blob headers decode, and ``zckpt inspect`` and ``zckpt verify`` run,
without importing torch. :func:`torch_dtype` turns a name into the torch dtype, importing torch
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zckpt.errors import CastError, FormatError, StateError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CODE_OF",
    "CODE_OF_NAME",
    "DTYPE_OF",
    "ITEMSIZE",
    "NAME_OF",
    "TABLE",
    "dtype_code",
    "dtype_name",
    "dtype_of_code",
    "is_floating",
    "is_planar",
    "name_of_code",
    "torch_dtype",
]

# (code, torch attribute name, bytes per element, float-like: byteplane applies when >= 2 bytes)
TABLE: tuple[tuple[int, str, int, bool], ...] = (
    (0, "float32", 4, True),
    (1, "float16", 2, True),
    (2, "bfloat16", 2, True),
    (3, "float64", 8, True),
    (4, "int8", 1, False),
    (5, "int16", 2, False),
    (6, "int32", 4, False),
    (7, "int64", 8, False),
    (8, "uint8", 1, False),
    (9, "bool", 1, False),
    (10, "uint16", 2, False),
    (11, "uint32", 4, False),
    (12, "uint64", 8, False),
    (13, "complex64", 8, True),
    (14, "complex128", 16, True),
    (15, "complex32", 4, True),
    (16, "float8_e4m3fn", 1, True),
    (17, "float8_e5m2", 1, True),
    (18, "float8_e4m3fnuz", 1, True),
    (19, "float8_e5m2fnuz", 1, True),
    (20, "float8_e8m0fnu", 1, True),
    (21, "float4_e2m1fn_x2", 1, True),
)

ITEMSIZE: dict[int, int] = {code: size for code, _, size, _ in TABLE}
NAME_OF: dict[int, str] = {code: name for code, name, _, _ in TABLE}
CODE_OF_NAME: dict[str, int] = {name: code for code, name, _, _ in TABLE}
ITEMSIZE_OF_NAME: dict[str, int] = {name: size for _, name, size, _ in TABLE}
_PLANAR: dict[int, bool] = {code: flt and size >= 2 for code, _, size, flt in TABLE}
# torch's is_floating_point: the float-like dtypes but the complex ones.
_FLOATING = frozenset(n for _, n, _, flt in TABLE if flt and not n.startswith("complex"))

_NAMES: dict[Any, str] = {}  # torch dtype -> name, filled as dtypes are seen
_TORCH: dict[str, torch.dtype] = {}  # name -> torch dtype, filled as names are resolved

if TYPE_CHECKING:
    DTYPE_OF: dict[int, torch.dtype]
    CODE_OF: dict[torch.dtype, int]


def __getattr__(name: str) -> Any:
    # The torch-keyed tables import torch, so they are built when first asked for.
    if name in ("DTYPE_OF", "CODE_OF"):
        import torch

        dtypes = {code: getattr(torch, n) for code, n, _, _ in TABLE if hasattr(torch, n)}
        globals().update(DTYPE_OF=dtypes, CODE_OF={dt: code for code, dt in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype | str) -> str:
    """The torch attribute name of a dtype (a name is returned as it is); needs no torch import.

    Example:
        >>> import torch
        >>> dtype_name(torch.bfloat16), dtype_name(torch.float), dtype_name("int8")
        ('bfloat16', 'float32', 'int8')
    """
    if type(dtype) is str:
        return dtype
    name = _NAMES.get(dtype)
    if name is None:
        text = str(dtype)
        if not text.startswith("torch.") or type(dtype).__name__ != "dtype":
            raise TypeError(f"expected a torch.dtype or a dtype name, got {text!r}")
        name = _NAMES[dtype] = text.removeprefix("torch.")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (imports torch).

    Raises:
        FormatError: this torch build has no such dtype.

    Example:
        >>> torch_dtype("bfloat16")
        torch.bfloat16
    """
    dt = _TORCH.get(name)
    if dt is None:
        import torch

        found = getattr(torch, name, None)
        if not isinstance(found, torch.dtype):
            code = CODE_OF_NAME.get(name)
            known = f" (code {code})" if code is not None else ""
            raise FormatError(f"dtype {name}{known} is missing in this torch")
        dt = _TORCH[name] = found
    return dt


def dtype_code(dtype: torch.dtype | str, where: str = "") -> int:
    """The on-disk code of a torch dtype, or of a dtype name.

    Raises:
        StateError: the dtype has no code (sub-byte and quantized dtypes).

    Example:
        >>> import torch
        >>> dtype_code(torch.bfloat16), dtype_code("bool")
        (2, 9)
    """
    name = dtype_name(dtype)
    code = CODE_OF_NAME.get(name)
    if code is None:
        raise StateError(f"{where or 'tensor'}: dtype torch.{name} has no zckpt format code")
    return code


def name_of_code(code: int, where: str = "index") -> str:
    """The dtype name of an on-disk code (no torch needed).

    Raises:
        FormatError: the code is unknown.

    Example:
        >>> name_of_code(2)
        'bfloat16'
    """
    name = NAME_OF.get(code)
    if name is None:
        raise FormatError(f"{where}: unknown dtype code {code!r}")
    return name


def dtype_of_code(code: int, where: str = "index") -> torch.dtype:
    """The torch dtype of an on-disk code (imports torch).

    Raises:
        FormatError: the code is unknown, or this torch build lacks the dtype.

    Example:
        >>> dtype_of_code(9)
        torch.bool
    """
    name = name_of_code(code, where)
    try:
        return torch_dtype(name)
    except FormatError:
        raise FormatError(f"{where}: dtype {name} (code {code}) is missing in this torch") from None


def is_floating(name: str) -> bool:
    """Whether the named dtype is floating point as torch means it (complex is not).

    Example:
        >>> is_floating("bfloat16"), is_floating("complex64"), is_floating("int8")
        (True, False, False)
    """
    if name in ITEMSIZE_OF_NAME:
        return name in _FLOATING
    return bool(torch_dtype(name).is_floating_point)


def is_planar(code: int) -> bool:
    """Whether the byteplane codec splits this dtype into planes (float-like, >= 2 bytes).

    Example:
        >>> is_planar(0), is_planar(7), is_planar(16)
        (True, False, False)
    """
    return _PLANAR.get(code, False)


def cast_values(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``t`` as ``dtype`` (``t`` itself when it has that dtype): the one place an export or a
    resume narrows floating values, refusing a cast that turns a finite value into ``inf``
    (rounding to the nearest representable value is what a narrower dtype means; an
    infinity is a wrong value).

    Raises:
        CastError: some finite value of ``t`` overflows ``dtype`` (``what`` names the tensor).

    Example:
        >>> import torch
        >>> cast_values(torch.tensor([1.0, 3e38]), torch.bfloat16, "w").dtype
        torch.bfloat16
        >>> cast_values(torch.tensor([1.0, 1e6, -7e4]), torch.float16, "w")
        Traceback (most recent call last):
        ...
        zckpt.errors.CastError: w: 2 finite value(s) of its torch.float32 values (largest \
magnitude 1e+06) overflow torch.float16 (max 65504) and would be inf
    """
    import torch

    out = t.to(dtype)
    if out is t or not (t.is_floating_point() and out.is_floating_point()):
        return out
    if torch.finfo(dtype).max >= torch.finfo(t.dtype).max or not bool(out.isinf().any()):
        return out
    over = out.isinf() & t.isfinite()
    n = int(over.sum())
    if n:
        worst = float(t[over].abs().max())
        raise CastError(
            f"{what}: {n:,} finite value(s) of its {t.dtype} values (largest magnitude "
            f"{worst:.6g}) overflow {dtype} (max {torch.finfo(dtype).max:.6g}) and would be inf"
        )
    return out
