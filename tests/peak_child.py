"""Peak resident memory of an operation, measured in a fresh child process.

A child, because a long-running process reuses memory freed by earlier work and its imports
would hide what an operation costs. The child's script gets two functions: ``start()`` resets
the kernel's high-water mark (``/proc/self/clear_refs``, Linux) and records the resident set;
``done(**extra)`` reports the growth of the high-water mark since then, in MiB, with ``extra``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

PREAMBLE = r"""
import json, sys

def _status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)

def start():
    global _base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set size, to the current one
    _base = _status_mib("VmRSS")

def done(**extra):
    print(json.dumps({"growth_mib": _status_mib("VmHWM") - _base, **extra}))
"""


def run_child(body: str, *args: object) -> dict[str, Any]:
    """Run ``body`` (which calls ``start()`` then ``done()``) with ``args`` as ``sys.argv[1:]``;
    return what ``done`` reported (``growth_mib`` and the extras)."""
    script = PREAMBLE + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result
