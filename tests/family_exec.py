"""The shared family tester: every family case plugs in with one entry in ``CASES``.

A case is a family from ``tests/family_configs.py`` plus overrides that switch on what the tiny
default leaves off (e.g. Llama4 temperature tuning needs a small ``floor_scale`` to matter at test
lengths; Qwen3-MoE is run with ``norm_topk_prob`` both ways). The checkpoint is always built with
``save_pretrained`` and prepared from the SAVED files (transformers 5 keeps some MoE experts fused in
memory, so its in-memory state dict differs from the checkpoint).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exec_service.artifact import Artifact, open_artifact
from exec_service.engine import Engine, Request, RuntimeConfig, StoppingCriteria
from exec_service.runtime.graphs import DECODE, SPECULATE
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from tests.family_configs import make_family_model

PHI3_ROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.2],
    "long_factor": [4.0, 40.0],
    "original_max_position_embeddings": 32,
    "partial_rotary_factor": 0.5,
}

# family case -> (family in tests/family_configs.py, config overrides)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "granite": ("granite", {}),
    # longrope (original_max 32; long factors far from short ones so a wrong pick flips tokens),
    # partial rotary 0.5
    "phi3": ("phi3", {"rope_parameters": PHI3_ROPE}),
    "phi3_window": ("phi3", {"rope_parameters": PHI3_ROPE, "sliding_window": 24}),  # + sliding window
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", {}),  # norm_topk_prob, mlp_only_layers [1]
    "qwen3_moe_raw": (  # norm_topk_prob false, decoder_sparse_step 2 -> MoE on layer 1 only
        "qwen3_moe",
        {"norm_topk_prob": False, "decoder_sparse_step": 2, "mlp_only_layers": []},
    ),
    # chunk 16, NoPE layer 3, MoE layers 1 and 3; floor_scale 4 so temperature tuning acts from pos 3
    "llama4": ("llama4", {"floor_scale": 4, "attn_scale": 0.5}),
}

# 5 tokens; 20 (Phi-3 crosses original_max=32 while generating); 70 (> original_max, > the Llama4
# chunk size 16, and > the largest context bucket: prefilled in two chunks)
PROMPTS: list[list[int]] = [
    [7, 3, 12, 90, 41],
    [(i * 13) % 97 + 3 for i in range(20)],
    [(i * 37) % 97 + 3 for i in range(70)],
]
N_NEW = 32
CONFIG = RuntimeConfig(max_batch_size=4, max_seq_len=128, context_buckets=(16, 64), return_logits=True)
# speculation: k = 3 drafts per step (the engine's drafter is replaced by tests/drafters.OracleDrafter)
SPECULATIVE = dataclasses.replace(CONFIG, speculation="ngram", num_speculative_tokens=3)


@dataclass
class FamilyCase:
    name: str
    family: str
    overrides: dict[str, Any]
    root: Path
    seed: int = 0
    _model: Any = None
    _manifests: dict[tuple[int, str], str] = field(default_factory=dict)
    _ref: list[list[int]] | None = None

    @property
    def model(self):
        """The HF reference model (fp32, eager), saved once to ``root/ckpt``."""
        if self._model is None:
            self._model = make_family_model(self.family, seed=self.seed, **self.overrides)
            self._model.save_pretrained(self.root / "ckpt")
        return self._model

    @property
    def checkpoint(self) -> Path:
        _ = self.model
        return self.root / "ckpt"

    def manifest(self, tp: int, dtype: str = "float32") -> str:
        if (tp, dtype) not in self._manifests:
            res = prepare(
                PrepareRequest(
                    source=str(self.checkpoint), tp_degree=tp, dtype=dtype, output=f"file://{self.root}/store"
                )
            )
            self._manifests[tp, dtype] = res.manifest_uri
        return self._manifests[tp, dtype]

    def source(self, tp: int, dtype: str = "float32") -> Artifact:
        return open_artifact(self.manifest(tp, dtype))

    @torch.no_grad()
    def reference(self) -> list[list[int]]:
        """transformers' own greedy ``generate`` (one prompt at a time, no early stop)."""
        if self._ref is None:
            from tests.hf_reference import hf_greedy

            self._ref = [hf_greedy(self.model, p, N_NEW) for p in PROMPTS]
        return self._ref

    @torch.no_grad()
    def reference_logits(self, prompt: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([prompt])).logits[0, -1].float()


def run_engine(
    engine: Engine, prompts: list[list[int]], n: int = N_NEW
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and first-step full-vocab logits per prompt, the prompts staggered: one joins
    per step, so the running batch grows and then shrinks as they finish — every decode batch
    bucket change happens mid-stream (asserted when there is more than one prompt), and a prompt's
    prefill runs while others decode."""
    buckets: list[int] = []
    run = engine.executor.run

    def spy(spec, inputs):
        if spec.kind in (DECODE, SPECULATE):  # token generation or verify steps
            buckets.append(spec.batch)
        return run(spec, inputs)

    engine.executor.run = spy  # type: ignore[method-assign]
    try:
        todo = list(prompts)
        ids: list[str] = []
        tokens: dict[str, list[int]] = {}
        first: dict[str, torch.Tensor] = {}
        done: set[str] = set()
        while len(done) < len(prompts):
            if todo:
                p = todo.pop(0)
                ids.append(
                    engine.add_request(
                        Request(p, stopping=StoppingCriteria(max_new_tokens=n, ignore_eos=True))
                    )
                )
                tokens[ids[-1]] = []
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
                if out.logits and out.request_id not in first:
                    first[out.request_id] = out.logits[0]
                if out.finish_reason is not None:
                    done.add(out.request_id)
    finally:
        del engine.executor.run
    if len(prompts) > 1 and n > len(prompts):
        changes = sum(a != b for a, b in itertools.pairwise(buckets))
        assert changes >= 2, f"the decode batch bucket should grow and shrink mid-stream: {buckets}"
    return [tokens[i] for i in ids], [first.get(i) for i in ids]  # logits: with return_logits
