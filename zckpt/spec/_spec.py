"""The partition spec: how ZeRO splits a training state over ranks."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

from zckpt._lazy import lazy_module
from zckpt.errors import SpecError
from zckpt.spec._patterns import MAX_EXPERT_ID, MAX_KEY_CHARS, compile_expert_patterns
from zckpt.tree import Path, short_repr

if TYPE_CHECKING:
    import numpy as np

    from zckpt.format._tree_index import TreeIndex
else:
    np = lazy_module("numpy")  # only expert specs use it

__all__ = ["MAX_ALIGNMENT", "MAX_WORLD_SIZE", "ZeroSpec"]

# Bounds on values that come from checkpoints: a plan holds a list per rank, so a world size
# read from a file must be one that a real job has (a million ranks is far beyond any today).
MAX_WORLD_SIZE = 1 << 20
MAX_ALIGNMENT = 1 << 20  # elements; DeepSpeed uses 2
_KEYS = (
    "world_size", "stage", "alignment", "module", "master", "replicate", "param_groups",
    "experts", "expert_parallel_size",
)  # fmt: skip


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

    Expert patterns are read back from checkpoints, so they must match in linear time: only a
    subset of Python's regular expressions is accepted (``zckpt/spec/_patterns.py`` and
    ``docs/format.md``, "Untrusted values"). Quantifiers repeat one character, never a group
    (``(a+)+`` is refused); no backreferences, lookarounds, conditionals or ``(?i)``; a
    quantifier that varies is followed by a character it cannot match (``\d+\.``, not
    ``\d+\d+``); a pattern with ``*`` or ``+`` starts with ``^`` or with a literal that the
    repeated character is not (``experts\.(\d+)``, not ``(\d+)\.``); at most 8 patterns of at
    most 256 characters, whose match attempts cost at most 512 weighted steps together. A
    refused pattern raises a ``SpecError`` naming the construct and why. Group 1 must capture
    a decimal id below 2**20 wherever a pattern matches, in tensor paths of at most 2048
    characters.

    Every field is validated when a spec is made, from code or from a checkpoint
    (:meth:`from_dict`): ints are ints (not bools or floats), ``1 <= world_size <= 2**20``,
    ``1 <= alignment <= 2**20``, ``expert_parallel_size`` divides ``world_size``, names are strs,
    and a parameter is in at most one param group.

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

    Raises:
        SpecError: a field of the wrong type or out of range, or a refused expert pattern.

    Example:
        >>> spec = ZeroSpec(world_size=4, stage=2)
        >>> spec.padded(10)
        16
        >>> ZeroSpec(4, 3).stage
        3
        >>> ZeroSpec(2, 1, experts=(r"(\w+)+\.",))
        Traceback (most recent call last):
        ...
        zckpt.errors.SpecError: ZeroSpec.experts: pattern '(\\w+)+\\.' is not allowed: the ...
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
        _check_int("world_size", self.world_size, 1, MAX_WORLD_SIZE)
        if type(self.stage) is not int or self.stage not in (1, 2, 3):
            raise SpecError(f"ZeroSpec.stage must be 1, 2 or 3, got {short_repr(self.stage)}")
        _check_int("alignment", self.alignment, 1, MAX_ALIGNMENT)
        for name in ("module", "master"):
            if not isinstance(getattr(self, name), str):
                got = short_repr(getattr(self, name))
                raise SpecError(f"ZeroSpec.{name} must be a str, got {got}")
        replicate = _strs("replicate", self.replicate)
        groups = tuple(
            _strs(f"param_groups[{g}]", names)
            for g, names in enumerate(_items("param_groups", self.param_groups))
        )
        experts = _strs("experts", self.experts)
        compiled = compile_expert_patterns(experts)
        ep = self.expert_parallel_size
        _check_int("expert_parallel_size", ep, 1, self.world_size)
        if self.world_size % ep:
            raise SpecError(
                f"ZeroSpec.expert_parallel_size {ep} does not divide world_size {self.world_size}"
            )
        seen: dict[str, int] = {}
        for g, names in enumerate(groups):
            for n in names:
                if n in seen:
                    raise SpecError(
                        f"ZeroSpec.param_groups: parameter {short_repr(n)} is in groups "
                        f"{seen[n]} and {g}"
                    )
                seen[n] = g
        object.__setattr__(self, "replicate", replicate)
        object.__setattr__(self, "param_groups", groups)
        object.__setattr__(self, "experts", experts)
        # Derived once: plans ask every tensor path, and these come from untrusted files too.
        object.__setattr__(self, "_expert_rx", compiled)
        prefixes = frozenset(p for p in map(_prefix, replicate) if p)
        object.__setattr__(self, "_replicate_lengths", sorted({len(p) for p in prefixes}))
        object.__setattr__(self, "_replicate_prefixes", prefixes)

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
        prefixes: frozenset[tuple[str, ...]] = self.__dict__["_replicate_prefixes"]
        if not prefixes:
            return False
        keys = tuple(str(k) for k in path)
        lengths: list[int] = self.__dict__["_replicate_lengths"]
        return any(keys[:n] in prefixes for n in lengths if n <= len(keys))

    def expert_of(self, path: Path) -> int | None:
        r"""The global expert id of a tensor at ``path``, or None for a non-expert tensor.

        The first pattern (in order) that matches a key (in path order) decides.

        Raises:
            SpecError: a pattern matches but its group 1 is not a decimal id below 2**20, or
                the path's str keys hold more than 2048 characters (the length at which the
                patterns' worst case is bounded).

        Example:
            >>> spec = ZeroSpec(2, 2, experts=(r"experts\.(\d+)\.",))
            >>> spec.expert_of(("module", "moe.experts.3.w1")), spec.expert_of(("module", "fc"))
            (3, None)
        """
        patterns: tuple[re.Pattern[str], ...] = self.__dict__["_expert_rx"]
        if not patterns:
            return None
        keys = [k for k in path if isinstance(k, str)]
        if sum(map(len, keys)) > MAX_KEY_CHARS:  # the bound the patterns' cost is measured at
            raise SpecError(
                f"ZeroSpec.experts: the tensor path {short_repr('/'.join(keys))} has "
                f"{sum(map(len, keys))} characters, more than the {MAX_KEY_CHARS} that expert "
                f"patterns are matched against"
            )
        for rx in patterns:
            for key in keys:
                m = rx.search(key)
                if m:
                    return _expert_id(rx, key, m.group(1))
        return None

    def experts_of(self, paths: Iterable[Path]) -> list[int | None]:
        r""":meth:`expert_of` of every path, each distinct key matched once (a training state
        repeats every parameter name under module, master and each optimizer state).

        Example:
            >>> spec = ZeroSpec(2, 2, experts=(r"experts\.(\d+)\.",))
            >>> spec.experts_of([("module", "experts.1.w"), ("master", "experts.1.w"), ("x",)])
            [1, 1, None]
        """
        paths = paths if isinstance(paths, Sequence) else list(paths)
        ids = self._expert_ids(paths)
        return [None if e < 0 else e for e in ids.tolist()]

    def _expert_ids(self, paths: Sequence[Path]) -> np.ndarray:
        """:meth:`experts_of` as an int64 array, -1 for a non-expert tensor.

        Vectorised: every distinct key is matched once, then each path's answer is a segment
        minimum over its keys' (first matching pattern, position) codes. The answer and the
        error raised (the first path, in order, that is too long or whose deciding match is not
        an id) are those of :meth:`expert_of` on each path in turn.
        """
        patterns: tuple[re.Pattern[str], ...] = self.__dict__["_expert_rx"]
        n = len(paths)
        if not patterns or not n:
            return np.full(n, -1, dtype=np.int64)
        uniq = list(dict.fromkeys(chain.from_iterable(paths)))
        uid = {k: i for i, k in enumerate(uniq)}
        text, klen, kpat, gids = self._match_keys(uniq)
        npat = len(patterns)
        lens = np.fromiter(map(len, paths), dtype=np.int64, count=n)
        total = int(lens.sum())
        flat = np.fromiter(map(uid.__getitem__, chain.from_iterable(paths)), np.int64, total)
        ends = np.cumsum(lens)
        starts = ends - lens
        chars = np.concatenate(([0], np.cumsum(klen[flat])))
        too_long = np.flatnonzero(chars[ends] - chars[starts] > MAX_KEY_CHARS)
        out = np.full(n, -1, dtype=np.int64)
        nz = np.flatnonzero(lens)
        if len(nz):
            # Smallest (pattern, position in the path) over each path's keys decides.
            code = kpat[flat] * max(1, total) + np.arange(total, dtype=np.int64)
            best = np.minimum.reduceat(code, starts[nz])
            hit = best // max(1, total) < npat
            rows, pos = nz[hit], best[hit] % max(1, total)
            out[rows] = self._ids_of_keys(flat[pos], text, kpat, gids)
        first = self._first_error(out, too_long)
        if first is not None:
            self.expert_of(paths[first])  # raises the error naming the path
        return out

    def _expert_ids_tree(self, tree: TreeIndex) -> np.ndarray:
        """:meth:`_expert_ids` of a columnar skeleton's leaf paths, from its tree's arrays.

        Each distinct key is matched once, then the deciding (pattern, depth) and its key are
        carried down the tree a level at a time; the answer and the error are those of
        :meth:`_expert_ids` on the skeleton's ``paths`` (the paths are never built).
        """
        patterns: tuple[re.Pattern[str], ...] = self.__dict__["_expert_rx"]
        n = len(tree.leaf_node)
        if not patterns or not n:
            return np.full(n, -1, dtype=np.int64)
        text, klen, kpat, gids = self._match_keys(tree.keys)
        npat, width = len(patterns), tree.max_depth + 1
        key = np.where(tree.key >= 0, tree.key, len(text))  # past the keys: none (no match)
        best = np.append(kpat, npat)[key] * width + tree.depth  # (pattern, position)
        chars = np.append(klen, 0)[key]
        decider = tree.key.copy()  # the key of each node's best match so far
        for idx in tree.levels():
            up = tree.parent[idx]
            keep = best[up] < best[idx]
            best[idx] = np.where(keep, best[up], best[idx])
            decider[idx] = np.where(keep, decider[up], decider[idx])
            chars[idx] += chars[up]
        leaf = tree.leaf_node
        too_long = np.flatnonzero(chars[leaf] > MAX_KEY_CHARS)
        out = np.full(n, -1, dtype=np.int64)
        rows = np.flatnonzero(best[leaf] // width < npat)
        if len(rows):
            out[rows] = self._ids_of_keys(decider[leaf[rows]], text, kpat, gids)
        first = self._first_error(out, too_long)
        if first is not None:
            self.expert_of(tree.path(first))  # raises the error naming the path
        return out

    def _match_keys(
        self, keys: Sequence[Any]
    ) -> tuple[list[str], np.ndarray, np.ndarray, dict[int, str | None]]:
        """For distinct path keys: their text ("" for int keys), str lengths, the first
        pattern matching each (``len(patterns)`` for none) and that match's group 1."""
        patterns: tuple[re.Pattern[str], ...] = self.__dict__["_expert_rx"]
        strs = [i for i, k in enumerate(keys) if isinstance(k, str)]
        text: list[str] = [k if isinstance(k, str) else "" for k in keys]
        klen = np.zeros(len(keys), dtype=np.int64)
        klen[strs] = [len(text[i]) for i in strs]
        kpat = np.full(len(keys), len(patterns), dtype=np.int64)
        gids: dict[int, str | None] = {}
        todo = strs  # keys no earlier pattern matched
        for j, rx in enumerate(patterns):
            found = list(map(rx.search, [text[i] for i in todo]))
            hits = [i for i, m in zip(todo, found) if m is not None]
            for i, m in zip(todo, found):
                if m is not None:
                    gids[i] = m.group(1)
            kpat[hits] = j
            todo = [i for i, m in zip(todo, found) if m is None]
        return text, klen, kpat, gids

    def _ids_of_keys(
        self, deciding: np.ndarray, text: list[str], kpat: np.ndarray, gids: dict[int, str | None]
    ) -> np.ndarray:
        """The expert id each deciding key gives (each distinct key parsed once); -2 where its
        match is not an id (an error if that path comes first)."""
        patterns: tuple[re.Pattern[str], ...] = self.__dict__["_expert_rx"]
        keys, which = np.unique(deciding, return_inverse=True)
        ids = np.empty(len(keys), dtype=np.int64)
        parsed: dict[str | None, int] = {}  # whether a group 1 is an id depends on it alone
        for j, u in enumerate(keys.tolist()):
            gid = gids[u]
            e = parsed.get(gid)
            if e is None:
                try:
                    e = _expert_id(patterns[int(kpat[u])], text[u], gid)
                except SpecError:
                    e = -2
                parsed[gid] = e
            ids[j] = e
        out: np.ndarray = ids[which.reshape(-1)]
        return out

    @staticmethod
    def _first_error(ids: np.ndarray, too_long: np.ndarray) -> int | None:
        """The first path, in order, that is too long or whose deciding match is no id."""
        bad = np.flatnonzero(ids == -2)
        firsts = [int(a[0]) for a in (bad, too_long) if len(a)]
        return min(firsts) if firsts else None

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

        The input is untrusted (it comes from checkpoint files): any value at all raises a
        ``SpecError`` naming the field and what is wrong, or gives a valid spec. Fields are
        checked for their exact type (lists, not strs or maps, for the arrays; no coercion),
        then as the constructor checks them. ``world_size`` and ``stage`` are required; the
        other fields default as in the constructor; unknown keys are ignored (a newer writer
        may add fields, docs/format-evolution.md).

        Example:
            >>> ZeroSpec.from_dict({"world_size": 2, "stage": 1}).alignment
            2
            >>> ZeroSpec.from_dict({"world_size": 2, "stage": 1, "replicate": "buffers"})
            Traceback (most recent call last):
            ...
            zckpt.errors.SpecError: malformed spec: 'replicate' must be an array of strs, got ...
        """
        if not isinstance(d, dict):
            raise SpecError(f"malformed spec: expected a map, got {short_repr(d)}")
        for key in ("world_size", "stage"):
            if key not in d:
                raise SpecError(f"malformed spec: missing field {key!r}")

        def strs(key: str, v: Any) -> tuple[str, ...]:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise SpecError(
                    f"malformed spec: {key!r} must be an array of strs, got {short_repr(v)}"
                )
            return tuple(v)

        def text(key: str, default: str) -> str:
            v = d.get(key, default)
            if not isinstance(v, str):
                raise SpecError(f"malformed spec: {key!r} must be a str, got {short_repr(v)}")
            return v

        groups = d.get("param_groups", [])
        if not isinstance(groups, list):
            raise SpecError(
                f"malformed spec: 'param_groups' must be an array, got {short_repr(groups)}"
            )
        module, master = text("module", "module"), text("master", "master")
        replicate = strs("replicate", d.get("replicate", []))
        param_groups = tuple(strs(f"param_groups[{g}]", names) for g, names in enumerate(groups))
        experts = strs("experts", d.get("experts", []))
        try:
            return ZeroSpec(
                world_size=d["world_size"],
                stage=d["stage"],
                alignment=d.get("alignment", 2),
                module=module,
                master=master,
                replicate=replicate,
                param_groups=param_groups,
                experts=experts,
                expert_parallel_size=d.get("expert_parallel_size", 1),
            )
        except SpecError as e:
            raise SpecError(f"malformed spec: {e}") from None


def _check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpecError(f"ZeroSpec.{name} must be an int in [{lo}, {hi}], got {short_repr(v)}")


def _items(name: str, v: Any) -> tuple[Any, ...]:
    """A sequence field as a tuple; a str (a common slip for a 1-tuple) is refused."""
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise SpecError(f"ZeroSpec.{name} must be a sequence of strs, got {short_repr(v)}")
    return tuple(v)


def _strs(name: str, v: Any) -> tuple[str, ...]:
    items = _items(name, v)
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise SpecError(f"ZeroSpec.{name}[{i}] must be a str, got {short_repr(x)}")
    return items


def _expert_id(rx: re.Pattern[str], key: str, gid: str | None) -> int:
    if gid is not None and 0 < len(gid) <= 7 and gid.isdecimal() and int(gid) < MAX_EXPERT_ID:
        return int(gid)
    raise SpecError(
        f"ZeroSpec.experts: pattern {short_repr(rx.pattern)} matches the key {short_repr(key)}, "
        f"but its group 1 is {short_repr(gid)}, not a decimal expert id below {MAX_EXPERT_ID}"
    )
