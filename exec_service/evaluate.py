"""Quality evaluation of an artifact with the serving model code: perplexity of a token sequence.

The text is run as chunked prefills through the same ``DecoderModel`` and static KV cache the graphs
use, asking the model for the logits of every position of each chunk (``last_idx`` [1, N]); the
negative log-likelihood of each next token is accumulated in float64. Used by the int8 quality tests
(``tests/test_quantize_exec.py``) and ``bench/int8.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from exec_service.model.loading import ShardSource
from exec_service.runtime.graphs import make_mask
from exec_service.runtime.runner import Runner, RuntimeConfig


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens (len(ids) - 1)


@torch.no_grad()
def perplexity(
    source: ShardSource, ids: list[int], chunk: int = 256, int8_kernel: str = "auto"
) -> Perplexity:
    """Perplexity of ``ids`` (every token after the first predicted from all before it); tp 1."""
    if source.target.tp_degree != 1:
        raise ValueError(
            f"perplexity runs one rank: prepare the artifact with tp 1 (got {source.target.tp_degree})"
        )
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    n_chunks = math.ceil(len(ids) / chunk)
    config = RuntimeConfig(
        max_batch_size=1,
        max_seq_len=n_chunks * chunk,
        context_buckets=(chunk,),
        kv_buckets=(n_chunks * chunk,),
        int8_kernel=int8_kernel,
    )
    runner = Runner(source.arch, source.target, source.load(0), config)
    model, vocab = runner.model, source.arch.vocab_size
    slots = torch.zeros(1, dtype=torch.long)
    total, count = 0.0, 0
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        n = len(piece)
        inp = torch.tensor([piece + [0] * (chunk - n)])
        positions = torch.arange(start, start + chunk)[None]
        mask = make_mask(positions, config.max_seq_len)
        last_idx = torch.arange(chunk)[None]  # every position's logits: [1, chunk, V]
        logits = model(inp, positions, slots, mask, last_idx, runner.cache, False)[0, :n, :vocab]
        targets = torch.tensor(ids[start + 1 : start + n + 1])  # the next token of each position
        logp = torch.log_softmax(logits[: len(targets)].double(), dim=-1)
        total -= float(logp.gather(1, targets[:, None]).sum())
        count += len(targets)
    nll = total / count
    return Perplexity(math.exp(nll), nll, count)
