"""Weight-only int8 quantization at prepare time (serving int8 artifacts: tests/test_quantize_exec.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prep_service.api import PrepareRequest, PrepError
from prep_service.convert import prepare
from shared.layout import unshard
from shared.manifest import Manifest, shard_path
from shared.quantize import dequantize, quantizable, quantize_int8
from tests.helpers import canonical_from_hf, checkpoint_tensors, make_llama, read_config


def test_quantize_int8_round_trip() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 5, 64)
    w[1, 2] = 0  # an all-zero row (like a padded head)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (3, 5) and s.dtype == torch.float32
    assert q.abs().max() <= 127 and q[1, 2].abs().sum() == 0
    err = (dequantize(q, s) - w).abs()
    assert (err <= s[..., None] / 2 + 1e-7).all()  # at most half a step per element
    assert (q.abs().amax(dim=-1)[w.abs().amax(dim=-1) > 0] == 127).all()  # each row uses the full range


def test_what_is_quantized() -> None:
    assert quantizable("layers.3.attn.qkv.weight") and quantizable("layers.3.mlp.down.weight")
    assert quantizable("layers.3.moe.experts.gate_up") and quantizable("layers.0.moe.shared.gate_up.weight")
    assert not quantizable("embed.weight") and not quantizable("layers.0.input_norm.weight")
    assert not quantizable("layers.0.attn.qkv.bias") and not quantizable("layers.0.moe.router.weight")
    assert not quantizable("lm_head.weight") and quantizable("lm_head.weight", lm_head=True)


@pytest.mark.parametrize(("tp", "heads", "kv"), [(1, 8, 2), (2, 8, 2), (2, 9, 3)])
def test_prepare_int8_shards_hold_exact_quantized_weights(
    tmp_path: Path, tp: int, heads: int, kv: int
) -> None:
    make_llama(tmp_path / "ckpt", num_attention_heads=heads, num_key_value_heads=kv, hidden_size=8 * heads)
    out = f"file://{tmp_path}/store"
    plain = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=tp, output=out))
    res = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=tp, output=out, quantize="int8"))
    assert res.artifact_key != plain.artifact_key  # the scheme enters the artifact key
    root = Path(res.manifest_uri.removeprefix("file://")).parent
    man = Manifest.from_json((root / "manifest.json").read_bytes())
    assert man.target.quantization == "int8" and not man.target.quantized_lm_head
    shards = [load_file(root / shard_path(r, tp)) for r in range(tp)]
    canon = canonical_from_hf(checkpoint_tensors(tmp_path / "ckpt"), "llama", read_config(tmp_path / "ckpt"))
    for name, t in canon.items():
        if quantizable(name):
            q, s = quantize_int8(t)
            assert shards[0][name].dtype == torch.int8
            assert torch.equal(unshard(name, [sd[name] for sd in shards], man.architecture, man.target), q), (
                name
            )
            got_s = unshard(
                name + "_scale", [sd[name + "_scale"] for sd in shards], man.architecture, man.target
            )
            assert torch.equal(got_s, s), name
        else:
            assert shards[0][name].dtype == torch.float32
            assert torch.equal(unshard(name, [sd[name] for sd in shards], man.architecture, man.target), t), (
                name
            )
    if tp > 1:  # row-parallel weights keep whole-row scales on every rank
        assert torch.equal(
            shards[0]["layers.0.attn.o.weight_scale"], shards[1]["layers.0.attn.o.weight_scale"]
        )


def test_quantized_lm_head_with_tied_embeddings(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt", tie_word_embeddings=True)
    res = prepare(
        PrepareRequest(
            source=str(tmp_path / "ckpt"),
            output=f"file://{tmp_path}/store",
            quantize="int8",
            quantize_lm_head=True,
        )
    )
    sd = load_file(Path(res.manifest_uri.removeprefix("file://")).parent / shard_path(0, 1))
    assert sd["lm_head.weight"].dtype == torch.int8 and sd["embed.weight"].dtype == torch.float32
    q, s = quantize_int8(sd["embed.weight"])
    assert torch.equal(sd["lm_head.weight"], q) and torch.equal(sd["lm_head.weight_scale"], s)


def test_bad_quantize_requests(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="quantize must be 'int8'"):
        PrepareRequest(source="x", quantize="int4")
    with pytest.raises(PrepError, match="quantize_lm_head needs quantize"):
        PrepareRequest(source="x", quantize_lm_head=True)
    exe = Path(sys.executable).parent / "neuron-serve"
    out = subprocess.run(
        [str(exe), "prepare", str(tmp_path), "--quantize-lm-head"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "quantize_lm_head needs quantize" in out.stderr
