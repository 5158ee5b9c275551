"""The object-store dependencies are an optional extra (``pip install 'zckpt[s3]'``): without
fsspec and s3fs a local save, load, fp32 export and retention work, and a URL is refused with
an error that names the extra. Run in a fresh interpreter where both imports fail."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys, tempfile
    sys.modules["fsspec"] = None  # import fsspec raises ImportError, as if not installed
    sys.modules["s3fs"] = None
    import torch, zckpt
    d = tempfile.mkdtemp()
    state = {"module": {"w": torch.ones(4).bfloat16()}, "master": {"w": torch.ones(4)}}
    for t in ("a", "b"):
        zckpt.save_checkpoint(d, state, zckpt.ZeroSpec(2, 2), tag=t, keep_last=1)
    assert zckpt.load_checkpoint(d).state["master"]["w"].tolist() == [1.0] * 4
    zckpt.load_checkpoint(d, world_size=3, rank=1)
    assert zckpt.get_fp32_state_dict_from_zero_checkpoint(d)["w"].tolist() == [1.0] * 4
    assert [c.tag for c in zckpt.list_tags(d)] == ["b"]
    try:
        zckpt.save_checkpoint("s3://bucket/run", state, zckpt.ZeroSpec(1, 1), tag="t")
    except zckpt.ArgumentError as e:
        print(e)
    assert not any(m in sys.modules and sys.modules[m] for m in ("fsspec", "s3fs", "botocore"))
    """
)


def test_local_use_needs_no_object_store_packages() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "s3://bucket/run: URLs need fsspec" in r.stdout and "pip install 'zckpt[s3]'" in r.stdout
