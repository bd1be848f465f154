"""The sharded math is right: one Llama decoder layer computed from the rank shards a real
``prepare`` wrote (row-parallel partials summed, as an all-reduce would) equals transformers'
``LlamaDecoderLayer`` on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from shared.manifest import Manifest, shard_path
from tests.helpers import make_llama


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, h, S, D]; cos/sin [B, S, D]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _sharded_layer(shards: list[dict], man: Manifest, x: torch.Tensor, cos, sin, layer: int) -> torch.Tensor:
    arch, t = man.architecture, man.target
    d, hq, hkv = arch.head_dim, t.heads_per_rank, t.kv_heads_per_rank
    b, s, _ = x.shape
    p = f"layers.{layer}."
    causal = torch.full((s, s), float("-inf")).triu(1)
    attn_out = torch.zeros_like(x)
    for sd in shards:
        h = _rms(x, sd[p + "input_norm.weight"], arch.rms_norm_eps)
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).split([hq * d, hkv * d, hkv * d], dim=-1)
        q = _rope(q.view(b, s, hq, d).transpose(1, 2), cos, sin)  # [B, hq, S, D]
        k = _rope(k.view(b, s, hkv, d).transpose(1, 2), cos, sin)
        v = v.view(b, s, hkv, d).transpose(1, 2)
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        w = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + causal, dim=-1)
        o = (w @ v).transpose(1, 2).reshape(b, s, hq * d)
        attn_out += o @ sd[p + "attn.o.weight"].T  # row-parallel partial; summed = all-reduce
    x = x + attn_out
    mlp_out = torch.zeros_like(x)
    for sd in shards:
        h = _rms(x, sd[p + "post_attn_norm.weight"], arch.rms_norm_eps)
        gate, up = (h @ sd[p + "mlp.gate_up.weight"].T).chunk(2, dim=-1)
        mlp_out += (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down.weight"].T
    return x + mlp_out


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "strategy", "expected"),
    [
        (8, 2, 4, None, "replicate_to_tp_degree"),
        (8, 2, 4, "convert_to_mha", "convert_to_mha"),
        (9, 3, 2, None, "convert_to_mha"),
        (6, 2, 4, "replicate_to_tp_degree", "replicate_to_tp_degree"),
        (8, 2, 2, None, "none"),
    ],
)
def test_decoder_layer_from_shards_matches_transformers(
    tmp_path: Path, heads, kv, tp, strategy, expected
) -> None:
    model = make_llama(
        tmp_path / "ckpt", num_attention_heads=heads, num_key_value_heads=kv, hidden_size=8 * heads
    )
    res = prepare(
        PrepareRequest(
            source=str(tmp_path / "ckpt"),
            tp_degree=tp,
            gqa_strategy=strategy,
            output=f"file://{tmp_path}/store",
        )
    )
    root = Path(res.manifest_uri.removeprefix("file://")).parent
    man = Manifest.from_json((root / "manifest.json").read_bytes())
    assert man.target.gqa_strategy == expected
    shards = [load_file(root / shard_path(r, tp)) for r in range(tp)]
    assert [int(sd["rank"][0]) for sd in shards] == list(range(tp))

    torch.manual_seed(1)
    x = torch.randn(2, 7, 8 * heads)
    pos = torch.arange(7)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None].expand(2, 1, 7, 7)
    for layer in range(2):
        with torch.no_grad():
            ref = model.model.layers[layer](x, attention_mask=mask, position_embeddings=(cos, sin))
            ref = ref[0] if isinstance(ref, tuple) else ref
            got = _sharded_layer(shards, man, x, cos, sin, layer)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
