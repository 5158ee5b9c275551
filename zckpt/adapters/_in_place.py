"""Resume in place for an optimizer: the ``into=`` destinations of its state tensors.

:func:`zckpt.load_checkpoint` reads a leaf straight into a given tensor when the tensor has the
saved dtype and element count (``into=``). :func:`optimizer_into` names, for every saved
``optimizer/state/<param>/<key>`` tensor, the tensor ``optimizer.load_state_dict`` would end up
holding: the optimizer's own tensor when it already has one of the right shape, dtype and
device, else a new one of the dtype and device PyTorch's load rules give (the parameter's for
floating-point state, ``step`` as saved unless the group is fused or capturable). After the
load, :meth:`OptimizerInto.place` puts those tensors into the loaded state (values read fresh,
a cast or another device, are copied in), and ``load_state_dict`` then keeps them as they are:
its casts are no-ops on tensors that already have the dtype and device it wants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from zckpt.adapters._state import OPTIMIZER, matched_groups, optimizer_param_names
from zckpt.assemble import _overlap
from zckpt.store import LoadError
from zckpt.tree import Skeleton, unflatten

__all__ = ["OptimizerInto", "optimizer_into", "saved_optimizer"]


@dataclass(frozen=True)
class OptimizerInto:
    """The optimizer's part of an ``into=`` tree, and every destination it chose.

    ``tree`` is ``{"state": {name: {key: tensor}}}`` for the leaves read straight into their
    destination; ``dests`` holds ``(name, key, tensor, direct)`` for every state tensor, where
    ``direct`` says it was read in place (else it is read fresh and copied in by :meth:`place`).

    Example:
        >>> t = torch.zeros(2)
        >>> OptimizerInto({"state": {"w": {"exp_avg": t}}}, (("w", "exp_avg", t, True),)).reused
        0
    """

    tree: dict[str, Any]
    dests: tuple[tuple[str, str, torch.Tensor, bool], ...]
    reused: int = 0

    def place(self, saved: Mapping[str, Any]) -> None:
        """Put every destination into the loaded optimizer state ``saved`` (names as keys), in
        place of the value read there: a value read fresh is copied (cast) into it first.

        Example:
            >>> t = torch.zeros(2)
            >>> saved = {"state": {"w": {"exp_avg": torch.ones(2, dtype=torch.float64)}}}
            >>> OptimizerInto({}, (("w", "exp_avg", t, False),)).place(saved)
            >>> saved["state"]["w"]["exp_avg"] is t, t.tolist()
            (True, [1.0, 1.0])
        """
        state = saved.get("state")
        if not isinstance(state, Mapping):
            return
        with torch.no_grad():
            for name, key, dest, direct in self.dests:
                entry = state.get(name)
                if not isinstance(entry, dict):
                    continue
                value = entry.get(key)
                if not isinstance(value, torch.Tensor):
                    continue
                if not direct:
                    dest.copy_(value.reshape(dest.shape))
                entry[key] = dest


def saved_optimizer(skel: Skeleton) -> Mapping[str, Any] | None:
    """The saved ``optimizer`` subtree without its tensors (None at each tensor), or None.

    Example:
        >>> from zckpt.tree import flatten
        >>> skel, _ = flatten({"optimizer": {"state": {"w": {"exp_avg": torch.ones(2)}},
        ...                                  "param_groups": [{"lr": 0.1, "params": ["w"]}]}})
        >>> saved_optimizer(skel)["param_groups"]
        [{'lr': 0.1, 'params': ['w']}]
    """
    tree = unflatten(skel, [None] * len(skel.tensors))
    opt = tree.get(OPTIMIZER) if isinstance(tree, dict) else None
    return opt if isinstance(opt, Mapping) else None


def _target(
    p: torch.Tensor, key: str, saved: torch.dtype, group: Mapping[str, Any]
) -> tuple[torch.dtype, torch.device]:
    """The dtype and device ``Optimizer.load_state_dict`` gives a state tensor of ``p``
    (torch 2.x ``_process_value_according_to_param_policy``): ``step`` stays as loaded (a CPU
    tensor of the saved dtype) unless the group is fused or capturable (fp32 on the parameter's
    device); other floating-point parameters' state takes the parameter's dtype and device, the
    rest keeps its dtype and moves to the parameter's device."""
    if key == "step":
        if group.get("fused") or group.get("capturable"):
            return torch.float32, p.device
        return saved, torch.device("cpu")
    if p.is_floating_point():
        return p.dtype, p.device
    return saved, p.device


def _plain(optimizer: Any) -> bool:
    """An optimizer loaded by ``torch.optim.Optimizer.load_state_dict`` itself, whose rules
    :func:`_target` follows; any other (its own ``load_state_dict``) is loaded as before."""
    return (
        isinstance(optimizer, torch.optim.Optimizer)
        and getattr(type(optimizer), "load_state_dict", None)
        is torch.optim.Optimizer.load_state_dict
    )


def optimizer_into(
    model: torch.nn.Module, optimizer: Any, skel: Skeleton, where: str, taken: set[int]
) -> OptimizerInto | None:
    """The destinations of the optimizer's saved state tensors, or None to load it as before
    (an optimizer with its own ``load_state_dict``, or no saved optimizer state).

    Args:
        model: the (unwrapped) model the optimizer's parameters belong to.
        optimizer: the optimizer to resume.
        skel: the checkpoint's skeleton.
        where: the checkpoint, for messages.
        taken: ``data_ptr`` of memory already read into (the model's): never a destination.

    Raises:
        LoadError: the param groups do not match (as :func:`load_optimizer_state` says), or an
            existing state tensor's shape differs from the saved one (named by its path): a
            resume never swaps the optimizer's tensors for others silently.

    Example:
        >>> from zckpt.adapters import optimizer_state
        >>> from zckpt.tree import flatten
        >>> m = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> skel, _ = flatten({"optimizer": optimizer_state(m, opt)})
        >>> got = optimizer_into(m, opt, skel, "ckpt", set())
        >>> got.tree["state"]["weight"]["momentum_buffer"] is opt.state[m.weight]["momentum_buffer"]
        True
    """
    if not _plain(optimizer):
        return None
    saved = saved_optimizer(skel)
    if saved is None or not isinstance(saved.get("state"), Mapping):
        return None
    groups, index = matched_groups(model, optimizer, saved, where)
    by_name: dict[str, torch.Tensor] = {}
    group_of: dict[str, Mapping[str, Any]] = {}
    for names, group, merged in zip(
        optimizer_param_names(model, optimizer), optimizer.param_groups, groups
    ):
        by_name.update(zip(names, group["params"]))
        group_of.update(dict.fromkeys(names, merged))
    tree: dict[str, dict[str, torch.Tensor]] = {}
    dests: list[tuple[str, str, torch.Tensor, bool]] = []
    reused = 0
    by_leaf: dict[int, torch.Tensor] = {}
    for path, leaf in skel.tensor_paths():
        if len(path) != 4 or path[0] != OPTIMIZER or path[1] != "state":
            continue
        name, key = str(path[2]), path[3]
        p = by_name.get(name)
        if p is None or name not in index or not isinstance(key, str):
            continue  # matched_groups refused unknown names; a non-str key stays as loaded
        meta = skel.tensors[leaf]
        if meta.numel == 0:
            continue
        if leaf in by_leaf:  # one saved tensor under two entries: one tensor again, as saved
            dests.append((name, key, by_leaf[leaf], True))
            continue
        dtype, device = _target(p, key, meta.dtype, group_of[name])
        own = optimizer.state.get(p, {}).get(key) if p in optimizer.state else None
        dest: torch.Tensor | None = None
        if isinstance(own, torch.Tensor):
            if tuple(own.shape) != meta.shape:
                raise LoadError(
                    f"{where}: optimizer/state/{name}/{key}: the optimizer's tensor has shape "
                    f"{list(own.shape)}, the checkpoint {list(meta.shape)} (a resume fills the "
                    "optimizer's tensors where they are; a model or optimizer built differently "
                    "from the saved one?)"
                )
            if own.dtype == dtype and own.device == device and own.data_ptr() not in taken:
                dest = own
                reused += 1
        if dest is None:
            label = f"optimizer/state/{name}/{key}"
            if device.type == "cpu":
                dest = _overlap.new_tensor(meta.shape, dtype, label)
            else:
                dest = torch.empty(meta.shape, dtype=dtype, device=device)
        taken.add(dest.data_ptr())
        by_leaf[leaf] = dest
        direct = dest.device.type == "cpu" and dest.dtype == meta.dtype and dest.is_contiguous()
        if direct:
            tree.setdefault(name, {})[key] = dest
        dests.append((name, key, dest, direct))
    return OptimizerInto({"state": tree}, tuple(dests), reused)
