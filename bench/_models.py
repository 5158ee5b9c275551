"""Training-state skeletons of large models, without tensor bytes (for metadata benchmarks).

Shapes follow the published configurations: Llama-3 405B (Hugging Face ``config.json``:
hidden 16384, 126 layers, 128 heads, 8 KV heads, FFN 53248, vocabulary 128256) and a
DeepSeek-V3-like MoE (hidden 7168, 61 layers of which the first 3 dense with FFN 18432, the
rest with 256 routed experts of FFN 2048 and one shared expert, multi-head latent attention,
vocabulary 129280). The state is zckpt's training layout: bf16 ``module``, fp32 ``master``,
``optimizer/state/<name>/{exp_avg, exp_avg_sq, step}`` (step a 0-d tensor, as torch's AdamW
keeps it), and ``param_groups``.
"""

from __future__ import annotations

from typing import Any

import torch

from zckpt.tree import DICT, LIST, TENSOR, VALUE, Skeleton, TensorMeta

EXPERTS = (r"experts\.(\d+)\.",)


def llama3_405b() -> dict[str, tuple[int, ...]]:
    h, layers, kv, ffn, vocab = 16384, 126, 8 * 128, 53248, 128256
    p: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        b = f"model.layers.{i}."
        p[b + "self_attn.q_proj.weight"] = (h, h)
        p[b + "self_attn.k_proj.weight"] = (kv, h)
        p[b + "self_attn.v_proj.weight"] = (kv, h)
        p[b + "self_attn.o_proj.weight"] = (h, h)
        p[b + "mlp.gate_proj.weight"] = (ffn, h)
        p[b + "mlp.up_proj.weight"] = (ffn, h)
        p[b + "mlp.down_proj.weight"] = (h, ffn)
        p[b + "input_layernorm.weight"] = (h,)
        p[b + "post_attention_layernorm.weight"] = (h,)
    p["model.norm.weight"] = (h,)
    p["lm_head.weight"] = (vocab, h)
    return p


def deepseek_v3_like(experts: int = 256, layers: int = 61) -> dict[str, tuple[int, ...]]:
    h, vocab, heads = 7168, 129280, 128
    p: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        b = f"model.layers.{i}."
        p[b + "self_attn.q_a_proj.weight"] = (1536, h)
        p[b + "self_attn.q_a_layernorm.weight"] = (1536,)
        p[b + "self_attn.q_b_proj.weight"] = (heads * 192, 1536)
        p[b + "self_attn.kv_a_proj_with_mqa.weight"] = (576, h)
        p[b + "self_attn.kv_a_layernorm.weight"] = (512,)
        p[b + "self_attn.kv_b_proj.weight"] = (heads * 256, 512)
        p[b + "self_attn.o_proj.weight"] = (h, heads * 128)
        p[b + "input_layernorm.weight"] = (h,)
        p[b + "post_attention_layernorm.weight"] = (h,)
        if i < 3:
            for n, s in (("gate", (18432, h)), ("up", (18432, h)), ("down", (h, 18432))):
                p[b + f"mlp.{n}_proj.weight"] = s
            continue
        p[b + "mlp.gate.weight"] = (experts, h)
        p[b + "mlp.gate.e_score_correction_bias"] = (experts,)
        for e in range(experts):
            for n, s in (("gate", (2048, h)), ("up", (2048, h)), ("down", (h, 2048))):
                p[b + f"mlp.experts.{e}.{n}_proj.weight"] = s
        for n, s in (("gate", (2048, h)), ("up", (2048, h)), ("down", (h, 2048))):
            p[b + f"mlp.shared_experts.{n}_proj.weight"] = s
    p["model.norm.weight"] = (h,)
    p["lm_head.weight"] = (vocab, h)
    return p


def training_skeleton(params: dict[str, tuple[int, ...]]) -> Skeleton:
    """The skeleton of a bf16 + fp32 master + Adam training state of these parameters."""
    metas: list[TensorMeta] = []
    paths: list[tuple[Any, ...]] = []
    bf16, fp32 = TensorMeta(torch.bfloat16, ()), TensorMeta(torch.float32, ())

    def leaf(path: tuple[Any, ...], meta: TensorMeta, shape: tuple[int, ...]) -> Any:
        metas.append(TensorMeta(meta.dtype, shape) if shape != meta.shape else meta)
        paths.append(path)
        return (TENSOR, len(metas) - 1)

    module = tuple((k, leaf(("module", k), bf16, s)) for k, s in params.items())
    master = tuple((k, leaf(("master", k), fp32, s)) for k, s in params.items())
    state = tuple(
        (
            k,
            (
                DICT,
                (
                    ("exp_avg", leaf(("optimizer", "state", k, "exp_avg"), fp32, s)),
                    ("exp_avg_sq", leaf(("optimizer", "state", k, "exp_avg_sq"), fp32, s)),
                    ("step", leaf(("optimizer", "state", k, "step"), fp32, ())),
                ),
            ),
        )
        for k, s in params.items()
    )
    group = (
        DICT,
        (
            ("lr", (VALUE, 1e-4)),
            ("betas", (LIST, ((VALUE, 0.9), (VALUE, 0.95)))),
            ("weight_decay", (VALUE, 0.1)),
            ("params", (LIST, tuple((VALUE, k) for k in params))),
        ),
    )
    node = (
        DICT,
        (
            ("module", (DICT, module)),
            ("master", (DICT, master)),
            ("optimizer", (DICT, (("state", (DICT, state)), ("param_groups", (LIST, (group,)))))),
            ("global_steps", (VALUE, 1000)),
        ),
    )
    return Skeleton(node, tuple(metas), tuple(paths))
