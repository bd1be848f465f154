"""Tiny random configs for every seed family, shared by the prep and exec family tests.

Adding a family to the tests is one entry here."""

from __future__ import annotations

from typing import Any

from tests.hf_reference import TINY

BASE: dict[str, Any] = dict(TINY)  # the exec tests' tiny Llama shape; families add their fields

# family -> (config class, model class, overrides)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {
            "embedding_multiplier": 3.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 4.0,
        },
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
            "original_max_position_embeddings": 32,
            "partial_rotary_factor": 0.5,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.05 * i for i in range(2)],
                "long_factor": [1.5 + 0.25 * i for i in range(2)],
                "original_max_position_embeddings": 32,
                "partial_rotary_factor": 0.5,
            },
        },
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_hidden_layers": 3,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
            "head_dim": 16,
        },
    ),
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            "num_hidden_layers": 4,
            "head_dim": 8,
            "num_local_experts": 4,
            "intermediate_size_mlp": 96,
            "interleave_moe_layer_step": 2,
            "moe_layers": [1, 3],
            "no_rope_layers": [1, 1, 1, 0],
            "attention_chunk_size": 16,
        },
    ),
}


def make_family_model(family: str, seed: int = 0, **overrides: Any):
    """A tiny random fp32 HF model of ``family`` (eager attention, random norm weights/biases)."""
    from tests.hf_reference import tiny_hf

    cfg_cls, model_cls, extra = FAMILIES[family]
    return tiny_hf(seed, cls_name=model_cls, config_cls=cfg_cls, **{**BASE, **extra, **overrides})


def save_llama4_multimodal(text_model, path) -> None:
    """Wrap a tiny Llama4ForCausalLM as the language_model of a Llama4ForConditionalGeneration with
    a tiny vision tower, and save it to ``path``."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vision_output_dim=16,
        projector_input_dim=16,
        projector_output_dim=64,
        image_size=28,
        patch_size=14,
    )
    full = Llama4ForConditionalGeneration(
        Llama4Config(text_config=text_model.config.to_dict(), vision_config=vision)
    )
    full.language_model.load_state_dict(text_model.state_dict())
    full.save_pretrained(path)
