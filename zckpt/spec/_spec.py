"""The partition spec: how ZeRO splits a training state over ranks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zckpt.errors import SpecError
from zckpt.tree import Path

__all__ = ["ZeroSpec"]


def _prefix(p: str) -> tuple[str, ...]:
    return tuple(s for s in p.split("/") if s)


@dataclass(frozen=True)
class ZeroSpec:
    r"""A ZeRO partition spec: world size, stage, alignment and the roles of a state's subtrees.

    ZeRO semantics: the fp32 master weights and every optimizer state tensor are partitioned in
    every stage; the module (16-bit or fp32) weights under ``module`` are replicated under stages 1
    and 2 and partitioned under stage 3. Under stages 1 and 2 the partitioned tensors of one flat
    group (see below) are concatenated in order into one flat buffer, padded at the tail to a
    multiple of ``alignment * world_size`` elements, and cut into ``world_size`` equal contiguous
    partitions, as DeepSpeed's ZeRO-1/2 optimizer does. Under stage 3 each tensor is partitioned on
    its own, ``ceil(numel / world_size)`` elements per rank, the tail rank padded.

    Flat groups (stages 1 and 2): a tensor belongs to optimizer param group ``g`` when one of its
    path keys is a parameter name listed in ``param_groups[g]``; tensors that share dtype, group and
    the rest of their path (e.g. every ``exp_avg`` of group 0, or every master weight of group 1)
    form one flat buffer, ordered as ``param_groups[g]`` lists them. Without ``param_groups``,
    sibling tensors of one dtype under the same parent form a group, in state order.

    0-d tensors (step counters) and subtrees under ``replicate`` are never partitioned: each is
    written once, by one rank, the ranks taking turns so that writes run in parallel.

    Mixture of Experts: a tensor is an expert tensor when one of its path keys matches a pattern
    in ``experts`` (a regular expression whose first group is the global expert id, e.g.
    ``r"experts\.(\d+)\."``). With ``expert_parallel_size`` = k, expert ``e`` of E lives on the
    ranks whose ``rank % k == e // (E / k)`` (its expert-data-parallel group); its module weights
    are replicated over that group under stages 1 and 2, everything else of it is partitioned
    per tensor over the group. Each expert's tensors are written to a file of their own, so they
    load at any other expert-parallel size and world size.

    Args:
        world_size: number of data-parallel ranks (>= 1).
        stage: ZeRO stage, 1, 2 or 3.
        alignment: stage 1/2 flat buffers are padded to a multiple of ``alignment * world_size``
            elements (DeepSpeed uses 2).
        module: top-level key of the module state dict (replicated under stages 1 and 2).
        master: top-level key of the fp32 master weights, keyed by the module's parameter names.
        replicate: ``/``-separated path prefixes of subtrees that are always replicated.
        param_groups: parameter names of each optimizer param group, in flat-buffer order.
        experts: regular expressions matching expert parameter names; group 1 is the expert id.
        expert_parallel_size: number of expert-parallel ranks (divides world size and experts).

    Example:
        >>> spec = ZeroSpec(world_size=4, stage=2)
        >>> spec.padded(10)
        16
        >>> ZeroSpec(4, 3).stage
        3
    """

    world_size: int
    stage: int
    alignment: int = 2
    module: str = "module"
    master: str = "master"
    replicate: tuple[str, ...] = ()
    param_groups: tuple[tuple[str, ...], ...] = ()
    experts: tuple[str, ...] = ()
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "stage", "alignment"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"ZeroSpec.{name} must be an int, got {v!r}")
        if self.world_size < 1:
            raise SpecError(f"ZeroSpec.world_size must be >= 1, got {self.world_size}")
        if self.stage not in (1, 2, 3):
            raise SpecError(f"ZeroSpec.stage must be 1, 2 or 3, got {self.stage}")
        if self.alignment < 1:
            raise SpecError(f"ZeroSpec.alignment must be >= 1, got {self.alignment}")
        object.__setattr__(self, "replicate", tuple(self.replicate))
        object.__setattr__(self, "param_groups", tuple(tuple(g) for g in self.param_groups))
        object.__setattr__(self, "experts", tuple(self.experts))
        ep = self.expert_parallel_size
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise SpecError(f"ZeroSpec.expert_parallel_size must be an int >= 1, got {ep!r}")
        if self.world_size % ep:
            raise SpecError(
                f"ZeroSpec.expert_parallel_size {ep} does not divide world_size {self.world_size}"
            )
        for pat in self.experts:
            try:
                if re.compile(pat).groups < 1:
                    raise SpecError(f"ZeroSpec.experts: pattern {pat!r} has no group for the id")
            except re.error as e:
                raise SpecError(f"ZeroSpec.experts: bad pattern {pat!r}: {e}") from None
        seen: dict[str, int] = {}
        for g, names in enumerate(self.param_groups):
            for n in names:
                if n in seen:
                    raise SpecError(
                        f"ZeroSpec.param_groups: parameter {n!r} is in groups {seen[n]} and {g}"
                    )
                seen[n] = g

    def padded(self, numel: int) -> int:
        """Size of a stage 1/2 flat buffer of ``numel`` elements after tail padding.

        Example:
            >>> ZeroSpec(3, 1).padded(7)
            12
        """
        unit = self.alignment * self.world_size
        return -(-numel // unit) * unit

    def with_world_size(self, world_size: int, stage: int | None = None) -> ZeroSpec:
        """The same spec for another world size (and optionally stage).

        Example:
            >>> ZeroSpec(2, 2).with_world_size(5).world_size
            5
        """
        return ZeroSpec(
            world_size,
            self.stage if stage is None else stage,
            self.alignment,
            self.module,
            self.master,
            self.replicate,
            self.param_groups,
            self.experts,
            self.expert_parallel_size if world_size % self.expert_parallel_size == 0 else 1,
        )

    def is_replicated_path(self, path: Path) -> bool:
        """Whether ``path`` lies under one of the ``replicate`` prefixes.

        Example:
            >>> ZeroSpec(2, 1, replicate=("buffers",)).is_replicated_path(("buffers", "x"))
            True
        """
        keys = tuple(str(k) for k in path)
        return any(keys[: len(p)] == p for p in map(_prefix, self.replicate) if p)

    def expert_of(self, path: Path) -> int | None:
        r"""The global expert id of a tensor at ``path``, or None for a non-expert tensor.

        Example:
            >>> spec = ZeroSpec(2, 2, experts=(r"experts\.(\d+)\.",))
            >>> spec.expert_of(("module", "moe.experts.3.w1")), spec.expert_of(("module", "fc"))
            (3, None)
        """
        for pattern in self.experts:
            rx = re.compile(pattern)
            for key in path:
                if isinstance(key, str):
                    m = rx.search(key)
                    if m:
                        return int(m.group(1))
        return None

    def is_module_path(self, path: Path) -> bool:
        """Whether ``path`` lies under the module subtree.

        Example:
            >>> ZeroSpec(2, 1).is_module_path(("module", "fc.weight"))
            True
        """
        return bool(path) and str(path[0]) == self.module

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-able form (stored in blob headers and manifests).

        Example:
            >>> ZeroSpec.from_dict(ZeroSpec(2, 3).to_dict()) == ZeroSpec(2, 3)
            True
        """
        d: dict[str, Any] = {
            "world_size": self.world_size,
            "stage": self.stage,
            "alignment": self.alignment,
            "module": self.module,
            "master": self.master,
            "replicate": list(self.replicate),
            "param_groups": [list(g) for g in self.param_groups],
        }
        if self.experts or self.expert_parallel_size != 1:
            # Added after v1's first blobs: written only when used, so older specs (and the
            # golden blobs) encode to the same bytes (docs/format-evolution.md).
            d["experts"] = list(self.experts)
            d["expert_parallel_size"] = self.expert_parallel_size
        return d

    @staticmethod
    def from_dict(d: Any) -> ZeroSpec:
        """Parse :meth:`to_dict` output, rejecting malformed input with a ``SpecError``.

        Unknown keys are ignored (a newer writer may add fields).

        Example:
            >>> ZeroSpec.from_dict({"world_size": 2, "stage": 1}).alignment
            2
        """
        if not isinstance(d, dict):
            raise SpecError(f"spec must be a map, got {type(d).__name__}")
        try:
            return ZeroSpec(
                world_size=d["world_size"],
                stage=d["stage"],
                alignment=d.get("alignment", 2),
                module=str(d.get("module", "module")),
                master=str(d.get("master", "master")),
                replicate=tuple(str(p) for p in d.get("replicate", ())),
                param_groups=tuple(tuple(str(n) for n in g) for g in d.get("param_groups", ())),
                experts=tuple(str(p) for p in d.get("experts", ())),
                expert_parallel_size=d.get("expert_parallel_size", 1),
            )
        except (KeyError, TypeError) as e:
            raise SpecError(f"malformed spec {d!r}: {e}") from None
