"""The ``zckpt`` command: verb subcommands, each thin over zckpt's public functions.

``zckpt inspect | verify | consolidate | reshard | convert | prune | clean``; see
``docs/cli.md``. :func:`main` takes ``argv`` and returns the exit code (0 only on success), so
tests and scripts call it in-process.

Example:
    >>> from zckpt.cli import main
    >>> main(["--version"])
    zckpt 0.1.0
    0
"""

from zckpt.cli._main import main

__all__ = ["main"]
