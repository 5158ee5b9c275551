"""Hypothesis strategies for states and specs, for zckpt's tests and users' own harnesses."""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import strategies as st

from zckpt.spec import ZeroSpec

__all__ = ["DTYPES", "FLOAT_DTYPES", "specs", "states", "tensors", "training_states", "trees"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES = (
    *FLOAT_DTYPES,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
)

# Bit patterns every float test must meet: NaNs with payloads, signed zeros, infinities,
# subnormals, extremes.
_SPECIAL_F32 = [
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FA00001, 0xFFC12345,
    0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0x00800000,
]  # fmt: skip
_SPECIAL_16 = [
    0x0000,
    0x8000,
    0x7C00,
    0xFC00,
    0x7E00,
    0x7D01,
    0xFE55,
    0x0001,
    0x83FF,
    0x7F80,
    0xFF81,
]


def _from_bytes(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dtype == torch.bool:
        return (buf & 1).bool().reshape(shape)
    return buf.view(dtype).clone().reshape(shape)


@st.composite
def tensors(
    draw: st.DrawFn,
    dtype: torch.dtype | None = None,
    shape: tuple[int, ...] | None = None,
    max_numel: int = 64,
) -> torch.Tensor:
    """Tensors of any supported dtype with arbitrary bit patterns (special floats likely).

    Example:
        >>> from hypothesis import given
        >>> @given(tensors(dtype=torch.bfloat16))
        ... def check(t):
        ...     assert t.dtype == torch.bfloat16
        >>> check()
    """
    dt = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    if shape is None:
        ndim = draw(st.integers(0, 3))
        dims = draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim))
        if math.prod(dims) > max_numel:
            dims = [min(d, 2) for d in dims]
        shape = tuple(dims)
    itemsize = torch.empty((), dtype=dt).element_size()
    n = math.prod(shape)
    raw = bytearray(draw(st.binary(min_size=n * itemsize, max_size=n * itemsize)))
    if dt.is_floating_point and n:
        special = _SPECIAL_F32 if itemsize == 4 else _SPECIAL_16 if itemsize == 2 else None
        if special is not None:
            for i in draw(st.lists(st.integers(0, n - 1), max_size=min(n, 4))):
                v = draw(st.sampled_from(special))
                raw[i * itemsize : (i + 1) * itemsize] = v.to_bytes(itemsize, "little")
    return _from_bytes(bytes(raw), dt, shape)


_keys = st.one_of(st.text(min_size=1, max_size=6), st.integers(-3, 1000))
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)


def trees(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Arbitrary pytrees: dicts (str/int keys), lists, tuples of tensors and plain values.

    Example:
        >>> from hypothesis import given
        >>> @given(trees())
        ... def check(t):
        ...     import zckpt
        ...     zckpt.tree.flatten(t)
        >>> check()
    """
    leaf = st.one_of(tensors(), tensors(), _values)
    return st.recursive(
        leaf,
        lambda kids: st.one_of(
            st.dictionaries(_keys, kids, max_size=4),
            st.lists(kids, max_size=4),
            st.lists(kids, max_size=3).map(tuple),
        ),
        max_leaves=max_leaves,
    )


@st.composite
def training_states(draw: st.DrawFn, max_params: int = 5, max_numel: int = 80) -> Any:
    """A ZeRO training state: module weights (16-bit or fp32), fp32 masters, Adam moments.

    The layout is the one :class:`zckpt.ZeroSpec` defaults to: ``module``, ``master``,
    ``optimizer`` (``state`` keyed by parameter name, ``param_groups``), plus scalars.

    Example:
        >>> from hypothesis import given
        >>> @given(training_states())
        ... def check(s):
        ...     assert set(s) >= {"module", "master", "optimizer"}
        >>> check()
    """
    n = draw(st.integers(1, max_params))
    lp = draw(st.sampled_from((torch.bfloat16, torch.float16, torch.float32)))
    names = [f"layer{i}.{draw(st.sampled_from(['weight', 'bias']))}" for i in range(n)]
    module: dict[str, torch.Tensor] = {}
    master: dict[str, torch.Tensor] = {}
    opt: dict[str, Any] = {}
    for name in names:
        ndim = draw(st.integers(0, 2))
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
        if math.prod(shape) > max_numel:
            shape = tuple(min(d, 3) for d in shape)
        master[name] = draw(tensors(torch.float32, shape))
        module[name] = draw(tensors(lp, shape))
        opt[name] = {
            "exp_avg": draw(tensors(torch.float32, shape)),
            "exp_avg_sq": draw(tensors(torch.float32, shape)),
            "step": torch.tensor(float(draw(st.integers(0, 10**6)))),
        }
    module["num_batches"] = torch.tensor(draw(st.integers(0, 2**40)))
    state: dict[str, Any] = {
        "module": module,
        "master": master,
        "optimizer": {
            "state": opt,
            "param_groups": [{"lr": draw(st.floats(0, 1)), "betas": (0.9, 0.999), "params": names}],
        },
        "global_steps": draw(st.integers(0, 10**9)),
    }
    if draw(st.booleans()):
        state["extra"] = draw(trees(max_leaves=4))
    return state


def states() -> st.SearchStrategy[Any]:
    """Training states and arbitrary pytrees.

    Example:
        >>> isinstance(states(), st.SearchStrategy)
        True
    """
    return st.one_of(training_states(), trees())


@st.composite
def specs(draw: st.DrawFn, state: Any = None, max_world_size: int = 8) -> ZeroSpec:
    """Partition specs: world size 1..max, stage 1..3, alignment 1..4, random param groups.

    Example:
        >>> from hypothesis import given
        >>> @given(specs())
        ... def check(spec):
        ...     assert 1 <= spec.world_size <= 8
        >>> check()
    """
    groups: tuple[tuple[str, ...], ...] = ()
    if isinstance(state, dict) and isinstance(state.get("master"), dict) and draw(st.booleans()):
        names = [k for k in state["master"] if isinstance(k, str)]
        perm = draw(st.permutations(names))
        cut = draw(st.integers(0, len(perm)))
        groups = tuple(g for g in (tuple(perm[:cut]), tuple(perm[cut:])) if g)
    return ZeroSpec(
        world_size=draw(st.integers(1, max_world_size)),
        stage=draw(st.integers(1, 3)),
        alignment=draw(st.integers(1, 4)),
        param_groups=groups,
    )
