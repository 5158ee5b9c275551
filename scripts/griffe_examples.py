"""A griffe extension for the docs site: zckpt's ``Example:`` sections are doctests.

Griffe's Google-style parser reads ``Examples:`` as doctest code but ``Example:`` as an
admonition of prose (where ``x["w"]`` would become a broken Markdown link). zckpt's docstrings
say ``Example:``; this renames the heading when griffe loads each docstring, so the runnable
examples render as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headings to ``Examples:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
