"""Lazy package attributes (PEP 562): a package's public names are imported when first used.

``import zckpt`` then costs nothing beyond its own ``__init__``, and a command such as
``zckpt inspect`` imports only the modules it runs (never torch, for a zckpt checkpoint). Each
package keeps the same names under ``if TYPE_CHECKING:`` so that mypy and editors see the real
objects; tests/test_lazy_imports.py checks the two lists and ``__all__`` agree.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["attach"]


def attach(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a module to the names the
    package re-exports from it; any other name that is a submodule of the package is imported.

    The first access imports the module and stores the value on the package, so later accesses
    are plain attribute lookups.

    Example:
        >>> getattr_, dir_ = attach("zckpt", {"zckpt.errors": ("ZckptError",)})
        >>> getattr_("ZckptError").__name__
        'ZckptError'
        >>> "ZckptError" in dir_()
        True
    """
    where = {name: module for module, names in exports.items() for name in names}

    def getattr_(name: str) -> Any:
        module = where.get(name)
        if module is None:
            sub = f"{package}.{name}"
            if name.startswith("__") or importlib.util.find_spec(sub) is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(sub)  # the import sets it on the package
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return getattr_, dir_
