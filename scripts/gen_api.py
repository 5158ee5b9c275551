"""Write docs/api.md: every public name of zckpt with its signature and summary.

Run: ``.venv/bin/python scripts/gen_api.py`` after changing public names (a test checks
that docs/api.md is current).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = [
    "zckpt",
    "zckpt.store",
    "zckpt.format",
    "zckpt.kernels",
    "zckpt.dist",
    "zckpt.adapters",
    "zckpt.interop",
    "zckpt.testing",
]


def render() -> str:
    out = [
        "# API reference",
        "",
        "Generated from the docstrings by `scripts/gen_api.py`; every entry's docstring has a",
        "runnable example (`help(zckpt.NAME)`). Names are listed once, under the first module",
        "that exports them.",
        "",
    ]
    seen: set[int] = set()
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        rows = []
        for name in sorted(getattr(mod, "__all__", [])):
            obj = getattr(mod, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            try:
                sig = str(inspect.signature(obj)) if inspect.isfunction(obj) else ""
            except (TypeError, ValueError):
                sig = ""
            doc = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
            kind = "class" if inspect.isclass(obj) else "def"
            rows.append(f"### `{modname}.{name}`\n\n`{kind} {name}{sig}`\n\n{doc}\n")
        if rows:
            out.append(f"## `{modname}`\n")
            out.extend(rows)
    return "\n".join(out)


def main() -> int:
    path = Path(__file__).resolve().parents[1] / "docs" / "api.md"
    path.write_text(render())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
