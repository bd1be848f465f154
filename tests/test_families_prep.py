"""Every family's checkpoint prepares (all tensors used, every shape as config.json implies) and
its shards unshard to the family's conversion of the HF weights; the fusions are the HF maths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from shared.layout import unshard
from shared.manifest import Manifest, shard_path
from tests.family_configs import FAMILIES, make_family_model, save_llama4_multimodal
from tests.helpers import canonical_from_hf, checkpoint_tensors, read_config


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tp", [1, 2])
def test_family_prepares_and_round_trips(tmp_path: Path, family: str, tp: int) -> None:
    model = make_family_model(family)
    model.save_pretrained(tmp_path / "ckpt")
    res = prepare(
        PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=tp, output=f"file://{tmp_path}/store")
    )
    root = Path(res.manifest_uri.removeprefix("file://")).parent
    man = Manifest.from_json((root / "manifest.json").read_bytes())
    assert man.family == family
    shards = [load_file(root / shard_path(r, tp)) for r in range(tp)]
    cfg = read_config(tmp_path / "ckpt")
    expected = canonical_from_hf(checkpoint_tensors(tmp_path / "ckpt"), family, cfg)
    assert set(shards[0]) == set(expected) | {"rank"}
    for name, t in expected.items():
        assert torch.equal(unshard(name, [s[name] for s in shards], man.architecture, man.target), t), name


def test_phi3_fused_tensors_are_taken_as_is() -> None:
    model = make_family_model("phi3")
    sd = model.state_dict()
    conv = canonical_from_hf(sd, "phi3", model.config.to_dict())
    assert torch.equal(conv["layers.0.attn.qkv.weight"], sd["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.equal(conv["layers.0.mlp.gate_up.weight"], sd["model.layers.0.mlp.gate_up_proj.weight"])


def test_moe_experts_are_stacked_gate_then_up(tmp_path: Path) -> None:
    model = make_family_model("mixtral")
    model.save_pretrained(tmp_path)
    sd = checkpoint_tensors(tmp_path)
    conv = canonical_from_hf(sd, "mixtral", model.config.to_dict())
    gu = conv["layers.1.moe.experts.gate_up"]
    assert gu.shape == (4, 256, 64)
    w1, w3 = (
        sd["model.layers.1.block_sparse_moe.experts.2.w1.weight"],
        sd["model.layers.1.block_sparse_moe.experts.2.w3.weight"],
    )
    assert torch.equal(gu[2], torch.cat([w1, w3]))


def test_qwen3_moe_layer_selection() -> None:
    from shared.families import REGISTRY

    arch = REGISTRY["qwen3_moe"].arch_from_hf(make_family_model("qwen3_moe").config.to_dict())
    assert arch.moe is not None and arch.moe.moe_layers == (0, 2) and arch.moe.norm_topk_prob
    arch2 = REGISTRY["qwen3_moe"].arch_from_hf(
        {**make_family_model("qwen3_moe").config.to_dict(), "decoder_sparse_step": 2, "mlp_only_layers": []}
    )
    assert arch2.moe is not None and arch2.moe.moe_layers == (1,)


def test_llama4_conditional_generation_checkpoint(tmp_path: Path) -> None:
    """The language_model part of a Llama4ForConditionalGeneration checkpoint prepares like the
    text-only one; the vision tower is ignored."""

    text = make_family_model("llama4")
    save_llama4_multimodal(text, tmp_path / "mm")
    text.save_pretrained(tmp_path / "text")
    out = f"file://{tmp_path}/store"
    res = prepare(PrepareRequest(source=str(tmp_path / "mm"), output=out))
    ref = prepare(PrepareRequest(source=str(tmp_path / "text"), output=out))
    man = Manifest.from_json(Path(res.manifest_uri.removeprefix("file://")).read_bytes())
    assert man.family == "llama4" and man.architecture.nope_layers == (3,)
    assert man.architecture.chunked_layers == (0, 1, 2) and man.architecture.moe.moe_layers == (1, 3)
    got = load_file(Path(res.manifest_uri.removeprefix("file://")).parent / shard_path(0, 1))
    want = load_file(Path(ref.manifest_uri.removeprefix("file://")).parent / shard_path(0, 1))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
