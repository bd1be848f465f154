"""Shard -> unshard round trips of the generic sharder, and the GQA head plans."""

from __future__ import annotations

import pytest
import torch

from shared.families import REGISTRY
from shared.layout import MHA, NONE, REPLICATE, LayoutError, make_target, plan_heads, shard, unshard
from tests.helpers import TINY_LLAMA, canonical_from_hf, llama_config

CASES = [
    # (heads, kv, tp, strategy requested, strategy expected)
    (8, 2, 1, None, NONE),
    (8, 2, 2, None, NONE),
    (8, 2, 4, None, REPLICATE),
    (8, 2, 4, REPLICATE, REPLICATE),
    (8, 2, 4, MHA, MHA),
    (9, 3, 2, None, MHA),
    (9, 3, 2, MHA, MHA),
    (6, 2, 4, None, REPLICATE),  # group of 3 q heads padded to 4 over 2 ranks
    (8, 8, 4, None, NONE),
]


def _arch_and_tensors(heads: int, kv: int, vocab: int = 101, tie: bool = False):
    from transformers import LlamaForCausalLM

    cfg = llama_config(
        num_attention_heads=heads,
        num_key_value_heads=kv,
        hidden_size=8 * heads,
        vocab_size=vocab,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = cfg.to_dict()
    arch = REGISTRY["llama"].arch_from_hf(d)
    return arch, canonical_from_hf(model.state_dict(), "llama", d)


@pytest.mark.parametrize(("heads", "kv", "tp", "requested", "expected"), CASES)
def test_round_trip(heads: int, kv: int, tp: int, requested: str | None, expected: str) -> None:
    arch, tensors = _arch_and_tensors(heads, kv)
    target = make_target(arch, tp, "float32", requested)
    assert target.gqa_strategy == expected
    for name, t in tensors.items():
        shards = shard(name, t, arch, target)
        assert len(shards) == tp
        assert len({tuple(s.shape) for s in shards}) == 1, f"{name}: ranks differ in shape"
        assert all(s.is_contiguous() for s in shards)
        back = unshard(name, shards, arch, target)
        assert back.dtype == t.dtype
        assert torch.equal(back, t), f"{name}: round trip differs at tp={tp} ({expected})"


@pytest.mark.parametrize(("heads", "kv", "tp", "requested", "expected"), CASES)
def test_padding_is_zero_and_shapes_match_target(heads, kv, tp, requested, expected) -> None:
    arch, tensors = _arch_and_tensors(heads, kv)
    t = make_target(arch, tp, "float32", requested)
    d = arch.head_dim
    qkv = shard("layers.0.attn.qkv.weight", tensors["layers.0.attn.qkv.weight"], arch, t)
    o = shard("layers.0.attn.o.weight", tensors["layers.0.attn.o.weight"], arch, t)
    assert qkv[0].shape[0] == (t.heads_per_rank + 2 * t.kv_heads_per_rank) * d
    assert o[0].shape[1] == t.heads_per_rank * d
    # padded q heads are zero rows in qkv and zero columns in o
    for pos, src in enumerate(t.q_map):
        r, i = divmod(pos, t.heads_per_rank)
        rows = qkv[r][i * d : (i + 1) * d]
        cols = o[r][:, i * d : (i + 1) * d]
        if src < 0:
            assert not rows.any() and not cols.any()
        else:
            assert rows.abs().sum() > 0
    # the kv head a local q head attends is the one its group maps to
    ratio = t.heads_per_rank // t.kv_heads_per_rank
    g = heads // kv
    for pos, src in enumerate(t.q_map):
        if src < 0:
            continue
        r, i = divmod(pos, t.heads_per_rank)
        kv_pos = r * t.kv_heads_per_rank + i // ratio
        assert t.kv_map[kv_pos] == src // g


def test_vocab_padding() -> None:
    arch, tensors = _arch_and_tensors(8, 2, vocab=101)
    t = make_target(arch, 4, "float32")
    assert t.vocab_size_padded == 104 and t.vocab_per_rank == 26
    parts = shard("lm_head.weight", tensors["lm_head.weight"], arch, t)
    assert not parts[-1][-3:].any()
    assert torch.equal(unshard("lm_head.weight", parts, arch, t), tensors["lm_head.weight"])


def test_tied_embeddings_have_no_lm_head() -> None:
    _, tensors = _arch_and_tensors(8, 2, tie=True)
    assert "lm_head.weight" not in tensors and "embed.weight" in tensors


def test_bad_tp_rejected() -> None:
    arch, _ = _arch_and_tensors(9, 3)
    with pytest.raises(LayoutError, match="multiple of num_key_value_heads"):
        make_target(arch, 2, "float32", REPLICATE)
    with pytest.raises(LayoutError, match="intermediate_size"):
        make_target(arch, 3, "float32")  # 128 % 3 != 0


def test_plan_heads_explicit_none_checks_divisibility() -> None:
    with pytest.raises(LayoutError):
        plan_heads(9, 3, 2, NONE)
    assert TINY_LLAMA["num_attention_heads"] == 8
