"""Small pieces shared by the dense decoder (``decoder.py``) and the MoE block (``moe.py``): the
activation table, RMSNorm, the additive attention mask and the zero-initialised frozen parameter.

Neither of those modules imports the other for these; both import this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Architecture.hidden_act -> the function (the names transformers' ACT2FN uses)
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def zeros_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """A frozen parameter of zeros: a placeholder of the right shape and dtype, filled by loading."""
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype."""
    dtype = x.dtype
    if dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        # one call to torch's composite (pow, mean, add, rsqrt, mul, mul: transformers' ops in the
        # same order, so bit-identical in fp32) instead of ~8 Python-dispatched ops
        return F.rms_norm(x, x.shape[-1:], weight, eps)
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


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S, K] bool (True = may attend) -> [B, 1, S, K] 0 / -inf, what SDPA adds to the scores
    (built once per step rather than converted by SDPA in every layer)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))[:, None]
