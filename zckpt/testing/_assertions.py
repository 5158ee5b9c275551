"""Bitwise assertions over states."""

from __future__ import annotations

import struct
from typing import Any

import torch

from zckpt.tree import format_path

__all__ = ["assert_states_equal", "tensors_bitwise_equal"]


def tensors_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN payloads and -0.0 count, unlike ``torch.equal``).

    Example:
        >>> nan = torch.tensor([float("nan")])
        >>> tensors_bitwise_equal(nan, nan.clone()), torch.equal(nan, nan)
        (True, False)
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ab = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    bb = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(ab, bb))


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two same-shaped tensors first differ bitwise: the flat element, its index and the
    two values."""
    if a.numel() == 0:
        return ""
    x = a.detach().cpu().contiguous().reshape(-1)
    y = b.detach().cpu().contiguous().reshape(-1)
    size = x.element_size()
    xb, yb = x.view(torch.uint8).reshape(-1, size), y.view(torch.uint8).reshape(-1, size)
    bad = (xb != yb).any(dim=1).nonzero()
    if not len(bad):
        return ""
    i = int(bad[0])
    index = list(torch.unravel_index(torch.tensor(i), tuple(a.shape))) if a.dim() else []
    at = f"[{', '.join(str(int(j)) for j in index)}]" if index else ""
    count = len(bad)
    return (
        f" at element {i}{' ' + at if at else ''}: {x[i].item()!r} != {y[i].item()!r}"
        f" ({count} of {x.numel()} elements differ)"
    )


def assert_states_equal(actual: Any, expected: Any, path: tuple[Any, ...] = ()) -> None:
    """Assert two states are equal bit for bit: containers, keys, value types, tensor bytes.

    Raises:
        AssertionError: naming the first differing key path.

    Example:
        >>> s = {"w": torch.tensor([-0.0]), "n": [1, 2.5]}
        >>> assert_states_equal(s, {"w": torch.tensor([-0.0]), "n": [1, 2.5]})
        >>> assert_states_equal(s, {"w": torch.tensor([0.0]), "n": [1, 2.5]})
        Traceback (most recent call last):
        ...
        AssertionError: w: tensor bytes differ at element 0 [0]: -0.0 != 0.0 (1 of 1 elements ...)
    """
    where = format_path(path)
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(f"{where}: expected a tensor, got {type(actual).__name__}")
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            raise AssertionError(
                f"{where}: expected {expected.dtype} {list(expected.shape)}, "
                f"got {actual.dtype} {list(actual.shape)}"
            )
        if not tensors_bitwise_equal(actual, expected):
            raise AssertionError(
                f"{where}: tensor bytes differ{_first_difference(actual, expected)}"
            )
        return
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or list(actual) != list(expected):
            raise AssertionError(f"{where}: keys differ: {list(actual)} != {list(expected)}")
        for k in expected:
            assert_states_equal(actual[k], expected[k], (*path, k))
        return
    if isinstance(expected, (list, tuple)):
        if type(actual) is not type(expected) or len(actual) != len(expected):
            raise AssertionError(f"{where}: expected {type(expected).__name__}[{len(expected)}]")
        for i, (x, y) in enumerate(zip(actual, expected)):
            assert_states_equal(x, y, (*path, i))
        return
    if type(actual) is not type(expected):
        raise AssertionError(f"{where}: {type(actual).__name__} != {type(expected).__name__}")
    if isinstance(expected, float):
        if struct.pack("<d", actual) != struct.pack("<d", expected):
            raise AssertionError(f"{where}: {actual!r} != {expected!r} (bitwise)")
    elif actual != expected:
        raise AssertionError(f"{where}: {actual!r} != {expected!r}")
