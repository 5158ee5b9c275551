"""Hypothesis strategies and bitwise assertions, for zckpt's tests and users' own harnesses.

Example:
    >>> from hypothesis import given, settings
    >>> import zckpt
    >>> from zckpt.testing import assert_states_equal, specs, states
    >>> @settings(max_examples=5, deadline=None)
    ... @given(states(), specs())
    ... def round_trip(state, spec):
    ...     plan = zckpt.plan_shards(state, spec)
    ...     shards = [zckpt.shard_state(state, plan, r) for r in range(spec.world_size)]
    ...     assert_states_equal(zckpt.consolidate(shards), state)
    >>> round_trip()

The assertions and :class:`ThreadComm` need only torch; the strategies need hypothesis
(``pip install 'zckpt[test]'``), imported when first used.
"""

from typing import TYPE_CHECKING, Any

from zckpt.testing._assertions import assert_states_equal, tensors_bitwise_equal
from zckpt.testing._threads import ThreadComm, gather_errors, run_ranks

if TYPE_CHECKING:
    from zckpt.testing._strategies import (
        DTYPES,
        FLOAT_DTYPES,
        specs,
        states,
        tensors,
        training_states,
        trees,
    )

_STRATEGIES = ("DTYPES", "FLOAT_DTYPES", "specs", "states", "tensors", "training_states", "trees")


def __getattr__(name: str) -> Any:
    if name not in _STRATEGIES:
        raise AttributeError(f"module 'zckpt.testing' has no attribute {name!r}")
    try:
        from zckpt.testing import _strategies
    except ModuleNotFoundError as e:
        if e.name != "hypothesis":
            raise
        raise ModuleNotFoundError(
            f"zckpt.testing.{name} needs hypothesis, which is not installed: "
            "pip install 'zckpt[test]'",
            name="hypothesis",
        ) from None
    return getattr(_strategies, name)


__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "ThreadComm",
    "assert_states_equal",
    "gather_errors",
    "run_ranks",
    "specs",
    "states",
    "tensors",
    "tensors_bitwise_equal",
    "training_states",
    "trees",
]
