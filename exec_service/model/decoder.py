"""ONE generic decoder for every family, switched only by the frozen ``Architecture`` (never by
``model_type``) and sized by the ``Target`` (per-rank head / vocab / intermediate sizes).

Shapes below: B batch rows, S tokens per row, K the KV length attended (a static bucket), H_r / KV_r
q / kv heads on this rank, D head_dim, V_r vocab per rank (padded vocab / tp).

Parameter names equal the canonical shard names (``shared.layout``), plus ``rank`` (int32 [1]).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from exec_service.model import rope as rope_mod
from exec_service.model.collectives import SINGLE, Collectives
from exec_service.model.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    ParallelSizeError,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
)
from shared.families.base import Architecture
from shared.layout import Target


class KVStore(Protocol):
    """What attention needs from the KV cache (``exec_service.runtime.kv_cache.KVCache``)."""

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> None: ...

    def read(
        self, layer: int, kv_len: int, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(dtype)
    return h if weight is None else weight * h


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(
        self, arch: Architecture, target: Target, layer: int, dtype: torch.dtype, comm: Collectives
    ) -> None:
        super().__init__()
        self.layer = layer
        self.h, self.kv, self.d = target.heads_per_rank, target.kv_heads_per_rank, arch.head_dim
        if self.h % self.kv != 0:
            raise ParallelSizeError(
                f"heads_per_rank ({self.h}) is not a multiple of kv_heads_per_rank ({self.kv})"
            )
        self.group = self.h // self.kv
        self.qkv = ColumnParallelLinear(
            arch.hidden_size, (self.h + 2 * self.kv) * self.d, arch.attention_bias, dtype
        )
        self.o = RowParallelLinear(self.h * self.d, arch.hidden_size, arch.o_bias, dtype, comm)
        self.qk_norm = arch.qk_norm
        self.qk_norm_before_rope = arch.qk_norm_before_rope
        self.eps = arch.rms_norm_eps
        if arch.qk_norm == "rms":  # learned per-head RMSNorm over D (Qwen3)
            self.q_norm = RMSNorm(self.d, arch.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.d, arch.rms_norm_eps, dtype)
        self.scale = arch.attention_multiplier if arch.attention_multiplier is not None else self.d**-0.5

    def _norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qk_norm == "rms":
            return self.q_norm(q), self.k_norm(k)
        if self.qk_norm == "l2":  # weightless (Llama4)
            return rms_norm(q, None, self.eps), rms_norm(k, None, self.eps)
        return q, k

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        cos: torch.Tensor,  # [B, 1, S, D]
        sin: torch.Tensor,
        positions: torch.Tensor,  # [B, S]
        slots: torch.Tensor,  # [B]
        mask: torch.Tensor,  # [B, S, K] bool: True = may attend
        cache: KVStore,
        gather_slots: bool,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        h, kv, d = self.h, self.kv, self.d
        q, k, v = self.qkv(x).split([h * d, kv * d, kv * d], dim=-1)
        q = q.view(b, s, h, d).transpose(1, 2)  # [B, H_r, S, D]
        k = k.view(b, s, kv, d).transpose(1, 2)  # [B, KV_r, S, D]
        v = v.view(b, s, kv, d).transpose(1, 2)
        if self.qk_norm_before_rope:
            q, k = self._norm(q, k)
        q, k = rope_mod.apply(q, cos, sin), rope_mod.apply(k, cos, sin)
        if not self.qk_norm_before_rope:
            q, k = self._norm(q, k)
        cache.write(self.layer, k, v, slots, positions)
        kc, vc = cache.read(self.layer, mask.shape[-1], slots if gather_slots else None)  # [B, KV_r, K, D]
        qg = q.reshape(b, kv, self.group, s, d)  # q heads grouped by their kv head
        scores = torch.matmul(qg, kc.unsqueeze(2).transpose(-1, -2)) * self.scale  # [B, KV_r, G, S, K]
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, vc.unsqueeze(2))  # [B, KV_r, G, S, D]
        out = out.reshape(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)
        return self.o(out)


class MLP(nn.Module):
    def __init__(self, arch: Architecture, target: Target, dtype: torch.dtype, comm: Collectives) -> None:
        super().__init__()
        i = target.intermediate_per_rank
        self.gate_up = ColumnParallelLinear(arch.hidden_size, 2 * i, arch.mlp_bias, dtype)  # [gate_r; up_r]
        self.down = RowParallelLinear(i, arch.hidden_size, arch.mlp_bias, dtype, comm)
        self.act = _ACTS[arch.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self, arch: Architecture, target: Target, layer: int, dtype: torch.dtype, comm: Collectives
    ) -> None:
        super().__init__()
        self.input_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.attn = Attention(arch, target, layer, dtype, comm)
        self.post_attn_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.mlp = MLP(arch, target, dtype, comm)
        self.residual_multiplier = arch.residual_multiplier

    def forward(self, x, cos, sin, positions, slots, mask, cache, gather_slots: bool) -> torch.Tensor:
        a = self.attn(self.input_norm(x), cos, sin, positions, slots, mask, cache, gather_slots)
        x = x + (a * self.residual_multiplier if self.residual_multiplier != 1.0 else a)
        m = self.mlp(self.post_attn_norm(x))
        return x + (m * self.residual_multiplier if self.residual_multiplier != 1.0 else m)


class DecoderModel(nn.Module):
    """One rank's decoder. ``forward`` returns this rank's logits of the selected tokens [B, V_r]
    (padded vocab entries are -inf); ``logits_scaling`` already applied."""

    def __init__(
        self,
        arch: Architecture,
        target: Target,
        dtype: torch.dtype = torch.float32,
        comm: Collectives = SINGLE,
    ) -> None:
        super().__init__()
        rope_mod.check_supported(arch)
        tp = target.tp_degree
        if comm.tp != tp:
            raise ValueError(f"collectives are for tp={comm.tp} but the target has tp_degree={tp}")
        divide(target.vocab_size_padded, tp, "padded vocab size")
        divide(target.num_heads_padded, tp, "padded q heads")
        divide(target.num_kv_heads_padded, tp, "padded kv heads")
        if target.intermediate_per_rank * tp != arch.intermediate_size:
            raise ParallelSizeError(
                f"intermediate_size ({arch.intermediate_size}) != intermediate_per_rank "
                f"({target.intermediate_per_rank}) x tp ({tp})"
            )
        self.arch, self.target, self.comm, self.dtype = arch, target, comm, dtype
        self.vocab_per_rank = target.vocab_per_rank
        self.embed = VocabParallelEmbedding(target.vocab_per_rank, arch.hidden_size, dtype, comm)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, target, i, dtype, comm) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(
            target.vocab_per_rank, arch.hidden_size, dtype, arch.tie_word_embeddings
        )
        # this rank's index as a tensor (DESIGN §5: never get_rank() inside a graph); loaded from the shard
        self.register_buffer("rank", torch.zeros(1, dtype=torch.int32))
        freq = rope_mod.inv_freq(arch.rope, arch.head_dim, arch.max_position_embeddings)
        self.register_buffer("inv_freq", freq, persistent=False)

    def vocab_offset(self) -> torch.Tensor:
        """Global id of this rank's first vocab entry, int64 [1]."""
        return self.rank.to(torch.int64) * self.vocab_per_rank

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        positions: torch.Tensor,  # [B, S] int64
        slots: torch.Tensor,  # [B] int64: cache slot of each row
        mask: torch.Tensor,  # [B, S, K] bool
        last_idx: torch.Tensor,  # [B] int64: which of the S tokens to produce logits for
        cache: KVStore,
        gather_slots: bool,
    ) -> torch.Tensor:
        x = self.embed(input_ids, self.rank)  # [B, S, hidden]
        if self.arch.embedding_multiplier != 1.0:
            x = x * self.arch.embedding_multiplier
        cos, sin = rope_mod.cos_sin(positions, self.inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, slots, mask, cache, gather_slots)
        idx = last_idx.view(-1, 1, 1).expand(-1, 1, x.shape[-1])
        x = self.norm(x.gather(1, idx)[:, 0])  # [B, hidden]
        w = self.embed.weight if self.arch.tie_word_embeddings else None
        logits = self.lm_head(x, w).float()  # [B, V_r]
        if self.arch.logits_scaling != 1.0:
            logits = logits / self.arch.logits_scaling
        gid = self.vocab_offset() + torch.arange(self.vocab_per_rank, device=logits.device)
        return logits.masked_fill((gid >= self.arch.vocab_size)[None], float("-inf"))
