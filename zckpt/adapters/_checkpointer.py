"""DeepSpeed's checkpoint method names for engine-style loops, on zckpt's functions."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from zckpt.adapters._in_place import OptimizerInto, optimizer_into
from zckpt.adapters._state import (
    GLOBAL_STEPS,
    LR_SCHEDULER,
    MASTER,
    MODULE,
    OPTIMIZER,
    frozen_names,
    load_module_state,
    prefer_masters,
    restore_training_state,
    spec_for,
    training_state,
    unwrap,
)
from zckpt.adapters._zero import ZeroAdamW, load_partitions, zero_shard
from zckpt.dist import Comm, default_comm
from zckpt.errors import ArgumentError, SpecError, ZckptError
from zckpt.spec import ZeroSpec
from zckpt.store import (
    SKIP,
    Checkpoint,
    CheckpointNotFoundError,
    LoadError,
    Saved,
    Storage,
    TagError,
    list_tags,
    load_checkpoint,
    open_checkpoint,
    save_checkpoint,
)
from zckpt.store._explain import explain
from zckpt.store._read import following_latest, locate
from zckpt.store._resolve import is_url, storage_for
from zckpt.tree import Skeleton

__all__ = ["Checkpointer"]


#: What one load read: the tag directory, the client state, the manifest's generation.
_Loaded = tuple[str | None, dict[str, Any] | None, str | None]


def _latest_tag(storage: Storage, where: str) -> str | None:
    """The tag ``latest`` names under ``where`` (None: none, ``where`` is a tag directory, or
    it cannot be read: then each rank finds out for itself, and the load says why)."""
    try:
        found = locate(storage, where, None)
    except (ZckptError, OSError):
        return None
    return found.tag if found is not None and found.via_latest else None


class _OverwrittenError(LoadError):
    """The tag being loaded was overwritten meanwhile (its generation changed)."""


def _where(path: str) -> str:
    """A save_dir's identity: its real path, or a URL as it is (``realpath`` would mangle it)."""
    return path.rstrip("/") if is_url(path) else os.path.realpath(path)


class Checkpointer:
    """``save_checkpoint``/``load_checkpoint`` with DeepSpeed's names, for a model, optimizer and
    LR scheduler; every rank calls them.

    With a plain ``torch.optim`` optimizer (data parallelism: every rank holds the whole state)
    each rank writes only its shard of the state for ``stage``; a load reads the whole state on
    every rank, at any world size. With a :class:`~zckpt.adapters.ZeroAdamW` each rank saves
    its own partitions directly and loads exactly its partitions for the current world size.

    Args:
        model: the model (``DistributedDataParallel`` is unwrapped: names have no prefix).
        optimizer: any ``torch.optim.Optimizer`` or a ``ZeroAdamW``, or None.
        lr_scheduler: anything with ``state_dict()``/``load_state_dict()``, or None.
        stage: the ZeRO stage of the written layout (a ``ZeroAdamW`` brings its own spec).
        comm: the ranks (:mod:`zckpt.dist`); default :func:`zckpt.dist.default_comm`.
        tag_validation: ``"warn"``, ``"ignore"`` or ``"fail"`` when ranks pass different tags.
        keep_last: keep only the newest ``keep_last`` tags after each save.
        codec: blob codec, ``"raw"``, ``"zstd"`` or ``"byteplane"``.
        storage: the filesystem (:class:`zckpt.store.Storage`).
        existing: what the first save into a ``save_dir`` that already holds another run's
            checkpoints (tags this Checkpointer neither loaded from nor wrote) does:
            ``"refuse"`` (the default: a fresh run must not quietly mix with, or let
            retention delete, an older run's checkpoints) or ``"keep"`` (save beside them).

    Attributes:
        global_steps: the step counter (:meth:`step` advances it; or set it); saved, restored,
            and the default tag's N (``global_step{N}``).

    Example:
        >>> import tempfile
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        >>> ckpt = Checkpointer(model, opt)
        >>> model(torch.ones(3, 4)).sum().backward(); opt.step(); ckpt.global_steps += 1
        >>> d = tempfile.mkdtemp()
        >>> ckpt.save_checkpoint(d, client_state={"epoch": 2}).tag
        'global_step1'
        >>> model2 = torch.nn.Linear(4, 2)
        >>> fresh = Checkpointer(model2, torch.optim.AdamW(model2.parameters()))
        >>> path, client = fresh.load_checkpoint(d)
        >>> client, fresh.global_steps, torch.equal(model2.weight, model.weight)
        ({'epoch': 2}, 1, True)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        *,
        stage: int = 2,
        comm: Comm | None = None,
        tag_validation: str = "warn",
        keep_last: int | None = None,
        codec: str = "raw",
        storage: Storage | None = None,
        existing: str = "refuse",
    ) -> None:
        if existing not in ("refuse", "keep"):
            raise ArgumentError(f"existing must be 'refuse' or 'keep', got {existing!r}")
        self.existing = existing
        self._known_dirs: set[str] = set()  # save_dirs this run loaded from or wrote to
        self._last_saved: tuple[str, str] | None = None
        self.module = unwrap(model)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.stage = stage
        self.comm = default_comm() if comm is None else comm
        self.tag_validation = tag_validation
        self.keep_last = keep_last
        self.codec = codec
        self.storage = storage
        self.global_steps = 0
        if isinstance(optimizer, ZeroAdamW):
            if optimizer.model is not self.module:
                raise SpecError("the ZeroAdamW was built for another model")
            if optimizer.world_size != self.comm.size or optimizer.rank != self.comm.rank:
                raise SpecError(
                    f"the ZeroAdamW is rank {optimizer.rank} of {optimizer.world_size}, the "
                    f"process group's rank {self.comm.rank} of {self.comm.size}"
                )

    @property
    def spec(self) -> ZeroSpec:
        """The partition spec saves use.

        Example:
            >>> Checkpointer(torch.nn.Linear(2, 2)).spec.world_size
            1
        """
        if isinstance(self.optimizer, ZeroAdamW):
            return self.optimizer.spec
        return spec_for(self.module, self.optimizer, self.comm.size, self.stage)

    def step(self, n: int = 1) -> int:
        """Advance :attr:`global_steps` by ``n`` (call it once per optimizer step); returns it.

        Example:
            >>> ckpt = Checkpointer(torch.nn.Linear(2, 2))
            >>> ckpt.step(), ckpt.step()
            (1, 2)
        """
        self.global_steps += n
        return self.global_steps

    def _check_existing(self, save_dir: str) -> None:
        """The first save into a save_dir holding another run's committed tags needs a choice."""
        where = _where(save_dir)
        if where in self._known_dirs:
            return
        found: list[str] = []
        if self.existing == "refuse" and self.comm.rank == 0:
            try:
                found = [c.tag for c in list_tags(save_dir, storage=self.storage)]
            except (ZckptError, OSError):
                found = []
        found = self.comm.all_gather(found)[0]  # every rank decides as rank 0 saw it
        if found:
            shown = ", ".join(found[-5:]) if len(found) <= 5 else "..., " + ", ".join(found[-5:])
            raise ArgumentError(
                f"{save_dir} already holds checkpoints this run did not write ({len(found)} "
                f"committed tags, the newest last: {shown}); a fresh run would mix with them, and "
                "keep_last retention would delete them. Resume from them "
                "(ckpt.load_checkpoint(save_dir)), save into another directory, or pass "
                "Checkpointer(..., existing='keep') to save beside them"
            )
        self._known_dirs.add(where)

    def save_checkpoint(
        self,
        save_dir: str | os.PathLike[str],
        tag: str | None = None,
        client_state: Mapping[str, Any] | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
        *,
        global_step: int | None = None,
        overwrite: bool = False,
    ) -> Saved:
        """Save module, optimizer, scheduler and ``global_steps`` as ``save_dir/<tag>``.

        Every rank calls it; each writes only its own shard (see :func:`zckpt.save_checkpoint`
        for the commit protocol and errors). The result is truthy, like DeepSpeed's ``True``.

        Args:
            save_dir: the checkpoint directory.
            tag: default ``global_step{global_steps}``.
            client_state: your values (msgpack-able values and tensors), returned by loads.
            save_latest: point ``latest`` at this tag.
            exclude_frozen_parameters: leave frozen parameters out of the module state.
            global_step: set :attr:`global_steps` first (instead of calling :meth:`step`).
            overwrite: replace a committed tag of the same name (atomically).

        Raises:
            ArgumentError: the first save into a ``save_dir`` holding another run's
                checkpoints (see ``existing``).
            TagError: the tag is committed already and ``overwrite`` is False (saving twice at
                one step: the message says so).

        Example:
            >>> import tempfile
            >>> ckpt = Checkpointer(torch.nn.Linear(2, 2))
            >>> ckpt.save_checkpoint(tempfile.mkdtemp(), tag="warmup").tag
            'warmup'
        """
        if global_step is not None:
            if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
                raise ArgumentError(f"global_step must be an int >= 0, got {global_step!r}")
            self.global_steps = global_step
        save_dir = os.fspath(save_dir)
        self._check_existing(save_dir)
        frozen = frozen_names(self.module)
        state: Any
        if isinstance(self.optimizer, ZeroAdamW):
            state = zero_shard(
                self.optimizer,
                self.lr_scheduler,
                global_steps=self.global_steps,
                frozen=frozen,
                exclude_frozen_parameters=exclude_frozen_parameters,
            )
        else:
            state = training_state(
                self.module, self.optimizer, self.lr_scheduler, global_steps=self.global_steps
            )
        try:
            saved = save_checkpoint(
                save_dir,
                state,
                self.spec,
                tag=tag,
                client_state=client_state,
                save_latest=save_latest,
                exclude_frozen_parameters=exclude_frozen_parameters,
                frozen=frozen,
                global_step=self.global_steps,
                tag_validation=self.tag_validation,
                overwrite=overwrite,
                keep_last=self.keep_last,
                codec=self.codec,
                comm=self.comm,
                storage=self.storage,
            )
        except TagError as e:
            if tag is None and "already holds a committed checkpoint" in str(e):
                raise TagError(
                    f"{e} (Checkpointer.save_checkpoint: global_steps is still "
                    f"{self.global_steps}; call ckpt.step() once per training step, pass "
                    "global_step=..., or overwrite=True to replace it)"
                ) from None
            raise
        self._last_saved = (save_dir, saved.tag)
        return saved

    def _in_place(
        self,
        ck: Checkpoint | None,
        masters: bool,
        module: bool,
        optimizer: bool,
    ) -> tuple[dict[str, Any] | None, frozenset[str], OptimizerInto | None]:
        """The ``into=`` tree that reads straight into the memory the training objects own;
        the module names so filled; the optimizer's destinations (see
        :func:`~zckpt.adapters._in_place.optimizer_into`), when ``optimizer``.

        Module (``module``): each CPU parameter or buffer whose saved value has its dtype and
        shape, and an fp32 parameter from its fp32 master (the 16-bit copy then is not read at
        all). Anything else is read fresh and copied (cast) as before.
        """
        if ck is None:
            return None, frozenset(), None
        into, done = self._module_into(ck.manifest.spec, ck.manifest.skeleton, masters, module)
        opt_into = None
        if optimizer:
            taken = {t.data_ptr() for t in self.module.state_dict().values()}
            opt_into = optimizer_into(self.module, self.optimizer, ck.manifest.skeleton,
                                      ck.path, taken)  # fmt: skip
            if opt_into is not None:
                into = {**(into or {}), OPTIMIZER: opt_into.tree}
        return into, done, opt_into

    def _module_into(
        self, spec: ZeroSpec, skel: Skeleton, masters: bool, module_wanted: bool
    ) -> tuple[dict[str, Any] | None, frozenset[str]]:
        """The module's part of :meth:`_in_place`: its ``into=`` tree and the names filled."""
        if not module_wanted:
            return None, frozenset()
        leaf_of = dict(skel.tensor_paths())
        metas = {path: skel.tensors[leaf] for path, leaf in leaf_of.items()}
        dests = self.module.state_dict()
        # A saved leaf is read once, into one place: names sharing a saved leaf must share
        # memory in the model too (tied there as well), else they are copied as before.
        memory: dict[int, set[int]] = {}
        for name, t in dests.items():
            leaf = leaf_of.get((spec.module, name))
            if leaf is not None and isinstance(t, torch.Tensor):
                memory.setdefault(leaf, set()).add(t.data_ptr())
        module: dict[str, Any] = {}
        master: dict[str, Any] = {}
        done: set[str] = set()
        by_memory: dict[int, str] = {}
        for name, t in dests.items():
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
                continue
            if len(memory.get(leaf_of.get((spec.module, name), -1), ())) > 1:
                continue
            first = by_memory.setdefault(t.data_ptr(), name)
            if first != name:  # tied in the model: filled with the first name's memory
                one_leaf = leaf_of.get((spec.module, name)) == leaf_of.get((spec.module, first))
                if first in done and (one_leaf or module.get(first) is SKIP):
                    module[name] = SKIP if module.get(first) is SKIP else t
                    done.add(name)
                # else saved apart (two leaves): read fresh and copied in, as load_state_dict
                # does; two leaves are never read into one memory
                continue
            saved = metas.get((spec.module, name))
            exact = metas.get((spec.master, name)) if masters else None
            if (
                exact is not None
                and t.dtype == torch.float32
                and exact.dtype == torch.float32
                and exact.shape == tuple(t.shape)
            ):
                master[name] = t
                module[name] = SKIP
                done.add(name)
            elif saved is not None and saved.dtype == t.dtype and saved.shape == tuple(t.shape):
                module[name] = t
                done.add(name)
        if not done:
            return None, frozenset()
        return {spec.module: module, spec.master: master}, frozenset(done)

    def load_checkpoint(
        self,
        load_dir: str | os.PathLike[str],
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        custom_load_fn: Callable[..., Any] | None = None,
        *,
        require: bool = False,
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Load a checkpoint saved at any world size into the model, optimizer and scheduler.

        As DeepSpeed: the tag comes from ``latest`` when not given; ``custom_load_fn(src=
        module_state_dict, dst=model)`` replaces the module loading step; with
        ``load_module_only`` only the module is loaded (``global_steps`` is left alone).
        Frozen parameters that the save excluded may be missing even in strict mode. A
        ``ZeroAdamW`` loaded without its optimizer states refreshes its masters from the loaded
        weights.

        The values are read where they live (``docs/training.md``, "Resume in place"): into the
        model's parameters and buffers, into the optimizer's own state tensors (created first
        for a fresh optimizer, with the dtype and device ``load_state_dict`` gives them; no
        training step), into a ``ZeroAdamW``'s partitions. The optimizer then goes through its
        ``load_state_dict`` as always and ends exactly as a plain load would leave it.

        Returns:
            ``(load_path, client_state)``; ``(None, None)`` when there was nothing to load (no
            ``latest`` and no tag): logged for an empty directory (a fresh run), a
            ``UserWarning`` with the reason for a path that does not exist or holds no
            checkpoint (see :func:`zckpt.load_checkpoint`).

        Raises:
            CheckpointNotFoundError: the tag (or the one ``latest`` names) is not committed;
                ``load_dir`` is a DeepSpeed checkpoint (convert it first); with
                ``require=True``, whenever nothing was loaded, with the reason.
            LoadError: strict module keys or the optimizer's param groups do not match, or an
                optimizer state tensor's shape is not the saved one (named by its path; checked
                before anything is read).

        Example:
            >>> import tempfile
            >>> Checkpointer(torch.nn.Linear(2, 2)).load_checkpoint(tempfile.mkdtemp())
            (None, None)
        """
        storage, where = storage_for(load_dir, self.storage, None)
        if self.comm.size > 1 and tag is None:
            # Every rank loads the tag ``latest`` named when rank 0 read it: ranks reading it
            # themselves could each see another one while another job saves to the directory.
            tag = self.comm.all_gather(
                _latest_tag(storage, where) if self.comm.rank == 0 else None
            )[0]

        def attempt() -> _Loaded:
            once = functools.partial(
                self._load_once,
                load_dir,
                tag,
                load_module_strict,
                load_optimizer_states,
                load_lr_scheduler_states,
                load_module_only,
                custom_load_fn,
                require,
            )
            try:
                return once()
            except _OverwrittenError:
                return once()  # a second overwrite meanwhile is the LoadError itself

        # A tag deleted by retention meanwhile: once more from the new ``latest``.
        if self.comm.size == 1:
            return following_latest(storage, where, tag, attempt)[:2]
        return self._agreed(lambda: following_latest(storage, where, tag, attempt))

    def _agreed(self, load: Callable[[], _Loaded]) -> tuple[str | None, dict[str, Any] | None]:
        """Run a load on every rank, then check that every rank loaded the same checkpoint (tag
        directory and generation): a rank that failed, or ranks that read different ones (the
        directory changed under the load), make every rank raise, so that no rank trains on
        from a step the others are not at, and none waits for a rank that gave up."""
        error: BaseException | None = None
        got: _Loaded = (None, None, None)
        try:
            got = load()
            seen: Any = [got[0], got[2]]
        except Exception as e:  # every rank must learn it; raised below
            error, seen = e, {"error": f"{type(e).__name__}: {e}"}
        views = self.comm.all_gather(seen)
        if error is not None:
            raise error
        failed = {r: v["error"] for r, v in enumerate(views) if isinstance(v, dict)}
        if failed:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items())[:4])
            raise LoadError(f"the load failed on other ranks, so this rank's is void: {detail}")
        if len({tuple(v) for v in views}) > 1:
            shown = "; ".join(f"rank {r}: {v[0]} (generation {v[1]})" for r, v in enumerate(views))
            raise LoadError(
                f"the ranks loaded different checkpoints ({shown[:600]}): the directory changed "
                "while they read it (another job saving or pruning there?); load again"
            )
        return got[0], got[1]

    def _pinned(self, load_dir: str | os.PathLike[str], tag: str | None) -> Checkpoint | None:
        """The one checkpoint this load reads (``latest`` resolved once), or None when there is
        none or it cannot be opened (``load_checkpoint`` then says why, in its own words)."""
        try:
            return open_checkpoint(load_dir, tag, storage=self.storage)
        except (ZckptError, OSError):
            return None

    def _load_once(
        self,
        load_dir: str | os.PathLike[str],
        tag: str | None,
        load_module_strict: bool,
        load_optimizer_states: bool,
        load_lr_scheduler_states: bool,
        load_module_only: bool,
        custom_load_fn: Callable[..., Any] | None,
        require: bool,
    ) -> _Loaded:
        """:meth:`load_checkpoint` from one checkpoint: ``latest`` is resolved once, and the
        destinations, the load and the partitions all come from that tag and generation."""
        opt = self.optimizer
        zero = isinstance(opt, ZeroAdamW)
        want_optimizer = load_optimizer_states and not load_module_only
        # fp32 parameters take the fp32 masters with a ZeroAdamW too: its partitions come
        # from the masters, and its parameters must agree with them (not be the 16-bit copy)
        want_masters = custom_load_fn is None
        pinned = self._pinned(load_dir, tag)
        into, in_place, opt_into = self._in_place(
            pinned,
            want_masters,
            module=custom_load_fn is None,
            optimizer=want_optimizer and opt is not None and not zero,
        )
        loaded = load_checkpoint(
            load_dir if pinned is None else pinned.path,
            tag=tag if pinned is None else None,
            load_optimizer_states=want_optimizer and not zero,
            load_lr_scheduler_states=load_lr_scheduler_states,
            load_module_only=load_module_only,
            load_masters=want_masters,
            into=into,
            storage=self.storage,
        )
        if loaded.load_path is not None:
            self._known_dirs.add(_where(os.path.dirname(loaded.load_path)))
            self._known_dirs.add(_where(os.fspath(load_dir)))
        if loaded.load_path is None:
            if require:
                reason = explain(load_dir, tag, storage=self.storage)
                raise CheckpointNotFoundError(
                    errno.ENOENT, f"require=True and nothing to load: {reason.message}"
                )
            return None, None, None
        ck = open_checkpoint(loaded.load_path, storage=self.storage)
        if pinned is not None and ck.manifest.generation != pinned.manifest.generation:
            # Generations are never reused: the same one before and after means the load read it.
            raise _OverwrittenError(
                f"{loaded.load_path}: tag {ck.tag!r} was overwritten while it was being loaded "
                f"(generation {pinned.manifest.generation} -> {ck.manifest.generation}), twice "
                "in a row: the model and optimizer may hold values of either; load again"
            )
        allow_missing: tuple[str, ...] = ()
        if ck.manifest.excluded_frozen:
            # The names recorded at save, and the model's own frozen parameters: a checkpoint
            # converted from DeepSpeed with exclude_frozen_parameters records no names.
            mine = tuple(n for n, p in self.module.named_parameters() if not p.requires_grad)
            allow_missing = (*ck.manifest.frozen, *mine)
        state = loaded.state if isinstance(loaded.state, dict) else {}
        module = state.pop(MODULE, None)
        masters = state.pop(MASTER, None) if not want_optimizer else state.get(MASTER)
        if module is not None:
            if custom_load_fn is not None:
                custom_load_fn(src=module, dst=self.module)
            else:
                # Values read in place are where they belong; the rest is copied in (cast).
                rest = {k: v for k, v in module.items() if k not in in_place}
                rest = prefer_masters(self.module, rest, masters)
                load_module_state(
                    self.module,
                    rest,
                    strict=load_module_strict,
                    allow_missing=(*allow_missing, *in_place),
                )
        if load_module_only:
            state = {}
        if not load_lr_scheduler_states:
            state.pop(LR_SCHEDULER, None)
        if opt_into is not None and isinstance(state.get(OPTIMIZER), dict):
            opt_into.place(state[OPTIMIZER])  # the optimizer's tensors, filled where they are
        if isinstance(opt, ZeroAdamW):
            if want_optimizer:
                load_partitions(opt, ck)
            elif module is not None:
                opt.refresh_master_from_params()
            restore_training_state(state, None, None, self.lr_scheduler)
        else:
            restore_training_state(
                state, self.module, opt if want_optimizer else None, self.lr_scheduler
            )
        steps = state.get(GLOBAL_STEPS)
        if isinstance(steps, int) and not isinstance(steps, bool):
            self.global_steps = steps
        return loaded.load_path, loaded.client_state, ck.manifest.generation
