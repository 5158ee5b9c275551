"""Keep the architecture honest: the pure core touches no files or process groups, only
zckpt/dist imports torch.distributed, and every public name is documented with an example."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import zckpt

ROOT = Path(zckpt.__file__).parent
PURE = ["tree.py", "shard.py", "errors.py", "spec", "format", "kernels", "assemble", "testing"]
FILE_OS_CALLS = {
    "open", "write", "writev", "pwrite", "read", "pread", "preadv", "stat", "listdir", "remove",
    "unlink", "rename", "replace", "makedirs", "mkdir", "fsync", "rmdir", "scandir",
}  # fmt: skip
FORBIDDEN_MODULES = {"pathlib", "shutil", "tempfile", "torch.distributed", "fsspec"}


def pure_files() -> list[Path]:
    out: list[Path] = []
    for p in PURE:
        path = ROOT / p
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_does_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                assert a.name not in FORBIDDEN_MODULES, f"{path.name} imports {a.name}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.module not in FORBIDDEN_MODULES, f"{path.name} imports {node.module}"
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                assert f.id != "open", f"{path.name}:{node.lineno} calls open()"
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                assert not (f.value.id == "os" and f.attr in FILE_OS_CALLS), (
                    f"{path.name}:{node.lineno} calls os.{f.attr}"
                )


#: Readers of DCP checkpoints (interop/, and the commands in cli/_dcp.py): they name DCP's
#: pickled classes (an allow-list of qualified names) and their examples write checkpoints with
#: torch's DCP, but they never import torch.distributed.
NAMES_DCP = {
    "_dcp_metadata.py",
    "_dcp.py",
    "_dcp_state.py",
    "_dcp_convert.py",
    "_dcp_values.py",
    "_dcp_fp32.py",
}


def _imports_of(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_only_zckpt_dist_imports_torch_distributed() -> None:
    for path in ROOT.rglob("*.py"):
        if path.parent.name == "dist":
            continue
        src = path.read_text()
        if path.parent.name in ("interop", "cli") and path.name in NAMES_DCP:
            imported = [m for m in _imports_of(ast.parse(src)) if m.startswith("torch.distributed")]
            assert not imported, (path, imported)
            continue
        assert "torch.distributed" not in src.replace("``torch.distributed``", ""), path


def public_objects() -> list[tuple[str, object]]:
    mods = [
        "zckpt",
        "zckpt.testing",
        "zckpt.store",
        "zckpt.format",
        "zckpt.kernels",
        "zckpt.dist",
        "zckpt.adapters",
    ]
    out = []
    for m in mods:
        mod = importlib.import_module(m)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{m}.{name}", obj))
    return out


@pytest.mark.parametrize(
    ("name", "obj"), public_objects(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_public_names_have_docstrings_with_examples(name: str, obj: object) -> None:
    doc = inspect.getdoc(obj) or ""
    if getattr(obj, "_is_protocol", False):
        assert doc, name  # protocols document their methods instead
        return
    assert ">>>" in doc, f"{name} has no runnable example in its docstring"


def test_api_reference_is_current() -> None:
    """docs/api.md is generated from the docstrings: rerun scripts/gen_api.py after changes."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_api", root / "scripts" / "gen_api.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (root / "docs" / "api.md").read_text() == gen.render(), "run scripts/gen_api.py"
