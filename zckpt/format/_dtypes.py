"""The fixed table of on-disk dtype codes (docs/format.md, "Dtype codes").

A code names a dtype forever: codes are only ever appended, never reused or renumbered. A dtype
this torch build lacks keeps its code; blobs holding it fail to decode here with a clear error.
"""

from __future__ import annotations

import torch

from zckpt.errors import FormatError, StateError

__all__ = [
    "CODE_OF",
    "DTYPE_OF",
    "ITEMSIZE",
    "TABLE",
    "dtype_code",
    "dtype_of_code",
    "is_planar",
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
_NAME: dict[int, str] = {code: name for code, name, _, _ in TABLE}
_PLANAR: dict[int, bool] = {code: flt and size >= 2 for code, _, size, flt in TABLE}
DTYPE_OF: dict[int, torch.dtype] = {
    code: getattr(torch, name) for code, name, _, _ in TABLE if hasattr(torch, name)
}
CODE_OF: dict[torch.dtype, int] = {dt: code for code, dt in DTYPE_OF.items()}


def dtype_code(dtype: torch.dtype, where: str = "") -> int:
    """The on-disk code of a torch dtype.

    Raises:
        StateError: the dtype has no code (sub-byte and quantized dtypes).

    Example:
        >>> dtype_code(torch.bfloat16)
        2
    """
    code = CODE_OF.get(dtype)
    if code is None:
        raise StateError(f"{where or 'tensor'}: dtype {dtype} has no zckpt format code")
    return code


def dtype_of_code(code: int, where: str = "index") -> torch.dtype:
    """The torch dtype of an on-disk code.

    Raises:
        FormatError: the code is unknown, or this torch build lacks the dtype.

    Example:
        >>> dtype_of_code(9)
        torch.bool
    """
    dt = DTYPE_OF.get(code)
    if dt is None:
        if code in _NAME:
            raise FormatError(
                f"{where}: dtype {_NAME[code]} (code {code}) is missing in this torch"
            )
        raise FormatError(f"{where}: unknown dtype code {code!r}")
    return dt


def is_planar(code: int) -> bool:
    """Whether the byteplane codec splits this dtype into planes (float-like, >= 2 bytes).

    Example:
        >>> is_planar(0), is_planar(7), is_planar(16)
        (True, False, False)
    """
    return _PLANAR.get(code, False)
