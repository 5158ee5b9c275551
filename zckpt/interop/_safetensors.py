"""Export a state dict as safetensors: one file, or Hugging Face style shards with an index.

Sharded exports look like ``save_pretrained``'s (``transformers``, which shards with
``huggingface_hub.split_torch_state_dict_into_shards``):

- tensors are taken in the state dict's order (pass ``key_order``, e.g.
  :func:`module_key_order`, to use the module's order when the state dict is in another one:
  DeepSpeed's ``zero_to_fp32`` order puts buffers first and parameters by param group);
- packing (:func:`plan_safetensors_shards`): each tensor goes into the open shard unless that
  would take it past ``max_shard_size``, which closes the shard and opens a new one; a tensor
  larger than ``max_shard_size`` gets a shard of its own, numbered when it is met, and the open
  shard stays open for the tensors after it;
- files ``model-00001-of-0000N.safetensors``, or ``model.safetensors`` alone (no index) when
  everything fits in one shard; ``model.safetensors.index.json`` written as ``transformers``
  writes it (``json.dumps(index, indent=2, sort_keys=True)`` and a newline, so ``weight_map`` is
  sorted by name), with ``metadata.total_size`` (bytes of the stored tensors) and
  ``metadata.total_parameters`` (their elements).

Values may be tensors or :class:`zckpt.LazyTensor` (``lazy_mode=True`` output); lazy values
are materialised one at a time, each written before the next is read, so peak memory is about
one tensor, not the whole model. Each file is written by zckpt: the header
``safetensors.torch.save_file`` would write (:func:`safetensors_header`, the same bytes), then
each tensor's bytes in turn (``zckpt/interop/_stream.py``): a DeepSpeed fp32 weight straight
from the checkpoint's files (``copy_file_range``), anything else one tensor at a time.

The output is written whole or not at all (``zckpt/interop/_output.py``): the one file, or the
whole shard directory, is built under a dot-prefixed temporary name beside it, fsynced and
renamed (a directory swapped) into place, so a reader or a crash sees the old export or the new
one, never a mix, and no shard or index of an earlier export survives a re-export. An existing
output is refused unless ``overwrite=True``. Files get ``0o666 & ~umask`` and directories
``0o777 & ~umask``.

Tied weights (names whose values are the same object, or tensors over the same memory view) are
written once, under the first name in export order (``transformers`` also keeps one name and
drops the tied ones, e.g. GPT-2's ``lm_head.weight``). How to re-tie them is recorded as
``{alias: stored_name}``:

- in every file's header metadata under the key ``"tied"``, as a JSON string (safetensors
  metadata values are strings);
- in ``model.safetensors.index.json`` under ``metadata.tied``, as a JSON object. Aliases are
  **not** in ``weight_map`` (their bytes are in no file), so a loader that walks ``weight_map``
  never looks for a tensor that is not there.

Every file's metadata also carries ``"format": "pt"``, which Hugging Face loaders check.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from zckpt.format._dtypes import ITEMSIZE_OF_NAME, cast_values, dtype_name, torch_dtype
from zckpt.interop._files import find_deepspeed, recently_opened
from zckpt.interop._output import (
    PYTHON_FLAG,
    building_dir,
    building_file,
    check_dir_output,
    check_file_output,
    finish_file,
)
from zckpt.interop._stream import write_value

if TYPE_CHECKING:
    import torch

__all__ = [
    "Exported",
    "INDEX_NAME",
    "SINGLE_NAME",
    "export_safetensors",
    "is_directory_output",
    "module_key_order",
    "parse_size",
    "plan_safetensors_shards",
    "write_safetensors",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class Exported(NamedTuple):
    """What :func:`export_safetensors` wrote: file paths (in index order), the index path or
    None, ``{alias: stored_name}``, and the bytes and elements of the stored tensors.

    Example:
        >>> Exported(("model.safetensors",), None, {}, 8, 2).total_size
        8
    """

    files: tuple[str, ...]
    index_path: str | None
    tied: dict[str, str]
    total_size: int
    total_parameters: int


def parse_size(size: int | str) -> int:
    """Bytes in a size given as an int or as ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"``.

    Decimal units (KB, MB, GB, TB) are powers of 1000, as in Hugging Face's ``max_shard_size``;
    binary units (KiB, MiB, GiB, TiB) are powers of 1024. Case is ignored.

    Raises:
        ValueError: not a positive size.

    Example:
        >>> parse_size("5GB"), parse_size("1MiB"), parse_size(123)
        (5000000000, 1048576, 123)
    """
    if isinstance(size, bool):
        raise ValueError(f"not a size: {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(f"not a size: {size!r} (use e.g. 5GB, 500MB, 2GiB or bytes)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise ValueError(f"size must be at least 1 byte, got {size!r}")
    return n


def plan_safetensors_shards(sizes: Iterable[int], max_shard_size: int) -> list[list[int]]:
    """Group tensor indices into shards by Hugging Face's rule, in the order the shards are made.

    Tensors are taken in order; each joins the open shard unless that would take the shard past
    ``max_shard_size`` bytes, which closes it and opens a new one. A tensor larger than the limit
    cannot be split: it gets a shard of its own, placed when it is met, and the open shard stays
    open for the tensors after it (as ``huggingface_hub.split_state_dict_into_shards_factory``
    does, so indices within a shard ascend but shards need not follow one another).

    Example:
        >>> plan_safetensors_shards([4, 4, 4, 10, 1], 8)
        [[0, 1], [3], [2, 4]]
    """
    shards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(sizes):
        if n > max_shard_size:
            shards.append([i])
            continue
        if current and used + n > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        shards.append(current)
    return shards


def module_key_order(checkpoint_dir: str | os.PathLike[str], tag: str | None = None) -> list[str]:
    """The module state dict's keys in the module's order, as the checkpoint records them.

    For ``key_order`` of :func:`export_safetensors`: a zckpt checkpoint's skeleton keeps the
    module state dict's insertion order (which
    :func:`zckpt.get_fp32_state_dict_from_zero_checkpoint` already follows); a DeepSpeed
    checkpoint (regular or universal) records the module's ``state_dict()`` keys in rank 0's
    model-states ``module`` entry, while its fp32 state dict follows ``zero_to_fp32`` (buffers,
    frozen parameters, then trainable ones by param group, then tied names). Tied names are
    included where the module has them. Names the record lacks (DeepSpeed keeps MoE experts in
    files of their own; stage 1 records no frozen parameters) are not listed: the export puts
    them after the listed ones, in the state dict's order. A DeepSpeed checkpoint without a
    ``module`` record gives ``[]`` (the state dict's order is kept).

    Raises:
        zckpt.CheckpointNotFoundError: neither a zckpt nor a DeepSpeed checkpoint.

    Example:
        >>> import tempfile, torch, zckpt
        >>> from zckpt.interop._synthetic import write_zero_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> w = {"a.weight": torch.randn(4), "z.weight": torch.randn(2)}
        >>> write_zero_checkpoint(d, w, world_size=2, stage=2, groups=[["z.weight"], ["a.weight"]])
        >>> list(zckpt.get_fp32_state_dict_from_zero_checkpoint(d)), module_key_order(d)
        (['z.weight', 'a.weight'], ['a.weight', 'z.weight'])
    """
    if find_deepspeed(checkpoint_dir, tag) is not None:
        # The one an export of its fp32 state dict opened, when still alive: read-only use.
        module = recently_opened(checkpoint_dir, tag).model[0].get("module")
        if not isinstance(module, Mapping):
            return []
        return [k for k in module if isinstance(k, str)]
    from zckpt.assemble import fp32_entries
    from zckpt.store import open_checkpoint

    m = open_checkpoint(checkpoint_dir, tag).manifest
    return [e.name for e in fp32_entries(m.skeleton, m.spec)]


def _in_order(state_dict: Mapping[str, Any], key_order: Iterable[str] | None) -> list[str]:
    """The state dict's names: those in ``key_order`` first, in its order, then the rest."""
    if key_order is None:
        return list(state_dict)
    first = [k for k in dict.fromkeys(key_order) if k in state_dict]
    listed = set(first)
    return first + [k for k in state_dict if k not in listed]


def _alias_key(v: Any) -> tuple[Any, ...]:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(v, torch.Tensor) and v.numel() > 0:
        return (
            v.device,
            v.untyped_storage().data_ptr(),
            v.storage_offset(),
            tuple(v.shape),
            tuple(v.stride()),
            v.dtype,
        )
    return ("id", id(v))


def _is_floating(name: str) -> bool:
    return name.startswith(("float", "bfloat"))


def _target_dtype(v: Any, dtype: torch.dtype | str | None) -> str:
    """The dtype (its name) ``v`` is written in: ``dtype`` for floating values, else its own."""
    src = dtype_name(v.dtype)
    return dtype_name(dtype) if dtype is not None and _is_floating(src) else src


def _numel(v: Any) -> int:
    n = 1
    for d in v.shape:
        n *= int(d)
    return n


def _itemsize(name: str) -> int:
    if name in ITEMSIZE_OF_NAME:
        return ITEMSIZE_OF_NAME[name]
    return int(torch_dtype(name).itemsize)


def _nbytes(v: Any, dtype: str) -> int:
    return _numel(v) * _itemsize(dtype)


def _materialise(v: Any, dtype: str, name: str = "") -> torch.Tensor:
    import torch

    t: torch.Tensor = v if isinstance(v, torch.Tensor) else v.contiguous()
    t = cast_values(t.detach().to(device="cpu"), torch_dtype(dtype), name).contiguous()
    if t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # a view into a larger buffer: safetensors refuses shared storage
    return t


#: safetensors' dtype names, in the order ``safetensors.torch.save_file`` lays tensors out (its
#: ``Dtype`` enum, largest first; by name within a dtype), so a streamed file is byte for byte
#: the file ``save_file`` writes for the same tensors and metadata.
_CODES: tuple[tuple[str, str], ...] = (
    ("U64", "uint64"),
    ("I64", "int64"),
    ("F64", "float64"),
    ("F32", "float32"),
    ("U32", "uint32"),
    ("I32", "int32"),
    ("BF16", "bfloat16"),
    ("F16", "float16"),
    ("U16", "uint16"),
    ("I16", "int16"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("I8", "int8"),
    ("U8", "uint8"),
    ("BOOL", "bool"),
)
_CODE = {dt: code for code, dt in _CODES}
_RANK = {dt: i for i, (_code, dt) in enumerate(_CODES)}


def __getattr__(name: str) -> Any:
    """``_DTYPES``: the table with torch dtypes (those this torch has), built when asked for."""
    if name == "_DTYPES":
        import torch

        return tuple(
            (code, dt)
            for code, n in _CODES
            if isinstance(dt := getattr(torch, n, None), torch.dtype)
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def safetensors_header(
    tensors: Iterable[tuple[str, torch.dtype | str, tuple[int, ...]]], metadata: Mapping[str, str]
) -> tuple[bytes, list[int]]:
    """The header ``save_file`` writes for these ``(name, dtype, shape)`` and metadata (the
    8-byte length and the JSON, space-padded to 8 bytes), and the order the tensors' bytes
    follow it in (indices into ``tensors``).

    Raises:
        ValueError: a dtype safetensors has no name for here.

    Example:
        >>> import torch
        >>> h, order = safetensors_header(
        ...     [("b", torch.float16, (2,)), ("a", "float32", ())], {"format": "pt"})
        >>> h[8:].decode().rstrip(), order
        ('{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},\
"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}}', [1, 0])
    """
    items = [(name, dtype_name(dt), shape) for name, dt, shape in tensors]
    for name, dt, _shape in items:
        if dt not in _CODE:
            raise ValueError(f"{name}: dtype torch.{dt} has no safetensors name zckpt writes")
    order = sorted(range(len(items)), key=lambda i: (_RANK[items[i][1]], items[i][0]))
    doc: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    pos = 0
    for i in order:
        name, dt, shape = items[i]
        n = ITEMSIZE_OF_NAME[dt]
        for d in shape:
            n *= int(d)
        doc[name] = {
            "dtype": _CODE[dt],
            "shape": [int(d) for d in shape],
            "data_offsets": [pos, pos + n],
        }
        pos += n
    js = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, order


def _write(
    names: list[str],
    values: list[Any],
    dtypes: list[str],
    path: str,
    meta: dict[str, str],
    on_tensor: Callable[[str, int], None] | None,
    sizes: list[int],
) -> None:
    """One safetensors file at ``path``: the header, then each tensor's bytes, one at a time
    (:func:`zckpt.interop._stream.write_value`: streamed values straight from the checkpoint's
    files, others materialised one by one); then fsynced with the mode of a new file."""
    shapes = [tuple(int(d) for d in v.shape) for v in values]
    header, order = safetensors_header(zip(names, dtypes, shapes), meta)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        written = os.write(fd, header)
        if written != len(header):
            raise OSError(errno.EIO, f"{path}: short write of the header")
        for i in order:
            n = write_value(fd, values[i], dtypes[i], partial(_materialise, name=names[i]))
            if n != sizes[i]:
                raise OSError(
                    errno.EIO, f"{path}: {names[i]}: wrote {n} bytes, expected {sizes[i]}"
                )
            if on_tensor is not None:
                on_tensor(names[i], sizes[i])
    finally:
        os.close(fd)
    finish_file(path)  # the mode of a new file; and fsync before the rename


def is_directory_output(out: str | os.PathLike[str], max_shard_size: int | str | None) -> bool:
    """Whether :func:`export_safetensors` writes ``out`` as a directory (else as one file).

    Example:
        >>> is_directory_output("m.safetensors", None), is_directory_output("m.safetensors", "5GB")
        (False, True)
    """
    return max_shard_size is not None or not os.fspath(out).endswith(".safetensors")


def export_safetensors(
    state_dict: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | str | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    overwrite: bool = False,
    key_order: Iterable[str] | None = None,
) -> Exported:
    """Write a flat state dict as safetensors, streaming one tensor (and one shard) at a time.

    Where it goes: ``out`` ending in ``.safetensors`` without ``max_shard_size`` is the one
    file. Otherwise ``out`` is a directory laid out as Hugging Face's ``save_pretrained`` lays
    it out (see the module docstring for the packing rule): ``model.safetensors`` when
    everything fits in one shard, else ``model-00001-of-0000N.safetensors`` ... plus
    ``model.safetensors.index.json`` (``{"metadata": {"tied": {...}, "total_parameters": P,
    "total_size": N}, "weight_map": {name: file}}``, keys sorted).

    The output appears whole or not at all: it is built under a dot-prefixed temporary name
    beside ``out`` (``.NAME.<id>.zckpt-tmp``), fsynced and renamed into place; a directory is
    built whole and swapped in, so an interrupted export leaves the previous one intact and a
    finished one leaves no file of the previous one (see ``zckpt/interop/_output.py`` for the
    exact steps). A failed export removes its temporary files. An existing ``out`` is refused
    unless ``overwrite=True``; a missing or empty directory is free, and a directory holding
    files an export does not write (``config.json``, ...) is refused even then, since replacing
    it whole would delete them: export first, then add them.

    Args:
        state_dict: ``{name: tensor | LazyTensor}`` (e.g. from
            :func:`zckpt.get_fp32_state_dict_from_zero_checkpoint`).
        out: the ``.safetensors`` file or the output directory.
        max_shard_size: bytes per shard, an int or ``"5GB"``/``"500MB"`` (see :func:`parse_size`).
        metadata: extra string metadata for every file's header.
        dtype: cast floating-point tensors to this dtype (others keep theirs).
        on_tensor: called with ``(name, bytes)`` after each tensor is materialised (progress).
        overwrite: replace an existing output (atomically); without it one is refused.
        key_order: the order to take tensors in (and so which of tied names is stored): names
            listed here first, in this order, then the state dict's others in its order; names
            not in the state dict are ignored. Default: the state dict's order. For a
            checkpoint's fp32 state dict, :func:`module_key_order` gives the module's order.

    Returns:
        The files written (paths), the index path or None, the tied map, the total bytes and
        elements of the stored tensors.

    Raises:
        ValueError: a non-string metadata value or key ``"tied"``/``"format"``, a bad size.
        zckpt.interop._output.OutputExistsError: ``out`` exists (pass ``overwrite=True``), or
            is a directory holding other files, or is a directory where a file is to go (or
            the reverse). Nothing is written then.

    Example:
        >>> import os, tempfile, torch
        >>> from safetensors.torch import load_file
        >>> emb = torch.randn(4, 2)
        >>> sd = {"embed.weight": emb, "head.weight": emb, "bias": torch.zeros(4)}
        >>> d = tempfile.mkdtemp()
        >>> r = export_safetensors(sd, d, max_shard_size=32)
        >>> [os.path.basename(f) for f in r.files]
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
        >>> r.tied, r.total_size, r.total_parameters
        ({'head.weight': 'embed.weight'}, 48, 12)
        >>> torch.equal(load_file(r.files[0])["embed.weight"], emb)
        True
        >>> r = export_safetensors(sd, d, max_shard_size=64, overwrite=True)  # replaced whole
        >>> sorted(os.listdir(d))
        ['model.safetensors']
    """
    return write_safetensors(
        state_dict,
        out,
        max_shard_size=max_shard_size,
        metadata=metadata,
        dtype=dtype,
        on_tensor=on_tensor,
        overwrite=overwrite,
        key_order=key_order,
    )


class _Plan(NamedTuple):
    """What to store, in export order: names, values, target dtypes, bytes; and the tied map."""

    names: list[str]
    values: list[Any]
    dtypes: list[str]
    sizes: list[int]
    tied: dict[str, str]


def _plan(
    state_dict: Mapping[str, Any], key_order: Iterable[str] | None, dtype: torch.dtype | str | None
) -> _Plan:
    names: list[str] = []
    values: list[Any] = []
    tied: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    for name in _in_order(state_dict, key_order):
        if not isinstance(name, str):
            raise ValueError(f"state dict keys must be strings, got {name!r}")
        v = state_dict[name]
        if not hasattr(v, "contiguous"):
            raise ValueError(
                f"{name}: not a tensor ({type(v).__name__}); safetensors holds tensors"
            )
        key = _alias_key(v)
        if key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        names.append(name)
        values.append(v)
    dtypes = [_target_dtype(v, dtype) for v in values]
    sizes = [_nbytes(v, dt) for v, dt in zip(values, dtypes)]
    return _Plan(names, values, dtypes, sizes, tied)


def write_safetensors(
    state_dict: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | str | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    overwrite: bool = False,
    key_order: Iterable[str] | None = None,
    flag: str = PYTHON_FLAG,
) -> Exported:
    """:func:`export_safetensors`, with ``flag`` naming how to ask for a replacement in errors
    (``"--overwrite"`` for the command line).

    Example:
        >>> import tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> _ = write_safetensors({"w": torch.ones(2)}, d + "/m.safetensors")
        >>> write_safetensors({"w": torch.ones(2)}, d + "/m.safetensors", flag="--overwrite")
        Traceback (most recent call last):
        ...
        zckpt.interop._output.OutputExistsError: ... already exists; pass --overwrite to ...
    """
    out = os.fspath(out)
    as_dir = is_directory_output(out, max_shard_size)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    if as_dir:
        check_dir_output(out, overwrite=overwrite, flag=flag)
    else:
        check_file_output(out, overwrite=overwrite, flag=flag)
    user = dict(metadata or {})
    for k, v in user.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
        if k in ("tied", "format"):
            raise ValueError(f"metadata key {k!r} is reserved for zckpt's own use")
    names, values, dtypes, sizes, tied = _plan(state_dict, key_order, dtype)
    total = sum(sizes)
    params = sum(_numel(v) for v in values)
    meta = {**user, "format": "pt"}
    if tied:
        meta["tied"] = json.dumps(tied, sort_keys=True)

    if not as_dir:
        with building_file(out, overwrite=overwrite, flag=flag) as tmp:
            _write(names, values, dtypes, tmp, meta, on_tensor, sizes)
        return Exported((out,), None, tied, total, params)

    groups = plan_safetensors_shards(sizes, total + 1 if limit is None else limit) or [[]]
    n = len(groups)
    files = (
        [SINGLE_NAME]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    weight_map: dict[str, str] = {}
    with building_dir(out, overwrite=overwrite, flag=flag) as tmp_dir:
        for group, file in zip(groups, files):
            for i in group:
                weight_map[names[i]] = file
            _write(
                [names[i] for i in group],
                [values[i] for i in group],
                [dtypes[i] for i in group],
                os.path.join(tmp_dir, file),
                meta,
                on_tensor,
                [sizes[i] for i in group],
            )
        if n > 1:
            index_meta: dict[str, Any] = {"total_parameters": params, "total_size": total}
            if tied:
                index_meta["tied"] = tied
            doc = {"metadata": index_meta, "weight_map": weight_map}
            index_tmp = os.path.join(tmp_dir, INDEX_NAME)
            with open(index_tmp, "w", encoding="utf-8") as f:
                # transformers' save_pretrained writes its index so: keys sorted at every level
                f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            finish_file(index_tmp)
    paths = tuple(os.path.join(out, f) for f in files)
    index_path = os.path.join(out, INDEX_NAME) if n > 1 else None
    return Exported(paths, index_path, tied, total, params)
