"""The static KV cache: per layer one K and one V tensor [max_batch + 1, KV_r, max_seq_len, D] (BHSD),
allocated once. A slot (row of dim 0) is one sequence; slot ``max_batch`` (``pad_slot``) belongs to no
sequence: the rows that pad a step up to its batch bucket read and write there, so padding never
touches a slot in use (one being prefilled chunk by chunk included). Token counts have the same rows.

Graph code touches the cache only through ``write`` and ``read``, so a backend can change how the
update happens: in place here (index_copy_), an out-of-place scatter aliased to the input on Neuron.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        num_layers: int,
        max_batch: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.num_layers, self.max_batch, self.max_seq_len = num_layers, max_batch, max_seq_len
        self.pad_slot = max_batch
        shape = (max_batch + 1, kv_heads, max_seq_len, head_dim)
        # one tensor per layer and per K/V: a single stacked cache makes compiled code copy it whole
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row of every (b, h, s) in the cache seen as [max_batch * KV_r * max_seq_len, D]: int64
        [B * KV_r * S]. The same for every layer and for K and V: build it once per step."""
        kv, seq = self.k0.shape[1], self.max_seq_len
        heads = torch.arange(kv, device=slots.device)[None, :, None]  # [1, KV_r, 1]
        return ((slots[:, None, None] * kv + heads) * seq + positions[:, None, :]).reshape(-1)

    def write(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> None:
        """k, v [B, KV_r, S, D] (any strides) go to cache[slots[b], :, positions[b, s]] (in place).
        ``index``: ``write_index(slots, positions)`` when the caller already has it."""
        kc, vc = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
        if index is None:
            index = self.write_index(slots, positions)
        d = kc.shape[-1]
        # one index_copy_ per tensor (an advanced-index assignment costs ~5x more dispatch here)
        kc.view(-1, d).index_copy_(0, index, k.reshape(-1, d).to(kc.dtype))
        vc.view(-1, d).index_copy_(0, index, v.reshape(-1, d).to(vc.dtype))

    def read(self, layer: int, kv_len: int, slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``kv_len`` positions: of slots 0..max_batch-1 (``slots`` None: a full-batch
        decode, row b is slot b) -> a view; or of ``slots`` -> [len(slots), KV_r, kv_len, D] (a
        gather: prefill rows and the smaller decode buckets)."""
        kc, vc = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
        if slots is None:
            return kc[: self.max_batch, :, :kv_len], vc[: self.max_batch, :, :kv_len]
        return kc[:, :, :kv_len].index_select(0, slots), vc[:, :, :kv_len].index_select(0, slots)

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()
