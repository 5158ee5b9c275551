"""Argument parsing, error reporting and progress bars for the ``zckpt`` command."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import zckpt
from zckpt.errors import ZckptError

__all__ = ["EXIT_BROKEN_PIPE", "CommandLineError", "Progress", "cli_wording", "main", "progress"]

Command = Callable[[argparse.Namespace], int]

#: The exit status when the reader of stdout went away (``zckpt inspect ckpt | head -1``): what
#: git returns (it dies of SIGPIPE, which a shell reports as 128 + 13), so ``set -o pipefail``
#: scripts see the same thing for both.
EXIT_BROKEN_PIPE = 141


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
            import shutil

            from tqdm import tqdm

            # Some pseudo-terminals report a size of 0 x 0, where tqdm would draw nothing (it
            # measures rows as -1 and hides every bar): fall back to 80 x 24.
            size = shutil.get_terminal_size((80, 24))
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                unit_scale=unit == "B",
                file=sys.stderr,
                ncols=size.columns or 80,
                nrows=size.lines or 24,
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


# How the library spells advice for Python callers, and how the command line says it.
_PYTHON_SPELLINGS = (
    (re.compile(r"\bpass overwrite=True\b"), "pass --overwrite"),
    (re.compile(r"\bpass tag=\.\.\."), "pass --tag TAG"),
    (re.compile(r"\bpass tag=(?=['\"])"), "pass --tag "),
    (re.compile(r": pass one as the tag\b"), ": pass one with --tag"),
    (re.compile(r" \(zckpt\.interop\.convert_deepspeed\)"), ""),
)


def cli_wording(text: str) -> str:
    """``text`` with advice worded for the command line instead of for Python callers.

    Example:
        >>> cli_wording("ckpt/step3 already holds a committed checkpoint; pass overwrite=True")
        'ckpt/step3 already holds a committed checkpoint; pass --overwrite'
        >>> cli_wording("ckpt has no 'latest' file; its tags are a, b: pass one as the tag")
        "ckpt has no 'latest' file; its tags are a, b: pass one with --tag"
    """
    for pattern, replacement in _PYTHON_SPELLINGS:
        text = pattern.sub(replacement, text)
    return text


def _reword(e: BaseException) -> None:
    """Give ``e`` the command line's wording, in place: its type, traceback and other
    arguments stay as they are (``--debug`` shows the same exception, worded for a CLI user)."""
    if isinstance(e, OSError) and e.strerror:
        e.strerror = cli_wording(e.strerror)
    elif e.args and isinstance(e.args[0], str):
        e.args = (cli_wording(e.args[0]), *e.args[1:])


_DESCRIPTION = """\
Inspect, verify, export and rewrite sharded checkpoints (zckpt's, DeepSpeed's or PyTorch DCP's).

commands:
  inspect      show a checkpoint's tags, spec, files, tensors, tied weights and client_state
  verify       check that every file is present and every checksum matches (exit 1 if not)
  consolidate  write the fp32 weights as .safetensors (a file or shards), .pt or .bin
  reshard      rewrite a checkpoint for another world size and/or ZeRO stage
  convert      import a DeepSpeed or DCP checkpoint (the whole state) as a zckpt one
  prune        delete all but the newest N committed tags of a save_dir
  clean        remove torn tags and files that no commit references

Run 'zckpt COMMAND --help' for a command's options and an example. Errors print one line,
'zckpt: error: ...', and exit 1 (2 for a usage error); --debug shows the traceback."""

_EPILOGS = {
    "inspect": "example:\n  zckpt inspect ckpt --tag step300 --json",
    "verify": "example:\n  zckpt verify ckpt          # every committed tag and 'latest'",
    "consolidate": "example:\n  zckpt consolidate ckpt hf/ --max-shard-size 5GB --dtype bf16",
    "reshard": "example:\n  zckpt reshard ckpt ckpt8 --world-size 8 --stage 3",
    "convert": "example:\n  zckpt convert --from deepspeed ds_ckpt ckpt --codec zstd\n"
    "  zckpt convert --from dcp dcp_ckpt/step100 ckpt",
    "prune": "example:\n  zckpt prune ckpt --keep-last 3",
    "clean": "example:\n  zckpt clean ckpt           # when no save is running",
}


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars (default: drawn on stderr when it is a terminal)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error (default: one line)",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="an fsspec option for s3://... and other URLs (repeatable), e.g. "
        "endpoint_url=http://127.0.0.1:9000; VALUE is read as JSON when it parses "
        "(true, 3), else as text. Credentials also come from AWS_* variables (default: none)",
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


def _command(module: str, name: str) -> Command:
    """Subcommand ``name`` of ``zckpt/cli/{module}.py``, imported when it runs: ``--help`` and
    the commands that need no tensors never import what the others need (torch)."""

    def run(args: argparse.Namespace) -> int:
        fn: Command = getattr(importlib.import_module(f"zckpt.cli.{module}"), name)
        return fn(args)

    return run


def _parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="zckpt",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"zckpt {zckpt.__version__}")
    sub = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        required=True,
        help="one of the commands above",
    )

    def add(name: str, fn: Command, what: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            description=textwrap.fill(what, 88),
            epilog=_EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        p.set_defaults(func=fn)
        return p

    def path(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("path", metavar="PATH", help=what)

    def tag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tag", help="the tag to read (default: the one 'latest' names)")

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--json",
            action="store_true",
            help="print one JSON document, keys as in docs/cli.md (default: text)",
        )

    def run_overwrite(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="OUT may already hold checkpoints: add the tag there (replacing a committed tag "
            "of that name, atomically) and point 'latest' at it (default: refuse)",
        )

    def codec(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--codec", choices=("raw", "zstd", "byteplane"), default=None, help=default)

    readable = (
        "a zckpt save_dir or tag directory, a DeepSpeed checkpoint or a DCP checkpoint "
        "directory (detected)"
    )

    p = add(
        "inspect",
        _command("_inspect", "inspect"),
        "Show a checkpoint's tags, 'latest', spec, files, codec, tensors (bytes and bytes on "
        "disk), tied weights and client_state.",
    )
    path(p, readable)
    tag(p)
    json_flag(p)

    p = add(
        "verify",
        _command("_inspect", "verify"),
        "Check that every file of a checkpoint is present, whole (size, whole-file xxh3) and "
        "that every chunk's checksum matches; exit 1 when anything is wrong.",
    )
    path(
        p,
        "a save_dir (every committed tag and 'latest'), a tag directory, DeepSpeed's or a "
        "DCP checkpoint directory",
    )
    p.add_argument("--tag", help="check only this tag (default: every tag of a save_dir)")
    json_flag(p)

    p = add(
        "consolidate",
        _command("_consolidate", "consolidate"),
        "Write the fp32 state dict (the module's weights, from the fp32 masters) as one "
        ".safetensors file, Hugging Face style shards, or a torch.save file.",
    )
    path(p, readable)
    p.add_argument(
        "out",
        metavar="OUT",
        help="OUT.safetensors (one file), OUT.pt or OUT.bin (torch.save), or a directory "
        "(shards): a path ending in '/', an existing directory, a name without a suffix, or "
        "any OUT with --max-shard-size; other suffixes are refused",
    )
    tag(p)
    p.add_argument(
        "--exclude-frozen",
        action="store_true",
        help="leave out parameters recorded as frozen (default: keep them)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="cast floating tensors to this dtype (default: fp32)",
    )
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="write OUT as a directory of shards of at most SIZE each, e.g. 5GB, 500MB "
        "(default: no limit, one file)",
    )
    p.add_argument(
        "--lazy",
        action="store_true",
        help="read one tensor at a time: memory near one tensor, not the model "
        "(default: read all first)",
    )
    p.add_argument(
        "--all-tensors",
        action="store_true",
        help="DCP checkpoints, safetensors OUT: every tensor under its DCP name, optimizer "
        "state included (default: the module's, those under the 'model' key, by their names "
        "in it)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT, atomically: readers see the old export or the new one "
        "(default: refuse)",
    )

    p = add(
        "reshard",
        _command("_convert", "reshard"),
        "Rewrite a checkpoint for another world size and/or ZeRO stage; the tag, client_state "
        "and frozen list carry over. Nothing is written before every check has passed.",
    )
    path(p, readable)
    p.add_argument("out", metavar="OUT", help="the new save_dir (may not overlap PATH)")
    p.add_argument(
        "--world-size",
        type=int,
        required=True,
        metavar="N",
        help="the new number of data-parallel ranks (required)",
    )
    p.add_argument(
        "--stage",
        type=int,
        choices=(1, 2, 3),
        help="the new ZeRO stage (default: the source's)",
    )
    tag(p)
    codec(
        p,
        "codec of the new files (default: the source's, read from its blob headers; raw for "
        "DeepSpeed input)",
    )
    p.add_argument(
        "--allow-empty-ranks",
        action="store_true",
        help="write even when --world-size exceeds the elements there are to partition, so "
        "that some ranks hold no partitioned state (default: refuse)",
    )
    run_overwrite(p)

    p = add(
        "convert",
        _command("_convert", "convert"),
        "Import a DeepSpeed ZeRO checkpoint (fp32 masters, optimizer state, step counts, LR "
        "scheduler, client_state) as a zckpt checkpoint that loads at any world size and stage.",
    )
    p.add_argument(
        "--from",
        dest="source",
        choices=("deepspeed", "dcp"),
        required=True,
        help="the format of PATH (required): deepspeed, or dcp (a directory "
        "PyTorch's dcp.save wrote; its whole state dict, loadable at "
        "any world size)",
    )
    path(p, "a DeepSpeed save_dir or tag directory, or a DCP checkpoint directory")
    p.add_argument("out", metavar="OUT", help="the zckpt save_dir to write (may not overlap PATH)")
    tag(p)
    codec(p, "codec of the zckpt files (default: raw)")
    run_overwrite(p)

    p = add(
        "prune",
        _command("_manage", "prune"),
        "Delete all but the newest N committed tags of a zckpt save_dir (never the one "
        "'latest' names); print each deleted tag.",
    )
    path(p, "a zckpt save_dir")
    p.add_argument(
        "--keep-last",
        type=int,
        required=True,
        metavar="N",
        help="how many of the newest committed tags to keep, at least 1 (required)",
    )

    p = add(
        "clean",
        _command("_manage", "clean"),
        "Remove torn tag directories, temporary files and blobs of uncommitted saves from a "
        "zckpt save_dir. Run it when no save is running.",
    )
    path(p, "a zckpt save_dir")
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


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has closed it: the EPIPE a
    ``BrokenPipeError`` reports was stdout's, not some other pipe's."""
    try:
        import select

        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, ImportError, OSError, ValueError):
        return False  # not a real file descriptor (captured in-process), or no poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush finds nothing to fail
    on (what Python's documentation of SIGPIPE recommends)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``zckpt`` command; return its exit code (0 only on success).

    Errors print one line, ``zckpt: error: ...``, on stderr (a traceback with ``--debug``);
    usage errors exit 2, failures 1. When the reader of stdout goes away
    (``zckpt inspect ckpt | head -1``) it stops quietly with :data:`EXIT_BROKEN_PIPE` (141).

    Example:
        >>> main(["prune", "/nonexistent", "--keep-last", "0"])
        1
    """
    frozen = gc.get_freeze_count()
    try:
        code = _run(argv)
        sys.stdout.flush()  # here, where a closed pipe is still ours to handle
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    finally:
        # A command may freeze the collector's heap for its own speed (consolidate does): the
        # process ends with it. Called in-process (``argv`` given: tests, scripts), the
        # caller's objects must stay collectable, so what the command froze is thawed.
        if argv is not None and frozen == 0 and gc.get_freeze_count():
            gc.unfreeze()
    return code


#: The commands that read DeepSpeed and DCP checkpoints as well as zckpt's, and the module of
#: those that check their arguments before one at a URL is copied (``before_staging``).
_READ_FOREIGN = {
    "inspect": None,
    "verify": None,
    "consolidate": "_consolidate",
    "reshard": "_convert",
    "convert": "_convert",
}


class _Reworded(io.TextIOBase):
    """A text stream that writes to ``out`` with ``reword`` applied to each piece."""

    def __init__(self, out: TextIO, reword: Callable[[str], str]) -> None:
        self.out, self.reword = out, reword

    def write(self, text: str) -> int:
        self.out.write(self.reword(text))
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def fileno(self) -> int:
        return self.out.fileno()

    def isatty(self) -> bool:
        return self.out.isatty()


@contextlib.contextmanager
def _staged_input(args: argparse.Namespace) -> Iterator[None]:
    """A DeepSpeed or DCP checkpoint at a URL, for the commands that read one: copied to a
    private local directory for the command (``interop/_staged.py``), which then reads it as a
    local one; what the command prints, and its errors, name the URL. Anything else (a local
    path, a zckpt checkpoint at a URL, which is read in place) is left as it is."""
    from zckpt.store._resolve import is_url

    path = getattr(args, "path", None)
    if args.command not in _READ_FOREIGN or not isinstance(path, str) or not is_url(path):
        yield
        return
    from zckpt.interop._staged import find_foreign, stage
    from zckpt.store._resolve import storage_for

    storage, p = storage_for(path)
    # convert --from dcp's --tag is the tag to write, not one to read
    dcp_in = args.command == "convert" and args.source == "dcp"
    found = find_foreign(storage, p, None if dcp_in else getattr(args, "tag", None))
    if found is None:
        yield
        return
    checks = _READ_FOREIGN[args.command]
    if checks is not None:  # nothing is copied for a command that would refuse
        importlib.import_module(f"zckpt.cli.{checks}").before_staging(args, found.kind, found.root)
    copy = stage(storage, p, found)
    # the copy holds one tag; what the save_dir around it holds (tags, latest) is asked at the URL
    args.path, args.staged_root, out = copy.local, found.root, sys.stdout
    sys.stdout = _Reworded(out, copy.reword)
    try:
        with copy.reworded():
            yield
    finally:
        sys.stdout = out
        copy.close()


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    args.as_command = argv is None  # the process is this command's (may end it when done)
    # Imported once the arguments parse: --help and --version need none of the store.
    from zckpt.store._resolve import local_path, storage_options_scope

    for name in ("path", "out"):  # file:// is a local path to every command, as to the API
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, local_path(getattr(args, name)))

    try:
        with storage_options_scope(storage_options(args)), _staged_input(args):
            code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("zckpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
            raise
        _reword(e)
        if getattr(args, "debug", False):
            raise
        print(f"zckpt: error: {_one_line(e)}", file=sys.stderr)
        return 1
