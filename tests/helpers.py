"""Test helpers: tiny random HF checkpoints made with transformers' save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shared.cli import smollm2_gguf as smollm2_gguf  # re-exported: the real model's GGUF
from tests.hf_reference import TINY

TINY_LLAMA: dict[str, Any] = {**TINY, "max_position_embeddings": 256}


def llama_config(**overrides: Any):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**TINY_LLAMA, **overrides})
    cfg._attn_implementation = "eager"
    return cfg


def make_llama(path: Path, seed: int = 0, **overrides: Any):
    """Save a tiny random Llama (fp32) to ``path``; returns the model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides)).eval()
    with torch.no_grad():  # random norms so that a wrong norm weight shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def canonical_from_hf(
    state_dict: dict[str, torch.Tensor], family_name: str, config: dict
) -> dict[str, torch.Tensor]:
    """The converted (unsharded) tensors, built straight from an in-memory HF state dict."""
    from shared.families import REGISTRY

    fam = REGISTRY[family_name]
    arch = fam.arch_from_hf(config)
    return {r.name: r.build(state_dict) for r in fam.rules(arch)}


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors as saved on disk (transformers 5 keeps some families' weights in another
    layout in memory, e.g. fused MoE experts, and converts back on save)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_export_matches_eager(runner, spec, ep) -> None:
    """The exported program ``ep`` of ``runner.graphs[spec]`` computes what the eager graph does,
    each from an empty KV cache (every output, by name)."""
    from exec_service.runtime.graphs import example_inputs, example_step

    runner.cache.reset()
    want = runner.run(spec, example_step(spec))
    runner.cache.reset()
    got = ep.module()(*example_inputs(spec))
    names = runner.graphs[spec].output_names
    assert len(got) == len(names), (spec.name, names)
    for name, value in zip(names, got, strict=True):
        torch.testing.assert_close(value, getattr(want, name), msg=lambda m, n=name: f"{spec.name} {n}: {m}")
