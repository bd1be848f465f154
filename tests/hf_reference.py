"""Test helpers: tiny random HF models as engine sources (converted in process), and transformers' own
outputs as the reference."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exec_service.model.loading import shards_from_hf_state_dict
from shared.families import family_for_config
from shared.families.base import Architecture
from shared.layout import Target, make_target

TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=101,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def tiny_hf(
    seed: int = 0, cls_name: str = "LlamaForCausalLM", config_cls: str = "LlamaConfig", **overrides: Any
):
    """A tiny random fp32 HF causal LM (eager attention) with random norm weights."""
    import transformers

    cfg = getattr(transformers, config_cls)(**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def arch_of(model, **replace: Any) -> Architecture:
    """The architecture of an HF model (its family from the config, as prep finds it)."""
    cfg = model.config.to_dict()
    arch = family_for_config(cfg).arch_from_hf(cfg)
    return dataclasses.replace(arch, **replace) if replace else arch


def source_from_hf(
    model,
    tp: int = 1,
    gqa_strategy: str | None = None,
    arch: Architecture | None = None,
) -> InMemoryShards:
    arch = arch or arch_of(model)
    target = make_target(arch, tp, "float32", gqa_strategy)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return InMemoryShards(arch, target, shards_from_hf_state_dict(sd, arch, target))


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, unpadded, no early stop."""
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_last_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0, -1].float()


@dataclass
class InMemoryShards:
    """Already built rank state dicts (tests)."""

    arch: Architecture
    target: Target
    ranks: list[dict[str, torch.Tensor]]

    def load(self, rank: int) -> dict[str, torch.Tensor]:
        return self.ranks[rank]


class HFShards:
    """Converts a local HF checkpoint directory (config.json + *.safetensors) in each process."""

    def __init__(
        self,
        path: str | Path,
        tp: int = 1,
        dtype: str = "float32",
        gqa_strategy: str | None = None,
        quantize: str | None = None,
        quantize_lm_head: bool = False,
    ) -> None:
        self.path = Path(path)
        cfg = json.loads((self.path / "config.json").read_text())
        self.family = family_for_config(cfg)
        self.arch = self.family.arch_from_hf(cfg)
        self.target = make_target(self.arch, tp, dtype, gqa_strategy, quantize, quantize_lm_head)

    def load(self, rank: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        hf: dict[str, torch.Tensor] = {}
        for f in sorted(self.path.glob("*.safetensors")):
            hf.update(load_file(str(f)))
        return shards_from_hf_state_dict(hf, self.arch, self.target)[rank]
