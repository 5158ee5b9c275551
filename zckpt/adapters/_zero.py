"""A reference ZeRO-1/2 AdamW: each rank keeps only its partition of the fp32 master weights and
Adam moments, laid out by zckpt's own plan, and saves and loads it without a full state.

The flat layout of param group ``g`` is ``plan.groups[...]`` of the state's ``master`` (and of
every ``exp_avg``/``exp_avg_sq``): the group's parameters concatenated in order, tail-padded to
a multiple of ``alignment * world_size`` and cut into equal partitions, rank ``r`` holding
``partition_range(r)``. The saved state has the same layout as :func:`training_state` of a
``torch.optim.AdamW`` plus the masters, so either optimizer loads the other's checkpoints::

    {"module": model.state_dict(), "master": {name: fp32},
     "optimizer": {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]},
     "lr_scheduler": ..., "global_steps": N}

0-d parameters are never partitioned (zckpt's plan replicates 0-d tensors): every rank keeps
their master and moments whole and updates them alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from zckpt.adapters._state import (
    GLOBAL_STEPS,
    LR_SCHEDULER,
    MODULE,
    OPTIMIZER,
    optimizer_param_names,
    unwrap,
)
from zckpt.assemble import assemble
from zckpt.errors import SpecError
from zckpt.shard import Shard, shard_from_local
from zckpt.spec import Fragment, ShardPlan, ZeroSpec, plan_shards
from zckpt.spec._plan import FLAT
from zckpt.store import Checkpoint, LoadError, drop_frozen
from zckpt.tree import Skeleton, flatten, unflatten

__all__ = ["GroupLayout", "ZeroAdamW", "load_partitions", "zero_shard"]

MASTER = "master"
MOMENTS = ("exp_avg", "exp_avg_sq")
AllGather = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class GroupLayout:
    """One param group's flat layout (from zckpt's plan) and this rank's partition of it.

    ``names[i]`` occupies ``[offsets[i], offsets[i] + numels[i])`` of the padded flat buffer of
    ``padded_numel`` elements; this rank holds ``[start, stop)``. ``scalars`` are the group's
    0-d parameters, kept whole on every rank.

    Example:
        >>> lay = GroupLayout(("a", "b"), (0, 5), (5, 3), 8, 4, 8, ())
        >>> lay.pieces()
        [('a', 4, 5, 0), ('b', 0, 3, 1)]
    """

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    padded_numel: int
    start: int
    stop: int
    scalars: tuple[str, ...]

    def pieces(self) -> list[tuple[str, int, int, int]]:
        """``(name, a, b, o)``: elements ``[a, b)`` of ``name`` sit at ``o`` in the partition."""
        out = []
        for name, off, n in zip(self.names, self.offsets, self.numels):
            a, b = max(self.start, off), min(self.stop, off + n)
            if a < b:
                out.append((name, a - off, b - off, a - self.start))
        return out


def _placeholder(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    # Shape and dtype for the plan, one element of memory: the data come from the partitions.
    return torch.zeros((), dtype=torch.float32).expand(tuple(shape))


def _leaf_of(skel: Skeleton) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for path, leaf in skel.tensor_paths():
        out.setdefault(tuple(str(k) for k in path), leaf)
    return out


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW whose fp32 master weights and moments are partitioned over ranks, ZeRO-1/2 style.

    Each rank holds, per param group, three flat fp32 buffers of ``partition_numel`` elements
    (master, ``exp_avg``, ``exp_avg_sq``) laid out by :func:`zckpt.plan_shards`. :meth:`step`
    takes this rank's slice of every gradient (expected already averaged over ranks, as after
    DDP's all-reduce), runs PyTorch's single-tensor AdamW arithmetic on the partition, and
    all-gathers the updated masters into the parameters. The arithmetic is elementwise, so the
    result is bitwise that of ``torch.optim.AdamW(foreach=False)`` on fp32 parameters at any
    world size. Gradients that are None count as zero.

    Args:
        model: the model whose parameters it updates (names come from it).
        params: parameters or param-group dicts, as for any optimizer; default: every
            parameter with ``requires_grad``.
        rank: this rank.
        world_size: number of data-parallel ranks.
        lr: AdamW learning rate (PyTorch's default).
        betas: AdamW betas (PyTorch's default).
        eps: AdamW epsilon (PyTorch's default).
        weight_decay: AdamW weight decay (PyTorch's default).
        stage: ZeRO stage recorded in the spec (1 or 2; the saved layout is the same).
        alignment: flat buffers are padded to a multiple of ``alignment * world_size``.
        all_gather: ``fn(output, input)`` gathering every rank's partition into ``output`` in
            rank order, e.g. :func:`zckpt.dist.all_gather_flat`; needed when
            ``world_size > 1``.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = ZeroAdamW(model, lr=0.01)
        >>> ref_model = torch.nn.Linear(3, 2)
        >>> ref_model.load_state_dict(model.state_dict())
        <All keys matched successfully>
        >>> ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01, foreach=False)
        >>> for m, o in ((model, opt), (ref_model, ref)):
        ...     m(torch.ones(4, 3)).square().sum().backward(); o.step()
        >>> torch.equal(model.weight, ref_model.weight)
        True
        >>> opt.layouts[0].names, opt.layouts[0].padded_numel
        (('weight', 'bias'), 8)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: Iterable[Any] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        stage: int = 2,
        alignment: int = 2,
        all_gather: AllGather | None = None,
    ) -> None:
        model = unwrap(model)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        if stage not in (1, 2):
            raise SpecError(f"ZeroAdamW partitions stages 1 and 2, got stage {stage}")
        if world_size > 1 and all_gather is None:
            raise SpecError("ZeroAdamW needs all_gather=... when world_size > 1")
        self.model = model
        self.rank, self.world_size, self._all_gather = rank, world_size, all_gather
        self.group_names = optimizer_param_names(model, self)
        self.spec = ZeroSpec(
            world_size,
            stage,
            alignment,
            param_groups=tuple(tuple(n) for n in self.group_names),
        )
        self._params = {n: p for names, g in zip(self.group_names, self.param_groups)
                        for n, p in zip(names, g["params"])}  # fmt: skip
        self.steps = [0] * len(self.param_groups)
        kinds = (MASTER, *MOMENTS)
        self.scalar: dict[str, dict[str, torch.Tensor]] = {
            n: {k: torch.zeros((), dtype=torch.float32) for k in kinds}
            for n, p in self._params.items()
            if p.dim() == 0
        }
        plan = plan_shards(self._tree({}, None, 0), self.spec)
        plan._check_rank(rank)
        self.layouts = tuple(self._layout(plan, g) for g in range(len(self.param_groups)))
        self.flat: list[dict[str, torch.Tensor]] = [
            {k: torch.zeros(lay.stop - lay.start, dtype=torch.float32) for k in kinds}
            for lay in self.layouts
        ]
        self.refresh_master_from_params()

    # -- layout -----------------------------------------------------------------------------

    def _tree(self, module: Mapping[str, Any], lr_scheduler: Any, global_steps: int) -> Any:
        """The full state as a tree: partitioned leaves are placeholders (shape only)."""
        master: dict[str, torch.Tensor] = {}
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        groups = []
        for g, (names, group) in enumerate(zip(self.group_names, self.param_groups)):
            for n in names:
                p = self._params[n]
                whole = self.scalar.get(n)
                if whole is None:
                    master[n] = _placeholder(p.shape)
                    moments = {k: _placeholder(p.shape) for k in MOMENTS}
                else:
                    master[n] = whole[MASTER]
                    moments = {k: whole[k] for k in MOMENTS}
                opt_state[n] = {"step": torch.tensor(float(self.steps[g])), **moments}
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": list(names)})
        tree: dict[str, Any] = {
            MODULE: dict(module),
            MASTER: master,
            OPTIMIZER: {"state": opt_state, "param_groups": groups},
        }
        if lr_scheduler is not None:
            tree[LR_SCHEDULER] = lr_scheduler.state_dict()
        tree[GLOBAL_STEPS] = global_steps
        return tree

    def _layout(self, plan: ShardPlan, g: int) -> GroupLayout:
        names = self.group_names[g]
        scalars = tuple(n for n in names if self._params[n].dim() == 0)
        flat = [n for n in names if self._params[n].dim() > 0 and self._params[n].numel() > 0]
        if not flat:
            return GroupLayout((), (), (), 0, 0, 0, scalars)
        fg = plan.groups[self._group_id(plan, (MASTER, flat[0]))]
        skel = plan.skeleton
        got = tuple(str(skel.paths[leaf][-1]) for leaf in fg.leaves)
        if got != tuple(flat):  # the plan orders a group by the spec's param_groups
            raise SpecError(f"param group {g}: zckpt's plan orders {got}, expected {flat}")
        lo, hi = fg.partition_range(self.rank)
        numels = tuple(skel.tensors[leaf].numel for leaf in fg.leaves)
        return GroupLayout(tuple(flat), fg.offsets, numels, fg.padded_numel, lo, hi, scalars)

    @staticmethod
    def _group_id(plan: ShardPlan, path: tuple[str, ...]) -> int:
        leaf = _leaf_of(plan.skeleton)[path]
        p = plan.placements[leaf]
        if p.kind != FLAT:
            raise SpecError(f"{'/'.join(path)} is not in a flat group of the plan ({p.kind})")
        return p.group

    def refresh_master_from_params(self) -> None:
        """Set this rank's master partitions (and 0-d masters) from the parameters' values.

        Example:
            >>> m = torch.nn.Linear(2, 1)
            >>> opt = ZeroAdamW(m)
            >>> with torch.no_grad():
            ...     _ = m.bias.fill_(3.0)
            >>> opt.refresh_master_from_params(); opt.flat[0]["master"][2].item()
            3.0
        """
        with torch.no_grad():
            for g, lay in enumerate(self.layouts):
                master = self.flat[g][MASTER]
                master.zero_()
                for name, a, b, o in lay.pieces():
                    src = self._params[name].detach().reshape(-1)[a:b]
                    master[o : o + (b - a)].copy_(src)
                for n in lay.scalars:
                    self.scalar[n][MASTER].copy_(self._params[n].detach())

    # -- training ---------------------------------------------------------------------------

    def _grad_partition(self, g: int) -> torch.Tensor:
        lay = self.layouts[g]
        out = torch.zeros(lay.stop - lay.start, dtype=torch.float32)
        for name, a, b, o in lay.pieces():
            grad = self._params[name].grad
            if grad is not None:
                out[o : o + (b - a)].copy_(grad.detach().reshape(-1)[a:b])
        return out

    @staticmethod
    def _adamw(
        param: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        step: int,
        group: Mapping[str, Any],
    ) -> None:
        # PyTorch's _single_tensor_adam with decoupled weight decay, operation for operation.
        lr, (beta1, beta2) = group["lr"], group["betas"]
        if group["weight_decay"] != 0:
            param.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** float(step)
        bias_correction2 = 1 - beta2 ** float(step)
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"])
        param.addcdiv_(exp_avg, denom, value=-step_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update this rank's partitions, then all-gather the masters into the parameters.

        Example:
            >>> m = torch.nn.Linear(2, 1)
            >>> opt = ZeroAdamW(m, lr=0.1)
            >>> m(torch.ones(1, 2)).sum().backward(); opt.step(); opt.steps
            [1]
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g, (group, lay) in enumerate(zip(self.param_groups, self.layouts)):
            self.steps[g] += 1
            bufs = self.flat[g]
            if lay.stop > lay.start:
                grad = self._grad_partition(g)
                m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
                self._adamw(bufs[MASTER], grad, m, v, self.steps[g], group)
            for name in lay.scalars:
                p, s = self._params[name], self.scalar[name]
                grad = torch.zeros((), dtype=torch.float32) if p.grad is None else p.grad.float()
                m, v = s["exp_avg"], s["exp_avg_sq"]
                self._adamw(s[MASTER], grad, m, v, self.steps[g], group)
        self._publish()
        return loss

    def _publish(self) -> None:
        for g, lay in enumerate(self.layouts):
            if lay.padded_numel:
                part = self.flat[g][MASTER]
                if self._all_gather is None:
                    full = part
                else:
                    full = torch.empty(lay.padded_numel, dtype=torch.float32)
                    self._all_gather(full, part)
                for name, off, numel in zip(lay.names, lay.offsets, lay.numels):
                    p = self._params[name]
                    p.copy_(full[off : off + numel].view(p.shape))
            for name in lay.scalars:
                self._params[name].copy_(self.scalar[name][MASTER])

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups: a copy of a
        # ZeroAdamW needs its partitions and layout too.
        return dict(self.__dict__)

    def state_dict(self) -> dict[str, Any]:
        """Not available: this rank holds a partition only; use :func:`zero_shard` (or
        :class:`zckpt.adapters.Checkpointer`), which save it without gathering.

        Example:
            >>> ZeroAdamW(torch.nn.Linear(1, 1)).state_dict()
            Traceback (most recent call last):
            ...
            NotImplementedError: ZeroAdamW holds one partition ...
        """
        raise NotImplementedError(
            "ZeroAdamW holds one partition of the optimizer state; save it with "
            "zckpt.adapters.zero_shard or zckpt.adapters.Checkpointer"
        )

    def load_state_dict(self, state_dict: Any) -> None:
        """Not available: load with :func:`load_partitions` (or the Checkpointer).

        Example:
            >>> ZeroAdamW(torch.nn.Linear(1, 1)).load_state_dict({})
            Traceback (most recent call last):
            ...
            NotImplementedError: ZeroAdamW loads its partition ...
        """
        raise NotImplementedError(
            "ZeroAdamW loads its partition with zckpt.adapters.load_partitions "
            "or zckpt.adapters.Checkpointer"
        )


def zero_shard(
    optimizer: ZeroAdamW,
    lr_scheduler: Any | None = None,
    *,
    global_steps: int = 0,
    frozen: Iterable[str] = (),
    exclude_frozen_parameters: bool = False,
) -> Shard:
    """This rank's shard of the whole training state, straight from its partitions.

    No rank builds the full state: the plan is made from a skeleton (partitioned tensors are
    shape-only placeholders), and the shard's data are views of this rank's flat buffers, of
    the module's tensors this rank writes, and of the small 0-d tensors. Pass it to
    :func:`zckpt.save_checkpoint` on every rank.

    Args:
        optimizer: the partitioned optimizer (its model supplies ``module``).
        lr_scheduler: saved as ``lr_scheduler`` when given.
        global_steps: saved as ``global_steps``.
        frozen: names of frozen parameters.
        exclude_frozen_parameters: leave the frozen parameters' entries out.

    Example:
        >>> import tempfile, zckpt
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = ZeroAdamW(model)
        >>> shard = zero_shard(opt, global_steps=4)
        >>> d = tempfile.mkdtemp()
        >>> zckpt.save_checkpoint(d, shard, global_step=4).tag
        'global_step4'
        >>> sorted(zckpt.load_checkpoint(d).state["master"])
        ['bias', 'weight']
    """
    module = optimizer.model.state_dict()
    if exclude_frozen_parameters:  # the module's entries only: the optimizer's own stay
        module = drop_frozen(module, frozen)
    tree = optimizer._tree(module, lr_scheduler, global_steps)
    skel, leaves = flatten(tree)
    plan = plan_shards(skel, optimizer.spec)
    groups: dict[int, torch.Tensor] = {}
    for g, lay in enumerate(optimizer.layouts):
        if not lay.names:
            continue
        fresh = optimizer._layout(plan, g)
        if fresh != lay:
            raise SpecError(f"param group {g}: the layout changed since the optimizer was built")
        for kind in (MASTER, *MOMENTS):
            path = (MASTER, lay.names[0]) if kind == MASTER else (
                OPTIMIZER, "state", lay.names[0], kind)  # fmt: skip
            groups[optimizer._group_id(plan, path)] = optimizer.flat[g][kind]
    tensors = {
        f.leaf: leaves[f.leaf]
        for f in plan.writes[optimizer.rank]
        if plan.placements[f.leaf].kind != FLAT
    }
    return shard_from_local(plan, optimizer.rank, groups, tensors)


def _uncovered(lay: GroupLayout) -> list[tuple[int, int]]:
    """The ranges of this rank's partition that hold no parameter's elements (padding)."""
    out, at = [], 0
    for _, a, b, o in sorted(lay.pieces(), key=lambda piece: piece[3]):
        if o > at:
            out.append((at, o))
        at = max(at, o + (b - a))
    if lay.stop - lay.start > at:
        out.append((at, lay.stop - lay.start))
    return out


def load_partitions(optimizer: ZeroAdamW, checkpoint: Checkpoint) -> None:
    """Fill this rank's partitions from a checkpoint saved at any world size, stage or layout.

    Each piece of a partition is assembled straight into the flat buffer (read from only the
    files holding it, checksums verified); nothing else is materialised. Masters come from
    ``master`` when saved, else from the ``module`` weights (upcast to fp32), so a checkpoint of
    a plain ``torch.optim.AdamW`` loop loads too. Hyperparameters and steps come from the saved
    ``optimizer/param_groups`` and ``optimizer/state/<name>/step``. A param group with no saved
    optimizer state at all starts fresh (moments zero, step 0), as PyTorch's AdamW does.

    Raises:
        LoadError: the saved parameters, shapes or steps do not fit this optimizer.

    Example:
        >>> import tempfile, zckpt
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = ZeroAdamW(model)
        >>> model(torch.ones(1, 3)).sum().backward(); opt.step()
        >>> d = tempfile.mkdtemp()
        >>> _ = zckpt.save_checkpoint(d, zero_shard(opt), tag="t")
        >>> opt2 = ZeroAdamW(torch.nn.Linear(3, 2))
        >>> load_partitions(opt2, zckpt.open_checkpoint(d))
        >>> opt2.steps, torch.equal(opt2.flat[0]["exp_avg"], opt.flat[0]["exp_avg"])
        ([1], True)
    """
    skel = checkpoint.manifest.skeleton
    where = checkpoint.path
    leaf_of = _leaf_of(skel)
    tree = unflatten(skel, [None] * len(skel.tensors))
    saved_groups = tree.get(OPTIMIZER, {}).get("param_groups") if isinstance(tree, dict) else None
    if not isinstance(saved_groups, list) or len(saved_groups) != len(optimizer.param_groups):
        count = len(saved_groups) if isinstance(saved_groups, list) else 0
        raise LoadError(
            f"{where}: the checkpoint has {count} optimizer param groups, "
            f"the optimizer {len(optimizer.param_groups)}"
        )

    def leaf(path: tuple[str, ...], want: torch.Size) -> int | None:
        i = leaf_of.get(path)
        if i is not None and skel.tensors[i].shape != tuple(want):
            raise LoadError(
                f"{where}: {'/'.join(path)} has shape {list(skel.tensors[i].shape)}, "
                f"the model's parameter {list(want)}"
            )
        return i

    wanted: list[Fragment] = []
    outs: list[torch.Tensor] = []
    steps: list[tuple[int, str, int]] = []
    fresh_groups: set[int] = set()
    for g, (names, lay) in enumerate(zip(optimizer.group_names, optimizer.layouts)):
        saved_names = [str(n) for n in saved_groups[g].get("params", ())]
        if sorted(saved_names) != sorted(names):
            raise LoadError(
                f"{where}: optimizer/param_groups/{g} holds {saved_names[:4]}..., "
                f"the optimizer {names[:4]}..."
            )
        with_state = [n for n in names if (OPTIMIZER, "state", n, "exp_avg") in leaf_of]
        if with_state and len(with_state) != len(names):
            lacking = sorted(set(names) - set(with_state))[:3]
            raise LoadError(f"{where}: optimizer/state lacks {lacking} of param group {g}")
        if not with_state:
            fresh_groups.add(g)
        unsupported = [k for k in ("amsgrad", "maximize") if saved_groups[g].get(k)]
        if unsupported:
            raise LoadError(f"{where}: param group {g} uses {unsupported}, which ZeroAdamW lacks")
        fresh = g in fresh_groups
        # Every buffer is read where it lives; only what no piece covers (the tail padding, a
        # fresh group's moments) is zeroed, so a resume writes each byte once.
        for kind, buf in optimizer.flat[g].items():
            if fresh and kind != MASTER:
                buf.zero_()
            else:
                for lo, hi in _uncovered(lay):
                    buf[lo:hi].zero_()
        for name in lay.scalars:
            for t in optimizer.scalar[name].values():
                t.zero_()

        def source(name: str, kind: str, fresh: bool = fresh) -> int | None:
            shape = optimizer._params[name].shape
            if kind == MASTER:
                i = leaf((MASTER, name), shape)
                i = leaf((MODULE, name), shape) if i is None else i
                if i is None:
                    raise LoadError(f"{where}: neither master/{name} nor module/{name} is saved")
                return i
            return None if fresh else leaf((OPTIMIZER, "state", name, kind), shape)

        for name, a, b, o in lay.pieces():
            for kind, buf in optimizer.flat[g].items():
                i = source(name, kind)
                if i is not None:
                    wanted.append(Fragment(i, a, b))
                    outs.append(buf[o : o + (b - a)])
        for name in lay.scalars:
            for kind, t in optimizer.scalar[name].items():
                i = source(name, kind)
                if i is not None:
                    wanted.append(Fragment(i, 0, 1))
                    outs.append(t.view(1))
        if g not in fresh_groups:
            for name in names:
                i = leaf_of.get((OPTIMIZER, "state", name, "step"))
                if i is None:
                    raise LoadError(f"{where}: optimizer/state/{name}/step is not saved")
                steps.append((g, name, i))

    index = checkpoint.source_index()
    got_steps = assemble(index, [Fragment(i, 0, 1) for _, _, i in steps])
    assemble(index, wanted, [torch.float32] * len(wanted), outs)

    per_group: dict[int, set[float]] = {}
    for (g, _, _), t in zip(steps, got_steps):
        per_group.setdefault(g, set()).add(float(t.item()))
    for g in range(len(optimizer.param_groups)):
        values = per_group.get(g, {0.0})
        if len(values) != 1:
            raise LoadError(f"{where}: param group {g}'s parameters have different steps {values}")
        (step,) = values
        if step != math.floor(step) or step < 0:
            raise LoadError(f"{where}: param group {g}: step {step} is not a count")
        optimizer.steps[g] = int(step)
        hyper = {k: v for k, v in saved_groups[g].items() if k != "params"}
        optimizer.param_groups[g].update(hyper)
