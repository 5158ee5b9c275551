"""``zckpt consolidate``: the fp32 state dict as safetensors (a file or shards) or torch.save.

A DeepSpeed checkpoint exported as safetensors is read as references
(``zckpt/interop/_deepspeed.py: export_values``): every value stored in the output dtype is
copied from the checkpoint's files as byte ranges, and torch is imported only when some value
must be computed (a 16-bit tensor upcast, ``--dtype`` other than fp32, a tensor that is no
byte range, a file the fast unpickler leaves to torch's). Everything else (a zckpt checkpoint,
a ``.pt``/``.bin`` output) goes through torch (``zckpt/cli/_convert.py: consolidate_loaded``).
"""

from __future__ import annotations

import argparse
import difflib
import gc
import os
import sys
from collections.abc import Mapping
from typing import Any

from zckpt.cli._main import CommandLineError, progress
from zckpt.errors import ZckptError
from zckpt.interop._output import check_dir_output, check_disjoint, check_file_output

__all__ = ["DTYPE_NAMES", "consolidate", "end_process", "export_to", "output_kind"]

#: ``--dtype`` -> the torch dtype's name.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FLAG = "--overwrite"

_SUFFIXES = {".safetensors": "one safetensors file", ".pt": "torch.save", ".bin": "torch.save"}


def output_kind(out: str, max_shard_size: str | None = None) -> str:
    """What ``zckpt consolidate`` writes at OUT: ``"torch"`` (a ``torch.save`` file, OUT ending
    in ``.pt`` or ``.bin``), ``"file"`` (one ``.safetensors`` file) or ``"dir"`` (a directory
    of Hugging Face style shards).

    A directory is said by a path ending in ``/``, an existing directory, a last component
    without a suffix (``hf``), or ``--max-shard-size``. Any other suffix is refused, so a typo
    (``model.safetensor``) does not become a directory.

    Raises:
        CommandLineError: OUT has a suffix that is none of these.

    Example:
        >>> [output_kind(o) for o in ("m.safetensors", "m.pt", "hf", "hf.v2/")]
        ['file', 'torch', 'dir', 'dir']
        >>> output_kind("m.safetensor")
        Traceback (most recent call last):
        ...
        zckpt.cli._main.CommandLineError: OUT m.safetensor has the unknown suffix '.safetensor' \
(did you mean m.safetensors?); ...
    """
    if out.endswith((".pt", ".bin")):
        return "torch"
    if out.endswith(("/", os.sep)) or max_shard_size is not None:
        return "dir"
    if out.endswith(".safetensors"):
        return "file"
    suffix = os.path.splitext(os.path.basename(out))[1]
    if not suffix or os.path.isdir(out):
        return "dir"
    close = difflib.get_close_matches(suffix, list(_SUFFIXES), n=1, cutoff=0.75)
    hint = f" (did you mean {out[: -len(suffix)]}{close[0]}?)" if close else ""
    raise CommandLineError(
        f"OUT {out} has the unknown suffix {suffix!r}{hint}; OUT must end in .safetensors "
        "(one file), .pt or .bin (torch.save), or name a directory for shards: end it with "
        "'/' (or pass --max-shard-size)"
    )


def _check(args: argparse.Namespace) -> str:
    """Check the arguments and OUT before anything is read; the output kind."""
    from zckpt.interop._safetensors import is_directory_output, parse_size
    from zckpt.store._resolve import is_url

    out: str = args.out
    if is_url(out):
        # The export is written as local files (fsync, then an atomic rename into place): a
        # URL taken as a path would become a local directory named after its scheme.
        raise CommandLineError(
            f"OUT {out} is a URL: zckpt consolidate writes its output to a local path "
            "(safetensors files are fsynced and renamed into place, which an object store "
            "cannot do); write it locally and upload the files, or use zckpt convert to write "
            "a zckpt checkpoint into the store"
        )
    kind = output_kind(out, args.max_shard_size)
    if args.max_shard_size is not None:
        if kind == "torch":
            raise CommandLineError(
                f"--max-shard-size applies to safetensors output, not .pt/.bin (OUT is {out})"
            )
        try:
            parse_size(args.max_shard_size)
        except ValueError as e:
            raise CommandLineError(f"--max-shard-size: {e}") from None
    check_disjoint(args.path, out, allow_inside=True)
    _check_not_an_input(args.path, args.tag, out)
    if kind != "dir" or not is_directory_output(out, args.max_shard_size):
        check_file_output(out, overwrite=args.overwrite, flag=FLAG)
    else:
        check_dir_output(out, overwrite=args.overwrite, flag=FLAG)
    return kind


def before_staging(args: argparse.Namespace, kind: str, root: str) -> None:
    """``consolidate``'s checks of its arguments and OUT, made before a foreign checkpoint at
    a URL is copied here (``cli/_main.py: _staged_input``), and again on the copy.

    Example:
        >>> import argparse
        >>> a = argparse.Namespace(out="s3://b/out", max_shard_size=None, path="s3://b/ds")
        >>> before_staging(a, "deepspeed", "s3://b/ds/step3")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        zckpt.cli._main.CommandLineError: OUT s3://b/out is a URL: ...
    """
    _check(args)


def _check_not_an_input(path: str, tag: str | None, out: str) -> None:
    """Refuse an OUT inside the input that is one of the DeepSpeed checkpoint's own files (an
    entry of its tag directory, or the save_dir's ``latest``): ``--overwrite`` would replace
    the checkpoint being read with its export. A new name there is free (as ``zero_to_fp32``
    writes one).

    Raises:
        OutputPathError: naming OUT and the checkpoint.

    Example:
        >>> _check_not_an_input("/nonexistent", None, "/nonexistent/model.safetensors")
    """
    from zckpt.interop._detect import find_dcp, find_deepspeed
    from zckpt.interop._output import OutputPathError
    from zckpt.store._layout import LATEST, LATEST_UNIVERSAL

    if not os.path.lexists(out):
        return
    dcp = find_dcp(path)
    norm = os.path.normpath(out)  # "ck/__0_0.distcp/" names the file too
    if dcp is not None and os.path.realpath(os.path.dirname(norm)) == os.path.realpath(dcp):
        name = os.path.basename(norm)
        if name.startswith(".") or name.endswith(".distcp"):  # .metadata, its files
            raise OutputPathError(
                f"the output {out} is a file of the DCP checkpoint {dcp} being read: writing "
                "it would replace the checkpoint with its export; choose a new name"
            )
        return
    found = find_deepspeed(path, tag)
    if found is None:
        return
    o, d = os.path.realpath(out), os.path.realpath(found[0])
    pointers = {os.path.realpath(os.path.join(path, n)) for n in (LATEST, LATEST_UNIVERSAL)}
    if os.path.commonpath([o, d]) == d or o in pointers:
        what = "the checkpoint" if o == d else "a file of the checkpoint"
        raise OutputPathError(
            f"the output {out} is {what} {found[0]} being read: writing it would replace the "
            "checkpoint with its export; choose a new name"
        )


def consolidate(args: argparse.Namespace) -> int:
    """``zckpt consolidate PATH OUT``: the fp32 state dict as safetensors or a torch.save file.

    OUT is checked before the checkpoint is read: its suffix must say what to write
    (:func:`output_kind`), it may not be PATH or contain it, and an existing OUT needs
    ``--overwrite`` (then it is replaced atomically). See the module docstring for when torch
    is imported.

    Example:
        >>> from zckpt.cli import main
        >>> main(["consolidate", "/nonexistent", "out.safetensors", "--quiet"])
        1
    """
    from zckpt.interop._detect import find_dcp, find_deepspeed

    kind = _check(args)
    if find_dcp(args.path) is not None:
        from zckpt.cli._dcp import consolidate_dcp

        gc.freeze()
        return consolidate_dcp(args, kind)
    # What is in memory now (the imports, ~10^6 objects with torch) outlives the command: no
    # cyclic collection, during the export or at exit, need traverse it again (~0.3-0.5 s).
    gc.freeze()
    if kind == "torch" or find_deepspeed(args.path, args.tag) is None:
        from zckpt.cli._convert import consolidate_loaded

        return consolidate_loaded(args, kind)
    from zckpt.interop._deepspeed import export_values
    from zckpt.interop._safetensors import module_key_order

    sd = export_values(args.path, args.tag, args.exclude_frozen, check_records=True)
    try:
        order: list[str] | None = module_key_order(args.path, args.tag)
    except (ZckptError, OSError):
        order = None  # the state dict's order
    return export_to(sd, args, kind, order)


def _export_bytes(sd: Mapping[str, Any], dtype: str | None) -> int:
    """Bytes a safetensors export of ``sd`` writes: tied values once, floating ones in
    ``dtype`` (what ``on_tensor`` reports, so the bar ends at 100%)."""
    from zckpt.interop._safetensors import _nbytes, _target_dtype

    seen: dict[int, int] = {}
    for v in sd.values():
        if id(v) not in seen:
            seen[id(v)] = _nbytes(v, _target_dtype(v, dtype))
    return sum(seen.values())


def export_to(
    sd: Mapping[str, Any], args: argparse.Namespace, kind: str, key_order: list[str] | None
) -> int:
    """Write ``sd`` as the safetensors output ``args`` asks for, report it, end the command.

    Example:
        >>> import argparse, tempfile
        >>> d = tempfile.mkdtemp()
        >>> a = argparse.Namespace(out=d + "/m.safetensors", dtype="fp32", quiet=True,
        ...                        max_shard_size=None, overwrite=False)
        >>> from zckpt.interop._stream import FileRanges
        >>> with open(d + "/w", "wb") as f:
        ...     f.write(bytes(8))
        8
        >>> export_to({"w": FileRanges((2,), "float32", ((d + "/w", 0, 8),), list)}, a,
        ...           "file", None)
        wrote .../m.safetensors: 1 file(s), 8 bytes, 1 tensors
        0
    """
    from zckpt.interop._safetensors import write_safetensors

    out: str = args.out
    dtype = None if args.dtype == "fp32" else DTYPE_NAMES[args.dtype]
    with progress(args, _export_bytes(sd, dtype), "export") as bar:
        r = write_safetensors(
            sd,
            out,
            max_shard_size=args.max_shard_size,
            dtype=dtype,
            on_tensor=lambda _name, n: bar.update(n),
            overwrite=args.overwrite,
            key_order=key_order,
            flag=FLAG,
        )
    where = r.index_path or (r.files[0] if len(r.files) == 1 else out)
    print(f"wrote {where}: {len(r.files)} file(s), {r.total_size} bytes, {len(sd)} tensors")
    for alias, name in sorted(r.tied.items()):
        print(f"tied: {alias} -> {name} (stored once)")
    end_process(args)
    return 0


def end_process(args: argparse.Namespace) -> None:
    """As the ``zckpt`` command (not ``main(argv)`` in a caller's process), end the process now:
    the output is durable (fsynced and renamed into place), and tearing down torch's modules
    and the checkpoint's mappings at interpreter exit costs 0.3 s and does nothing for it.
    stdout and stderr are flushed first; a failed flush (a closed pipe) leaves the normal exit
    path to report it.

    Example:
        >>> end_process(argparse.Namespace(as_command=False))  # main(argv): returns
    """
    if not getattr(args, "as_command", False):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(0)
