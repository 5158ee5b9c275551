"""Training state from an ``nn.Module``, an optimizer and an LR scheduler, keyed by names.

The state that zckpt shards is a plain pytree::

    {"module": model.state_dict(),                  # parameters and persistent buffers
     "optimizer": {"state": {param_name: {"exp_avg": ..., "step": ...}},
                   "param_groups": [{"lr": ..., ..., "params": [param_name, ...]}]},
     "lr_scheduler": scheduler.state_dict(),
     "global_steps": N}

Optimizer state is keyed by parameter names, not by the optimizer's indices, so a checkpoint
loads into a freshly built optimizer whatever order it lists its parameters in, and the
partition spec groups every ``exp_avg`` of one param group into one flat buffer as ZeRO does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch

from zckpt.errors import StateError
from zckpt.spec import ZeroSpec
from zckpt.store import LoadError

__all__ = [
    "Restored",
    "frozen_names",
    "load_module_state",
    "load_optimizer_state",
    "optimizer_param_names",
    "optimizer_state",
    "prefer_masters",
    "restore_training_state",
    "spec_for",
    "training_state",
    "unwrap",
]

MODULE, OPTIMIZER, LR_SCHEDULER, GLOBAL_STEPS, MASTER = (
    "module",
    "optimizer",
    "lr_scheduler",
    "global_steps",
    "master",
)
_HALF = (torch.float16, torch.bfloat16)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``DataParallel``/``DistributedDataParallel`` wrappers, else the model.

    Names are then the same with and without the wrapper (no ``module.`` prefix), so a
    checkpoint saved from a wrapped model loads into a bare one and back.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> unwrap(torch.nn.DataParallel(m)) is m
        True
    """
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        inner = model.module
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def optimizer_param_names(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> list[list[str]]:
    """The parameter names of each of the optimizer's param groups, in the optimizer's order.

    A tied (shared) parameter is named by its first name, as ``model.named_parameters()`` does.

    Raises:
        StateError: the optimizer holds a tensor that is not a parameter of the model.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> opt = torch.optim.SGD([{"params": model[1].parameters()},
        ...                        {"params": model[0].parameters(), "lr": 0.5}], lr=0.1)
        >>> optimizer_param_names(model, opt)
        [['1.weight', '1.bias'], ['0.weight', '0.bias']]
    """
    by_id = {id(p): n for n, p in unwrap(model).named_parameters()}
    out: list[list[str]] = []
    for g, group in enumerate(optimizer.param_groups):
        names = []
        for i, p in enumerate(group["params"]):
            name = by_id.get(id(p))
            if name is None:
                raise StateError(
                    f"optimizer/param_groups/{g}/params/{i}: a tensor of shape "
                    f"{list(p.shape)} that is not a parameter of the model"
                )
            names.append(name)
        out.append(names)
    return out


def frozen_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the model's frozen (``requires_grad=False``) parameters, for ``frozen=``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> model[0].requires_grad_(False)
        Linear(in_features=2, out_features=2, bias=True)
        >>> frozen_names(model)
        ('0.weight', '0.bias')
    """
    return tuple(n for n, p in unwrap(model).named_parameters() if not p.requires_grad)


def spec_for(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    world_size: int,
    stage: int = 2,
    **kwargs: Any,
) -> ZeroSpec:
    """The :class:`~zckpt.ZeroSpec` of :func:`training_state`: param groups from the optimizer.

    Every ``exp_avg`` (and every other per-parameter state tensor) of one optimizer param group
    forms one flat buffer, in the group's parameter order, as ZeRO-1/2 partitions it.

    Args:
        model: the model.
        optimizer: its optimizer, or None.
        world_size: number of data-parallel ranks.
        stage: ZeRO stage 1, 2 or 3.
        **kwargs: further :class:`~zckpt.ZeroSpec` fields (``alignment``, ``replicate``).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> spec_for(model, torch.optim.AdamW(model.parameters()), 4).param_groups
        (('weight', 'bias'),)
    """
    groups = () if optimizer is None else optimizer_param_names(model, optimizer)
    return ZeroSpec(world_size, stage, param_groups=tuple(tuple(g) for g in groups), **kwargs)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter names in place of indices (tensors not copied).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> st = optimizer_state(model, opt)
        >>> list(st["state"]), st["param_groups"][0]["params"]
        (['weight', 'bias'], ['weight', 'bias'])
    """
    names = [n for g in optimizer_param_names(model, optimizer) for n in g]
    sd = optimizer.state_dict()
    per_index = sd["state"]
    state = {names[i]: dict(per_index[i]) for i in range(len(names)) if i in per_index}
    extra = sorted(set(per_index) - set(range(len(names))), key=str)
    if extra:
        raise StateError(
            f"optimizer/state: entries {extra[:3]} belong to no parameter of its param_groups"
        )
    groups = []
    for group in sd["param_groups"]:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [names[i] for i in group["params"]]
        groups.append(g)
    return {"state": state, "param_groups": groups}


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    *,
    global_steps: int = 0,
) -> dict[str, Any]:
    """The state zckpt shards, built from a training loop's objects (views, nothing copied).

    ``module`` is ``model.state_dict()``: parameters and persistent buffers (non-persistent
    buffers are not part of it); tied parameters stay one tensor object, which zckpt stores
    once. ``optimizer`` is :func:`optimizer_state`; ``lr_scheduler`` is the scheduler's
    ``state_dict()``. Values zckpt cannot store are refused at save, named by key path.

    Args:
        model: the model (``DataParallel``/``DistributedDataParallel`` wrappers are unwrapped).
        optimizer: any ``torch.optim.Optimizer``, or None.
        lr_scheduler: any object with ``state_dict()``/``load_state_dict()``, or None.
        global_steps: the step counter, saved as ``global_steps`` (the default tag's N).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        >>> sorted(training_state(model, opt, sched, global_steps=7))
        ['global_steps', 'lr_scheduler', 'module', 'optimizer']
    """
    model = unwrap(model)
    state: dict[str, Any] = {MODULE: model.state_dict()}
    if optimizer is not None:
        state[OPTIMIZER] = optimizer_state(model, optimizer)
    if lr_scheduler is not None:
        state[LR_SCHEDULER] = lr_scheduler.state_dict()
    state[GLOBAL_STEPS] = global_steps
    return state


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> None:
    """Load :func:`optimizer_state` output into an optimizer, matching parameters by name.

    Saved hyperparameters replace the optimizer's; keys the checkpoint lacks (an optimizer
    option added by a newer PyTorch, say) keep the optimizer's own values.

    Raises:
        LoadError: the param groups differ in number or in which parameters they hold.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> saved = optimizer_state(model, opt)
        >>> fresh = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        >>> load_optimizer_state(model, fresh, saved)
        >>> fresh.param_groups[0]["lr"]
        0.1
    """
    groups, index = matched_groups(model, optimizer, saved)
    state = {index[name]: st for name, st in saved.get("state", {}).items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def matched_groups(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    saved: Mapping[str, Any],
    where: str = "",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The param groups ``load_state_dict`` gets from :func:`optimizer_state` output ``saved``
    (the optimizer's own hyperparameters, replaced by the saved ones; ``params`` the indices),
    and each parameter name's index; checked before anything is loaded.

    Raises:
        LoadError: the param groups differ in number or in which parameters they hold, or the
            saved state names a parameter the optimizer lacks (``where`` prefixes the message).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
        >>> saved = {"param_groups": [{"lr": 0.1, "params": ["bias", "weight"]}]}
        >>> groups, index = matched_groups(model, opt, saved)
        >>> groups[0]["lr"], groups[0]["params"], index
        (0.1, [0, 1], {'weight': 0, 'bias': 1})
    """
    at = f"{where}: " if where else ""
    current = optimizer_param_names(model, optimizer)
    saved_groups = list(saved.get("param_groups", ()))
    if len(saved_groups) != len(current):
        raise LoadError(
            f"{at}optimizer: the checkpoint has {len(saved_groups)} param groups, "
            f"the optimizer {len(current)}"
        )
    index: dict[str, int] = {}
    groups = []
    for g, (names, sg, group) in enumerate(zip(current, saved_groups, optimizer.param_groups)):
        saved_names = [str(n) for n in sg.get("params", ())]
        if sorted(saved_names) != sorted(names):
            missing = sorted(set(names) - set(saved_names))[:3]
            extra = sorted(set(saved_names) - set(names))[:3]
            raise LoadError(
                f"{at}optimizer/param_groups/{g}: parameters differ: the checkpoint lacks "
                f"{missing}, the optimizer lacks {extra}"
            )
        new = {k: v for k, v in group.items() if k != "params"}
        new.update({k: v for k, v in sg.items() if k != "params"})
        new["params"] = list(range(len(index), len(index) + len(names)))
        index.update({n: len(index) + i for i, n in enumerate(names)})
        groups.append(new)
    for name in saved.get("state", {}) or {}:
        if name not in index:
            raise LoadError(f"{at}optimizer/state/{name}: no such parameter in the optimizer")
    return groups, index


def _exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every ``src`` value is a ``dst`` value (fp16/bf16 -> fp32 -> fp64)."""
    return src == dst or (
        src.is_floating_point
        and dst.is_floating_point
        and torch.finfo(dst).bits > torch.finfo(src).bits
        and torch.finfo(dst).max >= torch.finfo(src).max
    )


def _check_cast(name: str, saved: torch.Tensor, dest: torch.Tensor) -> None:
    """Refuse a cast ``load_state_dict`` would make silently and wrongly: between kinds or
    integer widths (``1.7`` into an int buffer is ``1``, ``2**24 + 1`` into fp32 another
    number), or a finite float that overflows the destination's range (``1e6`` as fp16 is
    ``inf``)."""
    if saved.dtype == dest.dtype:
        return
    if not (saved.is_floating_point() and dest.is_floating_point()):
        raise LoadError(
            f"module/{name}: the model's tensor is {dest.dtype}, the checkpoint holds "
            f"{saved.dtype}; zckpt does not cast between integer, bool and float tensors "
            "(values would change silently): build the model with the saved dtype"
        )
    if torch.finfo(dest.dtype).max >= torch.finfo(saved.dtype).max:
        return
    finite = torch.isfinite(saved)
    over = finite & ~torch.isfinite(saved.to(dest.dtype))
    n = int(over.sum())
    if n:
        worst = float(saved[finite].abs().max())
        raise LoadError(
            f"module/{name}: {n:,} finite value(s) of the checkpoint's {saved.dtype} tensor "
            f"(largest magnitude {worst:.6g}) overflow the model's {dest.dtype} (max "
            f"{torch.finfo(dest.dtype).max:.6g}) and would load as inf: build the model with "
            f"the saved dtype"
        )


def prefer_masters(
    model: torch.nn.Module,
    module_state: Mapping[str, Any],
    masters: Mapping[str, Any] | None,
    *,
    warn: bool = True,
) -> dict[str, Any]:
    """The module state to load into ``model``, each value taken from the most exact source.

    A destination parameter in fp32 gets its fp32 master when the checkpoint has one (a
    mixed-precision run resumed into an fp32 model keeps its masters bit for bit), under every
    name it is tied to; so does a 16-bit destination of the other 16-bit dtype (a bf16 run
    resumed in fp16: the master rounded once, not the bf16 weight rounded again); otherwise the
    saved module value. A lossy choice warns (``warn``): a trainable fp32 destination filled
    from 16-bit weights (no master saved), a float destination less precise than the saved
    value (fp32 values in a 16-bit model: rounded), a bf16 checkpoint's values in an fp16
    destination or the reverse. Frozen parameters have no master; their saved value is the one
    training used, so filling them from it loses nothing.

    Raises:
        LoadError: a value the cast would change silently: an integer or bool tensor of
            another dtype than the model's (or a float one where the model's is not), or a
            finite float that overflows the destination's dtype (``inf``).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> master = torch.tensor([[0.1, 0.2]])
        >>> sd = {"weight": master.bfloat16(), "bias": torch.zeros(1)}
        >>> out = prefer_masters(model, sd, {"weight": master})
        >>> torch.equal(out["weight"], master), out["bias"].dtype
        (True, torch.float32)
        >>> prefer_masters(model.half(), {"weight": torch.full((1, 2), 1e6)}, None)
        Traceback (most recent call last):
        ...
        zckpt.store._load.LoadError: module/weight: 2 finite value(s) of the checkpoint's \
torch.float32 tensor (largest magnitude 1e+06) overflow the model's torch.float16 (max 65504) \
and would load as inf: build the model with the saved dtype
    """
    dest = unwrap(model).state_dict(keep_vars=True)
    # Frozen parameters have no master: their saved value is the one training used.
    params = {id(p) for p in unwrap(model).parameters() if p.requires_grad}
    exact: dict[int, torch.Tensor] = {}
    for name, t in dest.items():
        m = (masters or {}).get(name)
        if isinstance(m, torch.Tensor) and m.dtype == torch.float32 and m.shape == t.shape:
            exact.setdefault(id(t), m)
    out = dict(module_state)
    from_half, rounded, retyped = [], [], []
    for name, t in dest.items():
        saved = out.get(name)
        if not isinstance(saved, torch.Tensor) or not isinstance(t, torch.Tensor):
            continue
        if tuple(saved.shape) != tuple(t.shape):
            continue  # load_state_dict refuses it, naming both shapes
        if t.dtype == torch.float32 and id(t) in exact:
            out[name] = exact[id(t)]
        elif t.dtype in _HALF and saved.dtype in _HALF and saved.dtype != t.dtype:
            retyped.append(f"{name} ({saved.dtype} -> {t.dtype})")
            if id(t) in exact:  # rounded once, from the master
                out[name] = exact[id(t)]
        elif t.dtype == torch.float32 and saved.dtype in _HALF and id(t) in params:
            from_half.append(name)
        elif t.is_floating_point() and not _exact_cast(saved.dtype, t.dtype):
            rounded.append(name)
        _check_cast(name, out[name], t)
    if warn and from_half:
        warnings.warn(
            f"zckpt: {len(from_half)} fp32 parameter(s) restored from 16-bit weights, since the "
            f"checkpoint holds no fp32 master for them (e.g. {from_half[:3]}): precision lost "
            "at save cannot come back",
            stacklevel=3,
        )
    if warn and rounded:
        warnings.warn(
            f"zckpt: {len(rounded)} tensor(s) rounded from the checkpoint's more precise values "
            f"(e.g. {rounded[:3]})",
            stacklevel=3,
        )
    if warn and retyped:
        warnings.warn(
            f"zckpt: {len(retyped)} tensor(s) saved in one 16-bit dtype are loaded into the "
            f"other (e.g. {retyped[:3]}): the checkpoint was trained in another precision "
            "than this model's; each value is rounded from its fp32 master where the "
            "checkpoint has one, else cast from the saved 16-bit value",
            stacklevel=3,
        )
    return out


class Restored(NamedTuple):
    """What :func:`restore_training_state` did to the module.

    Example:
        >>> Restored((), (), 5).global_steps
        5
    """

    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    global_steps: int | None


def load_module_state(
    model: torch.nn.Module,
    module_state: Mapping[str, Any],
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``model.load_state_dict`` with zckpt's strictness: names in ``allow_missing`` (frozen
    parameters a checkpoint left out on purpose) may be missing even when ``strict``.

    Returns:
        ``(missing_keys, unexpected_keys)``.

    Raises:
        LoadError: strict and keys differ, or a tensor's shape differs.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> load_module_state(model, {"weight": torch.ones(1, 2)}, strict=False)
        (('bias',), ())
    """
    model = unwrap(model)
    try:
        result = model.load_state_dict(dict(module_state), strict=False)
    except RuntimeError as e:
        raise LoadError(f"module: {e}") from None
    allowed = set(allow_missing)
    missing = tuple(k for k in result.missing_keys if k not in allowed)
    unexpected = tuple(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise LoadError(
            f"module keys do not match (strict): missing {list(missing)}, "
            f"unexpected {list(unexpected)}"
        )
    return missing, unexpected


def restore_training_state(
    state: Mapping[str, Any],
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
) -> Restored:
    """Load a whole :func:`training_state` (e.g. ``zckpt.load_checkpoint(dir).state``) into a
    freshly built model, optimizer and scheduler. Parts the state lacks are left alone.

    The model is loaded first, then the optimizer (names to the new optimizer's indices), then
    the scheduler, as PyTorch asks. Tied parameters stay tied: the model's own parameter objects
    receive the values. An fp32 parameter gets the state's fp32 master (``master``) when it has
    one, else the module value (see :func:`prefer_masters`, which warns on lossy choices).

    Args:
        state: the whole state (world size 1, as every rank of a data-parallel loop holds it).
        model: the model to fill (None to skip).
        optimizer: the optimizer to fill (None to skip).
        lr_scheduler: the scheduler to fill (None to skip).
        strict: module keys must match exactly (except ``allow_missing``).
        allow_missing: module keys that may be missing (frozen parameters left out at save).

    Raises:
        LoadError: module keys or optimizer param groups do not match.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        >>> model(torch.ones(2, 3)).sum().backward(); opt.step()
        >>> saved = training_state(model, opt, global_steps=1)
        >>> model2 = torch.nn.Linear(3, 1)
        >>> opt2 = torch.optim.AdamW(model2.parameters())
        >>> restore_training_state(saved, model2, opt2).global_steps
        1
        >>> torch.equal(model2.weight, model.weight), opt2.param_groups[0]["lr"]
        (True, 0.01)
    """
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    if model is not None and MODULE in state:
        module = prefer_masters(model, state[MODULE], state.get(MASTER))
        missing, unexpected = load_module_state(
            model, module, strict=strict, allow_missing=allow_missing
        )
    if optimizer is not None and OPTIMIZER in state:
        if model is None:
            raise LoadError("restoring optimizer state needs the model (for parameter names)")
        load_optimizer_state(model, optimizer, state[OPTIMIZER])
    if lr_scheduler is not None and LR_SCHEDULER in state:
        lr_scheduler.load_state_dict(state[LR_SCHEDULER])
    steps = state.get(GLOBAL_STEPS)
    return Restored(
        missing,
        unexpected,
        steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
    )
