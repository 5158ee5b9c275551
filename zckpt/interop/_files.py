"""Finding and opening a DeepSpeed checkpoint directory: which file is which rank's.

File names, as DeepSpeed writes them (R: data-parallel rank, L: MoE layer, E: global expert)::

    <save_dir>/latest                                   the tag, as text
    <save_dir>/<tag>/mp_rank_00_model_states.pt         stage 1/2: module, param_shapes, ...
    <save_dir>/<tag>/zero_pp_rank_R_mp_rank_00_model_states.pt      stage 3: one per rank
    <save_dir>/<tag>/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   one per rank
    <save_dir>/<tag>/layer_L_expert_E_mp_rank_00_model_states.pt    MoE expert weights

The stage comes from what the optimizer files record (``zero_stage``), the world size from the
ranks present, checked against ``dp_world_size`` and ``partition_count``.

A universal checkpoint (``ds_to_universal``'s output, ``zckpt/interop/_universal.py``) has the
model states files and, in place of the optimizer files, ``zero/``: one folder per parameter
and ``zero/optimizer_state.pt``; its save_dir names the tag in ``latest_universal``. It opens
into the same :class:`DeepSpeedCheckpoint`, with the stage and world size of the run that saved
it (from ``optimizer_state.pt``).
"""

from __future__ import annotations

import os
import re
import threading
import weakref
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from zckpt.interop._detect import deepspeed_tags, find_deepspeed
from zckpt.interop._layout import parse_param_shapes
from zckpt.interop._universal import (
    OPTIMIZER_STATE,
    UniversalFiles,
    is_universal,
    load_universal,
    optimizer_record,
    universal_world_size,
)
from zckpt.interop._unpickle import DeepSpeedFormatError, get, load_pickle, require_regular

__all__ = [
    "DeepSpeedCheckpoint",
    "ExpertFile",
    "ModelStates",
    "deepspeed_tags",
    "find_deepspeed",
    "get",
    "open_deepspeed",
    "recently_opened",
]

_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_EXPERT = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


@dataclass(frozen=True)
class ExpertFile:
    """One MoE expert's weights file: ``{param name (global expert index): tensor}``.

    Example:
        >>> ExpertFile(0, 1, "layer_0_expert_1_mp_rank_00_model_states.pt", {}).expert
        1
    """

    layer: int
    expert: int
    path: str
    state: Mapping[str, Any]


class ModelStates(Sequence[Mapping[str, Any]]):
    """Each rank's model-states file, unpickled when first used and then kept.

    Stage 3 writes one per rank, but everything zckpt reads from them is in rank 0's (parameter
    shapes, buffers, client state) except frozen parameters' fragments; the others cost as much
    to unpickle as rank 0's (torch's safe unpickler is pure Python), so a 64-rank checkpoint
    without frozen parameters unpickles one of them, not 64. Files never unpickled are still
    checked to be complete zip archives, so a damaged one is reported.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.randn(5)}, world_size=2, stage=3)
        >>> ck = open_deepspeed(d)
        >>> len(ck.model), ck.model.loaded(), ck.model[1]["dp_world_size"], ck.model.loaded()
        (2, (0,), 2, (0, 1))
    """

    def __init__(self, files: tuple[str, ...], world_size: int, refs: bool = False) -> None:
        self._files, self._ws, self._refs = files, world_size, refs
        self._loaded: dict[int, Mapping[str, Any]] = {}
        self._lock = threading.Lock()
        for f in files[1:]:
            _check_zip(f)

    def __len__(self) -> int:
        return len(self._files)

    @overload
    def __getitem__(self, r: int) -> Mapping[str, Any]: ...
    @overload
    def __getitem__(self, r: slice) -> Sequence[Mapping[str, Any]]: ...
    def __getitem__(self, r: int | slice) -> Mapping[str, Any] | Sequence[Mapping[str, Any]]:
        if isinstance(r, slice):
            return [self[i] for i in range(len(self))[r]]
        f = self._files[r]
        with self._lock:
            if r not in self._loaded:
                state = get({"f": _load(f, self._refs)}, "f", f, Mapping)
                dp = state.get("dp_world_size", self._ws)
                if dp != self._ws:
                    raise DeepSpeedFormatError(
                        f"{f}: dp_world_size {dp}, but {self._ws} optimizer files"
                    )
                self._loaded[r] = state
            return self._loaded[r]

    def loaded(self) -> tuple[int, ...]:
        """The ranks whose file was unpickled so far."""
        return tuple(sorted(self._loaded))


def _load(path: str, refs: bool) -> Any:
    """:func:`load_pickle`, as references with ``refs`` (looked up when called: tests patch it)."""
    return load_pickle(path, refs=True) if refs else load_pickle(path)


def _check_zip(path: str) -> None:
    """A ``torch.save`` zip file whose central directory and entries are all present."""
    require_regular(path)
    try:
        with zipfile.ZipFile(path) as z:
            size = os.path.getsize(path)
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    raise zipfile.BadZipFile(f"entry {info.filename} lies past the end")
    except (OSError, zipfile.BadZipFile) as e:
        raise DeepSpeedFormatError(
            f"{path}: not a readable torch.save file (its zip directory is missing or damaged: "
            f"cut short or overwritten? {type(e).__name__}: {e})"
        ) from None


@dataclass(frozen=True, eq=False)
class DeepSpeedCheckpoint:
    """A DeepSpeed checkpoint, opened: every rank's loaded (memory-mapped) files.

    ``model[r]`` is rank ``r``'s model states (stage 3; stage 1/2 has one, rank 0's);
    ``optim[r]`` is the ``optimizer_state_dict`` of rank ``r``'s optimizer file. A universal
    checkpoint has ``universal`` (its per-parameter tensors) and one ``optim`` entry in the same
    form, built from ``zero/optimizer_state.pt``
    (:func:`zckpt.interop._universal.optimizer_record`).

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.randn(5)}, world_size=2, stage=3)
        >>> ck = open_deepspeed(d)
        >>> ck.tag, ck.stage, ck.world_size, len(ck.model)
        ('step1', 3, 2, 2)
    """

    path: str
    tag: str
    stage: int
    world_size: int
    model_files: tuple[str, ...]
    model: Sequence[Mapping[str, Any]]
    optim_files: tuple[str, ...]
    optim: tuple[Mapping[str, Any], ...]
    experts: tuple[ExpertFile, ...]
    universal: UniversalFiles | None = None
    #: Opened as references (``open_deepspeed(refs=True)``): tensors may be ``TensorRef``.
    refs: bool = False
    _torch: list[Any] = field(default_factory=list, repr=False, compare=False)

    def as_torch(self, t: Any) -> Any:
        """A tensor of this checkpoint as a torch tensor: a ``TensorRef`` (``refs=True``) is
        built from its file by one :class:`~zckpt.interop._refs.TorchBuilder` per checkpoint
        (one mapping per file, storages shared as a whole load shares them); a torch tensor is
        returned as it is. Imports torch."""
        if not self._torch:
            from zckpt.interop._refs import TorchBuilder

            self._torch.append(TorchBuilder())
        return self._torch[0].tensor(t)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file of the checkpoint that zckpt reads."""
        extra = self.universal.files if self.universal is not None else ()
        return (*self.model_files, *self.optim_files, *(e.path for e in self.experts), *extra)


def _by_rank(found: dict[int, str], what: str, d: str) -> list[str]:
    if sorted(found) != list(range(len(found))):
        raise DeepSpeedFormatError(
            f"{d}: {what} files for ranks {sorted(found)}; expected ranks 0..{len(found) - 1}"
        )
    return [found[r] for r in range(len(found))]


def _scan(d: str) -> tuple[list[str], dict[int, str], list[str], list[tuple[int, int, str]]]:
    try:
        names = sorted(os.listdir(d))
    except OSError as e:
        raise DeepSpeedFormatError(f"{d}: cannot list the directory ({e})") from None
    optim: dict[int, str] = {}
    model3: dict[int, str] = {}
    model: list[str] = []
    experts: list[tuple[int, int, str]] = []
    prefixes: set[str] = set()
    for n in names:
        full = os.path.join(d, n)
        for rx in (_OPTIM, _MODEL3, _MODEL, _EXPERT):
            m = rx.match(n)
            if m is None:
                continue
            if int(m.groups()[-1]) != 0:
                raise DeepSpeedFormatError(
                    f"{full}: model (tensor) parallel rank {int(m.groups()[-1])}; only "
                    "mp_rank_00 (no tensor parallelism) is supported"
                )
            if rx is _OPTIM:
                prefixes.add(m.group(1) or "")
                if int(m.group(2)) in optim:
                    raise DeepSpeedFormatError(f"{d}: two optimizer files for rank {m.group(2)}")
                optim[int(m.group(2))] = full
            elif rx is _MODEL3:
                model3[int(m.group(1))] = full
            elif rx is _MODEL:
                model.append(full)
            else:
                experts.append((int(m.group(1)), int(m.group(2)), full))
            break
    if len(prefixes) > 1:
        raise DeepSpeedFormatError(f"{d}: both bf16_ and plain optimizer files; which is current?")
    return _by_rank(optim, "optimizer", d), model3, model, experts


def open_deepspeed(
    path: str | os.PathLike[str], tag: str | None = None, refs: bool = False
) -> DeepSpeedCheckpoint:
    """Open a DeepSpeed checkpoint: a save_dir (tag from ``tag`` or ``latest``) or a tag dir.

    Every file is loaded through :func:`zckpt.interop.load_pickle` (allow-list, memory-mapped);
    with ``refs``, as references where the fast path takes it (no torch; a universal checkpoint
    is read with torch all the same), see :meth:`DeepSpeedCheckpoint.as_torch`.

    Raises:
        DeepSpeedFormatError: not a DeepSpeed ZeRO checkpoint, or its files disagree (the
            message names the file).
        UnsafePickleError: a file references a type outside the allow-list.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.randn(5)}, world_size=3, stage=2)
        >>> open_deepspeed(d).world_size
        3
    """
    from zckpt.interop._staged import local_only

    found = find_deepspeed(local_only(path, "open_deepspeed"), tag)
    if found is None:
        raise DeepSpeedFormatError(f"{os.fspath(path)}: not a DeepSpeed checkpoint directory")
    d, tag = found
    ck = _open(d, tag, refs)
    if ck.universal is None:
        with _LOCK:
            _opened[(os.path.realpath(d), _fingerprint(d), ck.refs)] = ck
    return ck


# Checkpoints opened and still alive in this process (the fp32 state dict's lazy values keep
# theirs), by directory and its files' identities: see recently_opened.
_opened: weakref.WeakValueDictionary[tuple[str, Any, bool], DeepSpeedCheckpoint] = (
    weakref.WeakValueDictionary()
)
_LOCK = threading.Lock()


def _fingerprint(d: str) -> tuple[tuple[str, int, int, int, int], ...] | None:
    try:
        with os.scandir(d) as it:
            entries = [(e.name, e.stat(follow_symlinks=True)) for e in it]
    except OSError:
        return None
    return tuple(sorted((n, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for n, st in entries))


def recently_opened(path: str | os.PathLike[str], tag: str | None = None) -> DeepSpeedCheckpoint:
    """:func:`open_deepspeed`, or the checkpoint it opened earlier in this process for the same
    directory if that is still alive (e.g. held by a lazy fp32 state dict) and none of the
    directory's entries changed since (same names, devices, inodes, sizes, mtimes). For
    read-only uses (``module_key_order`` reading the module's keys while an export runs): the
    result may be shared with other callers, so it must not be modified.

    Example:
        >>> import tempfile, torch
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> write_zero_checkpoint(d, {"w": torch.randn(5)}, world_size=2, stage=2)
        >>> ck = open_deepspeed(d)
        >>> recently_opened(d) is ck
        True
    """
    found = find_deepspeed(path, tag)
    if found is not None:
        key = (os.path.realpath(found[0]), _fingerprint(found[0]))
        for refs in (False, True):
            with _LOCK:
                ck = _opened.get((*key, refs))
            if ck is not None and ck.tag == found[1]:
                return ck
    return open_deepspeed(path, tag)


def _open(d: str, tag: str, refs: bool = False) -> DeepSpeedCheckpoint:
    optim_files, model3, model, experts = _scan(d)
    if not optim_files and is_universal(d):
        return _open_universal(d, tag, model3, model, experts)
    if not optim_files:
        raise DeepSpeedFormatError(
            f"{d}: no '*zero_pp_rank_*_optim_states.pt' files and no {OPTIMIZER_STATE} (a "
            "universal checkpoint's): not a ZeRO checkpoint (stage 0 checkpoints hold the whole "
            "module in mp_rank_00_model_states.pt)"
        )
    ws = len(optim_files)
    optim = tuple(get(_load(f, refs), "optimizer_state_dict", f, Mapping) for f in optim_files)
    stages = {int(get(o, "zero_stage", f, int)) for o, f in zip(optim, optim_files)}
    if len(stages) != 1 or not stages <= {1, 2, 3}:
        raise DeepSpeedFormatError(f"{d}: zero_stage {sorted(stages)} across the optimizer files")
    (stage,) = stages
    model_files = _model_files(d, stage, ws, model3, model)
    states = ModelStates(tuple(model_files), ws, refs)
    states[0]  # rank 0's is always needed: load and check it now
    loaded = tuple(
        ExpertFile(layer, e, f, get({"f": _load(f, refs)}, "f", f, Mapping))
        for layer, e, f in sorted(experts)
    )
    return DeepSpeedCheckpoint(
        d,
        tag,
        stage,
        ws,
        tuple(model_files),
        states,
        tuple(optim_files),
        optim,
        loaded,
        None,
        refs,
    )


def _model_files(
    d: str, stage: int, ws: int, model3: dict[int, str], model: list[str]
) -> list[str]:
    if stage == 3:
        model_files = _by_rank(model3, "stage 3 model states", d)
    elif len(model) == 1:
        model_files = model
    else:
        raise DeepSpeedFormatError(
            f"{d}: expected one mp_rank_00_model_states.pt for stage {stage}"
        )
    if len(model_files) not in (1, ws):
        raise DeepSpeedFormatError(f"{d}: {len(model_files)} model states files for {ws} ranks")
    return model_files


def _open_universal(
    d: str,
    tag: str,
    model3: dict[int, str],
    model: list[str],
    experts: list[tuple[int, int, str]],
) -> DeepSpeedCheckpoint:
    """A universal tag directory (see ``_universal.py``) as a :class:`DeepSpeedCheckpoint`."""
    f = os.path.join(d, OPTIMIZER_STATE)
    saved = get({"f": load_pickle(f)}, "f", f, Mapping)
    stage = int(get(saved, "zero_stage", f, int))
    if stage not in (1, 2, 3):
        raise DeepSpeedFormatError(f"{f}: zero_stage {stage}; a universal checkpoint is 1, 2 or 3")
    if experts:
        raise DeepSpeedFormatError(
            f"{experts[0][2]}: an MoE expert file in a universal checkpoint; not supported"
        )
    ws = universal_world_size(saved, stage, f)
    model_files = _model_files(d, stage, ws, model3, model)
    states = ModelStates(tuple(model_files), ws)
    shapes = parse_param_shapes(get(states[0], "param_shapes", model_files[0]), model_files[0])
    files = load_universal(os.path.join(d, "zero"), shapes, stage)
    record = optimizer_record(saved, files, stage, f)
    return DeepSpeedCheckpoint(
        d, tag, stage, ws, tuple(model_files), states, (f,), (record,), (), files
    )
