"""The static KV cache: per layer one K and one V tensor [max_batch, KV_r, max_seq_len, D] (BHSD),
allocated once. A slot (row of dim 0) is one sequence.

Graph code touches the cache only through ``write`` and ``read``, so a backend can change how the
update happens: in place here (index_put_), an out-of-place scatter aliased to the input on Neuron.
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
        shape = (max_batch, kv_heads, max_seq_len, head_dim)
        # one tensor per layer and per K/V: a single stacked cache makes compiled code copy it whole
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """k, v [B, KV_r, S, D] go to cache[slots[b], :, positions[b, s]] (in place)."""
        kc, vc = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
        rows = slots[:, None].expand_as(positions)  # [B, S]
        # advanced indices around a slice: the indexed value is laid out [B, S, KV_r, D]
        kc[rows, :, positions] = k.transpose(1, 2).to(kc.dtype)
        vc[rows, :, positions] = v.transpose(1, 2).to(vc.dtype)

    def read(self, layer: int, kv_len: int, slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``kv_len`` positions: of every slot (rows == slots, decode) -> a view, or of
        ``slots`` (prefill) -> [len(slots), KV_r, kv_len, D]."""
        kc, vc = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
        if slots is None:
            return kc[:, :, :kv_len], vc[:, :, :kv_len]
        return kc[:, :, :kv_len].index_select(0, slots), vc[:, :, :kv_len].index_select(0, slots)

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()
