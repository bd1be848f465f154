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
from exec_service.model.layers import ACTIVATIONS, RMSNorm, additive_mask, rms_norm
from exec_service.model.moe import MoE
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

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None: ...

    def write(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> None: ...

    def read(
        self, layer: int, kv_len: int, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


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
        int8 = target.quantization is not None
        self.qkv = ColumnParallelLinear(
            arch.hidden_size, (self.h + 2 * self.kv) * self.d, arch.attention_bias, dtype, int8
        )
        self.o = RowParallelLinear(self.h * self.d, arch.hidden_size, arch.o_bias, dtype, comm, int8)
        self.qk_norm = arch.qk_norm
        self.qk_norm_before_rope = arch.qk_norm_before_rope
        self.eps = arch.rms_norm_eps
        if arch.qk_norm == "rms":  # learned per-head RMSNorm over D (Qwen3)
            self.q_norm = RMSNorm(self.d, arch.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.d, arch.rms_norm_eps, dtype)
        self.scale = arch.attention_multiplier if arch.attention_multiplier is not None else self.d**-0.5
        # NoPE layers (Llama4): no RoPE and no weightless L2 q/k norm; temperature tuning instead
        self.use_rope = layer not in arch.nope_layers
        if not self.use_rope and self.qk_norm == "l2":
            self.qk_norm = "none"
        self.temperature_tuning = arch.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = arch.floor_scale, arch.attn_scale
        # nothing between the projection and RoPE: rotate q and k heads together, in one set of ops
        self.rope_qk_together = self.use_rope and self.qk_norm == "none"
        # the mask is plain causal whenever K == S (see ``forward``) unless windows or chunks cut it
        self.may_be_causal = arch.sliding_window is None and layer not in arch.chunked_layers

    def _norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qk_norm == "rms":
            return self.q_norm(q), self.k_norm(k)
        if self.qk_norm == "l2":  # weightless (Llama4)
            return rms_norm(q, None, self.eps), rms_norm(k, None, self.eps)
        return q, k

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        cos: torch.Tensor,  # [B, S, 1, R] (DecoderModel.rotary)
        sin: torch.Tensor,  # [B, S, 1, R], sign-folded (rope.fold_sign)
        positions: torch.Tensor,  # [B, S]
        slots: torch.Tensor,  # [B]
        mask: torch.Tensor,  # [B, S, K] bool (True = may attend) or [B, 1, S, K] additive (0 / -inf)
        cache: KVStore,
        gather_slots: bool,
        kv_index: torch.Tensor | None = None,  # cache.write_index(slots, positions), once per step
    ) -> torch.Tensor:
        b, s, _ = x.shape
        h, kv, d = self.h, self.kv, self.d
        qkv = self.qkv(x).view(b, s, h + 2 * kv, d)  # heads stay in [B, S, heads, D] until attention
        v = qkv[:, :, h + kv :]  # [B, S, KV_r, D]
        if self.rope_qk_together:
            qk = rope_mod.apply(qkv[:, :, : h + kv], cos, sin)  # [B, S, H_r + KV_r, D]
            q, k = qk[:, :, :h], qk[:, :, h:]
        else:
            q, k = qkv[:, :, :h], qkv[:, :, h : h + kv]
            if self.qk_norm_before_rope:
                q, k = self._norm(q, k)
            if self.use_rope:
                q, k = rope_mod.apply(q, cos, sin), rope_mod.apply(k, cos, sin)
            if not self.qk_norm_before_rope:
                q, k = self._norm(q, k)
        if self.temperature_tuning:  # q *= log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1 (fp32)
            t = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * t[:, :, None, None]).to(q.dtype)  # [B, S, H_r, D] * [B, S, 1, 1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D] views
        cache.write(self.layer, k, v, slots, positions, kv_index)
        kv_len = mask.shape[-1]
        kc, vc = cache.read(self.layer, kv_len, slots if gather_slots else None)  # [B, KV_r, K, D]
        # SDPA's fused CPU kernel for prefill and decode alike: one op instead of two matmuls, scale,
        # mask and softmax (each its own OpenMP region). K == S only for a first chunk (positions
        # 0..S-1 in a KV bucket of exactly S), whose mask is causal: ``is_causal`` lets the flash
        # kernel skip the blocks above the diagonal. A static (shape) choice, not a data-dependent one.
        if s == kv_len and self.may_be_causal:
            out = F.scaled_dot_product_attention(
                q, kc, vc, is_causal=True, scale=self.scale, enable_gqa=self.group > 1
            )
        else:
            bias = additive_mask(mask, q.dtype) if mask.dtype == torch.bool else mask
            out = F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=bias, scale=self.scale, enable_gqa=self.group > 1
            )  # [B, H_r, S, D]
        return self.o(out.transpose(1, 2).reshape(b, s, h * d))


class MLP(nn.Module):
    def __init__(self, arch: Architecture, target: Target, dtype: torch.dtype, comm: Collectives) -> None:
        super().__init__()
        i = target.intermediate_per_rank
        int8 = target.quantization is not None
        self.gate_up = ColumnParallelLinear(
            arch.hidden_size, 2 * i, arch.mlp_bias, dtype, int8
        )  # [gate_r; up_r]
        self.down = RowParallelLinear(i, arch.hidden_size, arch.mlp_bias, dtype, comm, int8)
        self.act = ACTIVATIONS[arch.hidden_act]

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
        # MoE layers (per MoEConfig.moe_layers) hold ``moe``, the others a dense ``mlp``
        self.mlp = None if arch.is_moe_layer(layer) else MLP(arch, target, dtype, comm)
        self.moe = MoE(arch, target, dtype, comm) if arch.is_moe_layer(layer) else None
        self.residual_multiplier = arch.residual_multiplier
        self.chunked = layer in arch.chunked_layers  # picks the chunked mask (see DecoderModel.masks)

    def forward(
        self, x, cos, sin, positions, slots, mask, cache, gather_slots: bool, kv_index=None
    ) -> torch.Tensor:
        a = self.attn(self.input_norm(x), cos, sin, positions, slots, mask, cache, gather_slots, kv_index)
        x = x + (a * self.residual_multiplier if self.residual_multiplier != 1.0 else a)
        h = self.post_attn_norm(x)
        m = self.mlp(h) if self.moe is None else self.moe(h)
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
        # a quantized LM head (--quantize-lm-head) is its own int8 tensor even when tied
        self.tied_lm_head = arch.tie_word_embeddings and not target.quantized_lm_head
        self.lm_head = ParallelLMHead(
            target.vocab_per_rank, arch.hidden_size, dtype, self.tied_lm_head, target.quantized_lm_head
        )
        # this rank's index as a tensor (DESIGN §5: never get_rank() inside a graph); loaded from the shard
        self.register_buffer("rank", torch.zeros(1, dtype=torch.int32))
        freq = rope_mod.inv_freq(arch.rope, arch.head_dim, arch.max_position_embeddings)
        self.register_buffer("inv_freq", freq, persistent=False)
        self.rope_scaling = rope_mod.attention_scaling(arch.rope, arch.max_position_embeddings)
        self.longrope = arch.rope.kind == "longrope"
        if self.longrope:  # both tables kept; each row picks by its sequence length (rope.py)
            long = rope_mod.longrope_freqs(arch.rope, arch.head_dim)[1]
            self.register_buffer("inv_freq_long", long, persistent=False)
            self.rope_original_max = arch.rope.original_max_position_embeddings
        # dynamic: rows longer than max_position_embeddings compute their own table (rope.py)
        self.dynamic = arch.rope.kind == "dynamic"

    def rotary(
        self, positions: torch.Tensor, last_idx: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sign-folded sin (``rope.fold_sign``) [B, S, 1, R]. A row's sequence length is the
        position of its last selected token + 1 (transformers: max(position_ids) + 1), and the
        length-dependent kinds choose per row by a tensor condition on it:
        longrope: above original_max_position_embeddings the long table, else the short one;
        dynamic: above max_position_embeddings the row's own NTK-rescaled table, else the original."""
        if self.longrope or self.dynamic:
            last = last_idx.view(positions.shape[0], -1)[:, -1:]  # [B, 1] (the last selected token)
            seq_len = positions.gather(1, last) + 1  # [B, 1]
        if self.dynamic:
            arch = self.arch
            grown = rope_mod.dynamic_freqs(arch.rope, arch.head_dim, arch.max_position_embeddings, seq_len)
            freq = torch.where(seq_len > arch.max_position_embeddings, grown, self.inv_freq)  # [B, R/2]
            cos, sin = rope_mod.cos_sin(positions, freq[:, None], dtype, self.rope_scaling)
        else:
            cos, sin = rope_mod.cos_sin(positions, self.inv_freq, dtype, self.rope_scaling)
        if self.longrope:
            cos_l, sin_l = rope_mod.cos_sin(positions, self.inv_freq_long, dtype, self.rope_scaling)
            long = (seq_len > self.rope_original_max).view(-1, 1, 1, 1)
            cos, sin = torch.where(long, cos_l, cos), torch.where(long, sin_l, sin)
        return cos, rope_mod.fold_sign(sin)

    def masks(self, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, chunked) [B, S, K] bool from the causal ``mask``. Cache index j holds position j of
        its slot, so key positions are arange(K). sliding_window: also j > pos - window (every
        layer); attention_chunk_size C: also j // C == pos // C (on ``chunked_layers`` only)."""
        j = torch.arange(mask.shape[-1], device=mask.device)[None, None]  # [1, 1, K]
        pos = positions[:, :, None]  # [B, S, 1]
        if self.arch.sliding_window is not None:
            mask = mask & (j > pos - self.arch.sliding_window)
        chunked = mask
        if self.arch.attention_chunk_size is not None and self.arch.chunked_layers:
            c = self.arch.attention_chunk_size
            # key indices and positions are >= 0, where truncation is floor; "trunc" lowers to an
            # integer division, "floor" to f64 arithmetic (torch-mlir), which Neuron narrows to f32
            same_chunk = torch.div(j, c, rounding_mode="trunc") == torch.div(pos, c, rounding_mode="trunc")
            chunked = mask & same_chunk
        return mask, chunked

    def vocab_offset(self) -> torch.Tensor:
        """Global id of this rank's first vocab entry, int64 [1]."""
        return self.rank.to(torch.int64) * self.vocab_per_rank

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        positions: torch.Tensor,  # [B, S] int64
        slots: torch.Tensor,  # [B] int64: cache slot of each row
        mask: torch.Tensor,  # [B, S, K] bool
        last_idx: torch.Tensor,  # [B] int64: which of the S tokens to produce logits for (or [B, N]:
        # N tokens per row, logits [B, N, V_r] — evaluation, e.g. perplexity; not a serving graph)
        cache: KVStore,
        gather_slots: bool,
    ) -> torch.Tensor:
        x = self.embed(input_ids, self.rank)  # [B, S, hidden]
        if self.arch.embedding_multiplier != 1.0:
            x = x * self.arch.embedding_multiplier
        cos, sin = self.rotary(positions, last_idx, x.dtype)
        full, chunked = self.masks(positions, mask)
        # per step, not per layer: the additive masks and the cache's scatter index
        same = chunked is full
        full = additive_mask(full, x.dtype)
        chunked = full if same else additive_mask(chunked, x.dtype)
        kv_index = cache.write_index(slots, positions)
        for layer in self.layers:
            m = chunked if layer.chunked else full
            x = layer(x, cos, sin, positions, slots, m, cache, gather_slots, kv_index)
        if x.shape[1] > 1 or last_idx.dim() > 1:  # decode: the one row is the selected one
            idx = last_idx.view(x.shape[0], -1, 1).expand(-1, -1, x.shape[-1])  # [B, N, hidden]
            x = x.gather(1, idx)
        x = self.norm(x)
        if last_idx.dim() == 1:
            x = x[:, 0]  # [B, hidden]
        w = self.embed.weight if self.tied_lm_head else None
        logits = self.lm_head(x, w)  # [B, V_r] (or [B, N, V_r])
        if logits.dtype != torch.float32:
            logits = logits.float()
        if self.arch.logits_scaling != 1.0:
            logits = logits / self.arch.logits_scaling
        if self.target.vocab_size_padded == self.arch.vocab_size:  # no padded entries on any rank
            return logits
        gid = self.vocab_offset() + torch.arange(self.vocab_per_rank, device=logits.device)
        return logits.masked_fill((gid >= self.arch.vocab_size)[None], float("-inf"))
