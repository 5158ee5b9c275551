"""Sharded safetensors exports against Hugging Face's own code: ``huggingface_hub``'s shard plan
and ``save_torch_state_dict``, ``transformers``' ``save_pretrained`` and ``from_pretrained``.

Neither package is a zckpt dependency; each test is skipped when its package is not installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import zckpt
from zckpt.interop import export_safetensors
from zckpt.interop._safetensors import INDEX_NAME, SINGLE_NAME, module_key_order

LIMITS = [1, 40, 100, 256, 300, 1000, 1200, 5000, 10**9]


def _state() -> dict[str, torch.Tensor]:
    """Module order, one tie, tensors above and below every limit, a zero-size one, ints."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(20, 8, generator=g)  # 640 bytes
    sd: dict[str, torch.Tensor] = {"embed.weight": emb, "pos": torch.randn(64, 4, generator=g)}
    for i in range(4):
        sd[f"h.{i}.ln.weight"] = torch.randn(8, generator=g)
        sd[f"h.{i}.attn.weight"] = torch.randn(8, 8, generator=g).bfloat16()
        sd[f"h.{i}.attn.bias"] = torch.randn(8, generator=g)
        sd[f"h.{i}.mlp.weight"] = torch.randn(8, 32, generator=g)  # 1024 bytes
    sd["steps"] = torch.arange(3)
    sd["empty"] = torch.zeros(0, 4)
    sd["lm_head.weight"] = emb  # tied; sorts after embed.weight, as HF's choice of kept name
    return sd


def _files(d: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(str(d / f), "pt") as h:
                out[f] = set(h.keys())
    return out


@pytest.mark.parametrize("limit", LIMITS)
def test_shard_plan_equals_huggingface_hub_split(tmp_path: Path, limit: int) -> None:
    hub = pytest.importorskip("huggingface_hub")
    sd = _state()
    r = export_safetensors(sd, tmp_path / "o", max_shard_size=limit)
    assert r.tied == {"lm_head.weight": "embed.weight"}
    # save_pretrained drops tied names before splitting; on the whole dict, the hub's split puts
    # a tied name in its target's file without counting its bytes: the same plan either way
    stored = {k: v for k, v in sd.items() if k not in r.tied}
    for given in (stored, sd):
        split = hub.split_torch_state_dict_into_shards(given, max_shard_size=limit)
        want = {k: v for k, v in split.tensor_to_filename.items() if k not in r.tied}
        assert [os.path.basename(f) for f in r.files] == list(split.filename_to_tensors)
        assert r.total_size == split.metadata["total_size"]
        got = _files(tmp_path / "o")
        assert got == {f: set(ks) - set(r.tied) for f, ks in split.filename_to_tensors.items()}
        if split.is_sharded:
            idx = json.loads((tmp_path / "o" / INDEX_NAME).read_text())
            assert idx["weight_map"] == want
            assert idx["metadata"]["total_size"] == split.metadata["total_size"]
        else:
            assert r.index_path is None and list(got) == [SINGLE_NAME]
        if given is sd:
            assert split.tensor_to_filename["lm_head.weight"] == want["embed.weight"]


@pytest.mark.parametrize("limit", [100, 1000, 5000])
def test_directory_equals_huggingface_hub_save_torch_state_dict(tmp_path: Path, limit: int) -> None:
    hub = pytest.importorskip("huggingface_hub")
    sd = _state()
    export_safetensors(sd, tmp_path / "zckpt", max_shard_size=limit)
    (tmp_path / "hub").mkdir()
    hub.save_torch_state_dict(dict(sd), tmp_path / "hub", max_shard_size=limit)
    assert _files(tmp_path / "zckpt") == _files(tmp_path / "hub")
    assert sorted(os.listdir(tmp_path / "zckpt")) == sorted(os.listdir(tmp_path / "hub"))
    ours = json.loads((tmp_path / "zckpt" / INDEX_NAME).read_text())
    theirs = json.loads((tmp_path / "hub" / INDEX_NAME).read_text())
    assert ours["weight_map"] == theirs["weight_map"]
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]


def _gpt2(transformers: Any) -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    return transformers.GPT2LMHeadModel(config).eval()


def _logits(model: Any) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % 100
    with torch.no_grad():
        out: torch.Tensor = model(ids).logits
    return out


LIMIT = 40_000  # bytes: GPT-2's wpe (1024 x 32 fp32) is larger, alone in its file; 6 shards


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_tiny_gpt2_export_is_save_pretrained_layout_and_loads(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = _gpt2(transformers)
    sd = model.state_dict()
    r = export_safetensors(sd, tmp_path / "zckpt", max_shard_size=LIMIT)
    assert len(r.files) >= 3
    assert r.tied == {"lm_head.weight": "transformer.wte.weight"}
    model.save_pretrained(tmp_path / "hf", max_shard_size=LIMIT)
    ours = json.loads((tmp_path / "zckpt" / INDEX_NAME).read_text())
    theirs = json.loads((tmp_path / "hf" / INDEX_NAME).read_text())
    assert ours["weight_map"] == theirs["weight_map"]  # same files, same tensors in each
    ours_meta = {k: v for k, v in ours["metadata"].items() if k != "tied"}
    assert ours_meta == theirs["metadata"]  # total_size, total_parameters
    assert _files(tmp_path / "zckpt") == _files(tmp_path / "hf")
    # export first (the export refuses a directory holding other files), then the config
    model.config.save_pretrained(tmp_path / "zckpt")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "zckpt").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_tiny_gpt2_from_a_zckpt_checkpoint_loads_with_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = _gpt2(transformers)
    master = model.state_dict()
    module = {k: v.bfloat16() for k, v in master.items()}
    module["lm_head.weight"] = module["transformer.wte.weight"]  # tied in the checkpoint too
    state = {"module": module, "master": master}
    zckpt.save_checkpoint(tmp_path / "ck", state, zckpt.ZeroSpec(3, 2), tag="t")
    sd = zckpt.get_fp32_state_dict_from_zero_checkpoint(tmp_path / "ck", lazy_mode=True)
    order = module_key_order(tmp_path / "ck")
    assert order == list(master)
    r = export_safetensors(sd, tmp_path / "out", max_shard_size=LIMIT, key_order=order)
    assert len(r.files) >= 3 and r.tied == {"lm_head.weight": "transformer.wte.weight"}
    model.config.save_pretrained(tmp_path / "out")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(loaded), _logits(model))  # fp32 masters: bitwise the model
