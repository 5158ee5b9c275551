"""Argument parsing, error reporting and progress bars for the ``zckpt`` command."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

import zckpt
from zckpt.errors import ZckptError
from zckpt.store._resolve import storage_options_scope

__all__ = ["CommandLineError", "Progress", "main", "progress"]

Command = Callable[[argparse.Namespace], int]


class CommandLineError(ZckptError, ValueError):
    """A command-line argument has a value the command cannot use; nothing was written.

    Example:
        >>> str(CommandLineError("--world-size must be at least 1, got 0"))
        '--world-size must be at least 1, got 0'
    """


class Progress:
    """A tqdm bar on stderr when it is a terminal and not ``--quiet``; otherwise nothing.

    Example:
        >>> with Progress(3, "read", quiet=True) as bar:
        ...     bar.update(1)
    """

    def __init__(self, total: int | None, desc: str, *, quiet: bool, unit: str = "B") -> None:
        self._bar: Any = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            # Some pseudo-terminals report width 0, where tqdm would draw nothing: fall back to 80.
            width = shutil.get_terminal_size((80, 24)).columns or 80
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                unit_scale=unit == "B",
                file=sys.stderr,
                ncols=width,
            )

    def update(self, n: int) -> None:
        """Advance by ``n``."""
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(args: argparse.Namespace, total: int | None, desc: str, unit: str = "B") -> Progress:
    """A :class:`Progress` honouring ``args.quiet``.

    Example:
        >>> import argparse
        >>> progress(argparse.Namespace(quiet=True), 1, "x").update(1)
    """
    return Progress(total, desc, quiet=bool(getattr(args, "quiet", False)), unit=unit)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="an fsspec option for s3://... and other URLs (repeatable), e.g. "
        "endpoint_url=http://127.0.0.1:9000; VALUE is read as JSON when it parses "
        "(true, 3), else as text. Credentials also come from AWS_* variables",
    )
    return p


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--storage-option KEY=VALUE`` pairs as fsspec options (None when none given).

    Example:
        >>> import argparse
        >>> storage_options(argparse.Namespace(storage_option=["anon=true", "region=eu"]))
        {'anon': True, 'region': 'eu'}
    """
    pairs = getattr(args, "storage_option", None)
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandLineError(f"--storage-option takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    from zckpt.cli import _convert, _inspect

    common = _common()
    parser = argparse.ArgumentParser(
        prog="zckpt",
        description="Inspect, verify, consolidate, reshard, convert and prune checkpoints.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"zckpt {zckpt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=fn)
        return p

    def tag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tag", help="the tag (default: the one 'latest' names)")

    def run_overwrite(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="OUT may already hold checkpoints: add the tag there (replacing a committed tag "
            "of that name, atomically) and point 'latest' at it",
        )

    p = add("inspect", _inspect.inspect, "show a checkpoint's tags, spec, tensors and client_state")
    p.add_argument("path", help="save_dir or tag directory (zckpt or DeepSpeed)")
    tag(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("verify", _inspect.verify, "check completeness and every checksum")
    p.add_argument("path", help="save_dir or tag directory")
    tag(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("consolidate", _convert.consolidate, "write the fp32 state dict (safetensors, .pt)")
    p.add_argument("path", help="save_dir or tag directory (zckpt or DeepSpeed)")
    p.add_argument("out", help="OUT.safetensors, a directory (sharded), or OUT.pt / OUT.bin")
    tag(p)
    p.add_argument("--exclude-frozen", action="store_true", help="leave out frozen parameters")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--max-shard-size", help="e.g. 5GB, 500MB: Hugging Face style shards")
    p.add_argument("--lazy", action="store_true", help="read one tensor at a time (low memory)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT (atomically: readers see the old export or the new one)",
    )

    p = add("reshard", _convert.reshard, "rewrite a checkpoint for another world size or stage")
    p.add_argument("path", help="save_dir or tag directory (zckpt or DeepSpeed)")
    p.add_argument("out", help="the new save_dir")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--stage", type=int, choices=(1, 2, 3), help="default: unchanged")
    tag(p)
    p.add_argument("--codec", choices=("raw", "zstd", "byteplane"), default="raw")
    run_overwrite(p)

    p = add("convert", _convert.convert, "import a DeepSpeed checkpoint as a zckpt checkpoint")
    p.add_argument("--from", dest="source", choices=("deepspeed",), required=True)
    p.add_argument("path", help="DeepSpeed save_dir or tag directory")
    p.add_argument("out", help="the zckpt save_dir to write")
    tag(p)
    p.add_argument("--codec", choices=("raw", "zstd", "byteplane"), default="raw")
    run_overwrite(p)

    p = add("prune", _convert.prune, "delete all but the newest N committed tags")
    p.add_argument("path", help="save_dir")
    p.add_argument("--keep-last", type=int, required=True, metavar="N")

    p = add("clean", _convert.clean, "remove torn tags and files no commit references")
    p.add_argument("path", help="save_dir")
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # drop the "[Errno 2]" prefix
        raw = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        raw = str(e)
    text = " ".join(raw.split()) or type(e).__name__
    if isinstance(e, zckpt.ZckptError | OSError | ValueError):
        return text
    return f"{type(e).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``zckpt`` command; return its exit code (0 only on success).

    Errors print one line, ``zckpt: error: ...``, on stderr (a traceback with ``--debug``);
    usage errors exit 2, failures 1.

    Example:
        >>> main(["prune", "/nonexistent", "--keep-last", "0"])
        1
    """
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        with storage_options_scope(storage_options(args)):
            code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("zckpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"zckpt: error: {_one_line(e)}", file=sys.stderr)
        return 1
