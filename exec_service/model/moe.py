"""Mixture-of-experts block for the generic decoder, switched by ``Architecture.moe`` (MoEConfig).

Routers (replicated on every rank):
* ``softmax`` (Mixtral, Qwen3-MoE): softmax over all expert logits (fp32), top-k, renormalised to
  sum 1 iff ``norm_topk_prob``; the expert OUTPUT is weighted.
* ``sigmoid`` (Llama4): top-k of the raw logits, sigmoid of those (the others -inf -> 0); with
  ``router_applied_to_input`` the expert INPUT is scaled by the weight instead.

Static-shape formulation: every expert runs on every token (one batched matmul over the expert dim)
and unselected experts get weight 0 (or input 0, which gives output 0: experts carry no bias). This
is exact and traceable but costs E/top_k times the FLOPs of a sparse dispatch: right for the tiny
test models and for decode-sized batches, not tuned for large prefills.

int8 (``Target.quantization``): expert and shared-expert weights are int8 with per-output-channel
float32 scales (``experts.gate_up_scale`` [E, 2 I_r], ``shared.gate_up.weight_scale`` ...); the scale
factors out of each matmul, ``(x q^T) * scale``, so the weights are converted, never dequantized
into a stored copy.

Tensor parallelism: experts are sharded on their intermediate dim (every rank holds every expert's
slice: gate_up [E, 2 I_r, H] as [gate_r; up_r], down [E, H, I_r]); the shared expert likewise. Each
rank's partial output (routed + shared) is summed by ONE all-reduce, as a row-parallel layer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exec_service.model.collectives import Collectives
from exec_service.model.layers import ACTIVATIONS, zeros_param
from exec_service.model.parallel import divide
from shared.families.base import Architecture, MoEConfig
from shared.layout import Target


class Router(nn.Module):
    def __init__(self, hidden: int, moe: MoEConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = zeros_param(moe.num_experts, hidden, dtype=dtype)  # [E, hidden], replicated
        self.kind, self.top_k, self.norm_topk_prob = moe.router, moe.top_k, moe.norm_topk_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> dense routing weights [T, E] (0 for experts not in the top-k).
        softmax: fp32; sigmoid: in x's dtype (as transformers' Llama4Router returns them)."""
        logits = F.linear(x, self.weight)  # [T, E]
        if self.kind == "softmax":
            probs = torch.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
            if self.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return torch.zeros_like(probs).scatter(1, idx, top)
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.full_like(logits, float("-inf")).scatter(1, idx, top)
        return torch.sigmoid(scores.float()).to(logits.dtype)


class Experts(nn.Module):
    def __init__(
        self, hidden: int, num_experts: int, inter_r: int, dtype: torch.dtype, quantized: bool = False
    ) -> None:
        super().__init__()
        wdt = torch.int8 if quantized else dtype
        self.gate_up = zeros_param(num_experts, 2 * inter_r, hidden, dtype=wdt)  # [E, 2 I_r, H]
        self.down = zeros_param(num_experts, hidden, inter_r, dtype=wdt)  # [E, H, I_r]
        self.gate_up_scale = zeros_param(num_experts, 2 * inter_r, dtype=torch.float32) if quantized else None
        self.down_scale = zeros_param(num_experts, hidden, dtype=torch.float32) if quantized else None


def _weight(out: int, inp: int, dtype: torch.dtype, quantized: bool) -> nn.Module:
    m = nn.Module()
    m.weight = zeros_param(out, inp, dtype=torch.int8 if quantized else dtype)
    m.weight_scale = zeros_param(out, dtype=torch.float32) if quantized else None
    return m


class SharedExpert(nn.Module):
    """A dense gated MLP whose down projection is NOT reduced here (the MoE block reduces once)."""

    def __init__(self, hidden: int, inter_r: int, dtype: torch.dtype, quantized: bool = False) -> None:
        super().__init__()
        self.gate_up = _weight(2 * inter_r, hidden, dtype, quantized)  # [gate_r; up_r]
        self.down = _weight(hidden, inter_r, dtype, quantized)


def _matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T for W [.., out, in] (scale None) or int8 W with float32 scales [.., out]."""
    if scale is None:
        return torch.matmul(x, w.transpose(-1, -2))
    return torch.matmul(x, w.to(x.dtype).transpose(-1, -2)) * scale.to(x.dtype).unsqueeze(-2)


class MoE(nn.Module):
    """Parameter names: ``router.weight``, ``experts.gate_up``, ``experts.down`` and, with a shared
    expert, ``shared.gate_up.weight`` / ``shared.down.weight`` (see shared/layout.py)."""

    def __init__(self, arch: Architecture, target: Target, dtype: torch.dtype, comm: Collectives) -> None:
        super().__init__()
        moe = arch.moe
        assert moe is not None
        tp = target.tp_degree
        if target.moe_intermediate_per_rank * tp != moe.intermediate_size:
            raise ValueError(
                f"moe intermediate_size ({moe.intermediate_size}) != moe_intermediate_per_rank "
                f"({target.moe_intermediate_per_rank}) x tp ({tp})"
            )
        if moe.router not in ("softmax", "sigmoid"):
            raise NotImplementedError(f"MoEConfig.router={moe.router!r} is not implemented")
        h = arch.hidden_size
        quantized = target.quantization is not None
        self.router = Router(h, moe, dtype)
        self.experts = Experts(h, moe.num_experts, target.moe_intermediate_per_rank, dtype, quantized)
        self.shared = None
        if moe.shared_expert_intermediate_size:
            si = divide(moe.shared_expert_intermediate_size, tp, "shared expert intermediate_size")
            self.shared = SharedExpert(h, si, dtype, quantized)
        self.scale_input = moe.router_applied_to_input
        self.act = ACTIVATIONS[arch.hidden_act]
        self.comm = comm

    def _mlp(self, x: torch.Tensor, gate_up, down) -> torch.Tensor:
        """``gate_up`` / ``down``: (weight, scale or None)."""
        gate, up = _matmul(x, *gate_up).chunk(2, dim=-1)
        return _matmul(self.act(gate) * up, *down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        t = x.reshape(-1, shape[-1])  # [T, H]
        w = self.router(t)  # [T, E]
        ex = self.experts
        experts = ((ex.gate_up, ex.gate_up_scale), (ex.down, ex.down_scale))
        if self.scale_input:  # Llama4: expert_e(x * w_e); unselected experts see 0 and output 0
            xin = t[None] * w.t()[:, :, None].to(t.dtype)  # [E, T, H]
            out = self._mlp(xin, *experts).sum(0)  # [T, H]
        else:  # Mixtral / Qwen3-MoE: sum_e w_e * expert_e(x), weights in fp32
            y = self._mlp(t[None], *experts)  # [E, T, H]
            out = (y * w.t()[:, :, None]).sum(0).to(t.dtype)
        if self.shared is not None:
            sh = self.shared
            out = (
                self._mlp(
                    t, (sh.gate_up.weight, sh.gate_up.weight_scale), (sh.down.weight, sh.down.weight_scale)
                )
                + out
            )
        return self.comm.all_reduce(out).reshape(shape)
