"""Lazy package attributes (PEP 562): a package's public names are imported when first used.

``import zckpt`` then costs nothing beyond its own ``__init__``, and a command such as
``zckpt inspect`` imports only the modules it runs (never torch, for a zckpt checkpoint). Each
package keeps the same names under ``if TYPE_CHECKING:`` so that mypy and editors see the real
objects; tests/test_lazy_imports.py checks the two lists and ``__all__`` agree.

Inside zckpt's modules, :func:`lazy_module` does the same for a dependency that only some of a
module's functions use (NumPy, zstandard): ``zckpt inspect`` of a small checkpoint runs none of
them, and never imports them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["attach", "lazy_module"]


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


class _LazyModule:
    """Module ``name``, imported on the first attribute read; each attribute read is then stored
    on this object, so later reads cost what a module attribute's does."""

    def __init__(self, name: str) -> None:
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:  # called only for attributes not yet stored
        name = self.__dict__.get("_lazy_name")
        if name is None:  # a copy made without __init__: nothing to import
            raise AttributeError(attr)
        value = getattr(importlib.import_module(name), attr)
        self.__dict__[attr] = value
        return value

    def __repr__(self) -> str:
        loaded = "imported" if self.__dict__["_lazy_name"] in sys.modules else "not imported"
        return f"<lazy module {self.__dict__['_lazy_name']!r} ({loaded})>"


def lazy_module(name: str) -> Any:
    """A stand-in for ``import name`` that imports module ``name`` on its first attribute read.

    For a module-level name that only some functions use: ``np = lazy_module("numpy")`` (with
    ``import numpy as np`` under ``if TYPE_CHECKING:`` for mypy). Importing the using module
    then costs nothing for it; ``np.frombuffer`` imports NumPy the first time, and afterwards
    reads a stored attribute. Not for modules that Numba compiles (it must see the real module),
    nor for attributes reassigned after the first read (the stored value stays).

    Example:
        >>> import sys
        >>> json = lazy_module("json")
        >>> json.dumps([1])
        '[1]'
        >>> json.dumps is sys.modules["json"].dumps
        True
    """
    return _LazyModule(name)
