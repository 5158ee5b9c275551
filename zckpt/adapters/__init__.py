"""Adapters for PyTorch training loops: model, optimizer and scheduler state keyed by names.

Three ways in, all on :func:`zckpt.save_checkpoint` and :func:`zckpt.load_checkpoint`:

- functions: :func:`training_state` builds the state (optimizer state keyed by parameter names),
  :func:`spec_for` its partition spec, :func:`restore_training_state` loads a whole state into
  fresh objects;
- :class:`Checkpointer`: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` method names;
- :class:`ZeroAdamW`: a reference ZeRO-1/2 optimizer that keeps only its partitions, saved with
  :func:`zero_shard` and loaded with :func:`load_partitions` at any world size.

See ``docs/training.md``.

Example:
    >>> import tempfile, torch, zckpt
    >>> from zckpt.adapters import restore_training_state, spec_for, training_state
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> d = tempfile.mkdtemp()
    >>> state = training_state(model, opt, global_steps=3)
    >>> zckpt.save_checkpoint(d, state, spec_for(model, opt, world_size=2)).tag
    'global_step3'
    >>> restore_training_state(zckpt.load_checkpoint(d).state, model, opt).global_steps
    3
"""

from zckpt.adapters._checkpointer import Checkpointer
from zckpt.adapters._state import (
    Restored,
    frozen_names,
    load_module_state,
    load_optimizer_state,
    optimizer_param_names,
    optimizer_state,
    prefer_masters,
    restore_training_state,
    spec_for,
    training_state,
    unwrap,
)
from zckpt.adapters._zero import GroupLayout, ZeroAdamW, load_partitions, zero_shard

__all__ = [
    "Checkpointer",
    "GroupLayout",
    "Restored",
    "ZeroAdamW",
    "frozen_names",
    "load_module_state",
    "load_optimizer_state",
    "load_partitions",
    "optimizer_param_names",
    "optimizer_state",
    "prefer_masters",
    "restore_training_state",
    "spec_for",
    "training_state",
    "unwrap",
    "zero_shard",
]
