"""A damaged ``torch.save`` file is called damaged, never "unsafe".

``UnsafePickleError`` tells a user that a file asked to run code outside the allow-list; a file
cut short or with a torn pickle record is a different problem (a copy that did not finish, a
disk fault) and must say so: ``DeepSpeedFormatError`` naming the file, with a reason that reads
as damage. Found in review: a truncated record came back as ``UnsafePickleError``, and an
``EOFError`` without a message printed ``()``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zckpt.interop._files import _check_zip
from zckpt.interop._unpickle import DeepSpeedFormatError, load_pickle


def _saved(tmp: Path) -> Path:
    p = tmp / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.arange(6.0)}, "n": 3, "l": [1, 2, {"x": "y"}]}, p)
    return p


def _rewrite_pickle(src: Path, dst: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """``src`` rewritten with its ``data.pkl`` record edited (the zip stays well formed)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            data = zi.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = edit(data)
            zo.writestr(info, data)


@settings(max_examples=25, deadline=None)
@given(cut=st.integers(1, 60), refs=st.booleans())
@example(cut=1, refs=False)
def test_a_pickle_cut_short_is_damaged_not_unsafe(tmp_path_factory, cut: int, refs: bool) -> None:
    tmp = tmp_path_factory.mktemp("cut")
    src = _saved(tmp)
    bad = tmp / "bad.pt"
    _rewrite_pickle(src, bad, lambda b: b[:-cut])
    with pytest.raises(DeepSpeedFormatError) as err:
        load_pickle(bad, refs=refs)
    assert type(err.value) is DeepSpeedFormatError  # not UnsafePickleError (tests/test_deepspeed.py
    # shows a real refusal still is one)
    assert str(bad) in str(err.value)
    assert "()" not in str(err.value)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_a_file_cut_short_names_its_zip_directory(tmp_path: Path, keep: float) -> None:
    p = _saved(tmp_path)
    os.truncate(p, int(os.path.getsize(p) * keep))
    with pytest.raises(DeepSpeedFormatError, match="cut short") as err:
        _check_zip(str(p))
    assert str(p) in str(err.value)
