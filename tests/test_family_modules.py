"""Per-module parity for every family case (tests/family_exec.py): our attention (with its rotary,
q/k norm, NoPE / temperature tuning, chunked / sliding masks), MLP or MoE block, and whole decoder
layer against the HF module on the same weights and the same random input, fp32.

The HF modules are called with the position embeddings and masks transformers itself builds (captured
by a pre-hook during a forward of ``S`` tokens); only ``hidden_states`` is replaced by random input.
S = 20 (below Phi-3's original_max 32: short factors) and 40 (long factors; > Llama4's chunk 16).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exec_service.model.decoder import DecoderModel
from exec_service.model.loading import load_strict, shards_from_hf_state_dict
from exec_service.model.moe import MoE
from exec_service.runtime.graphs import make_mask
from exec_service.runtime.kv_cache import KVCache
from shared.families import family_for_config
from shared.layout import make_target
from tests.family_configs import make_family_model
from tests.family_exec import CASES
from tests.helpers import checkpoint_tensors, read_config

ATOL = 1e-5


class _Built:
    def __init__(self, name: str, root: Path) -> None:
        family, overrides = CASES[name]
        self.hf = make_family_model(family, seed=1, **overrides)
        self.hf.save_pretrained(root)
        self.cfg = read_config(root)
        self.fam = family_for_config(self.cfg)
        self.arch = self.fam.arch_from_hf(self.cfg)
        self.sd = checkpoint_tensors(root)
        self.ours = self.model(1)[0]

    def model(self, tp: int) -> list[DecoderModel]:
        """Our model(s) per rank, loaded strictly from the canonical shards of the saved checkpoint."""
        target = make_target(self.arch, tp, "float32")
        out = []
        for shard in shards_from_hf_state_dict(self.sd, self.arch, target):
            m = DecoderModel(self.arch, target, comm=_FakeTP(tp)).eval()
            load_strict(m, shard)
            out.append(m)
        return out


class _FakeTP:
    """Collectives stand-in for one process holding every rank: all_reduce is left to the test
    (it sums the ranks' partial outputs)."""

    def __init__(self, tp: int) -> None:
        self.tp = tp

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return x


_CACHE: dict[str, _Built] = {}


@pytest.fixture
def built(tmp_path_factory: pytest.TempPathFactory, name: str) -> _Built:
    if name not in _CACHE:
        _CACHE[name] = _Built(name, tmp_path_factory.mktemp(f"mod-{name}"))
    return _CACHE[name]


def _capture(hf, s: int) -> dict[int, dict[str, tuple[tuple, dict]]]:
    """Inputs (args, kwargs) transformers passes to each layer and its self_attn for an S-token forward."""
    seen: dict[int, dict[str, tuple[tuple, dict]]] = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        for key, mod in (("layer", layer), ("attn", layer.self_attn)):

            def pre(m, args, kwargs, i=i, key=key):
                seen.setdefault(i, {})[key] = (args, dict(kwargs))

            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    ids = torch.tensor([[(j * 29) % 97 + 3 for j in range(s)]])
    with torch.no_grad():
        hf(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def _call(mod, args: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor:
    kwargs = dict(kwargs)
    if args:
        args = (x, *args[1:])
    else:
        kwargs["hidden_states"] = x
    out = mod(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _ours_inputs(m: DecoderModel, s: int):
    pos = torch.arange(s)[None]
    cos, sin = m.rotary(pos, torch.tensor([s - 1]), torch.float32)
    full, chunked = m.masks(pos, make_mask(pos, s))
    cache = KVCache(m.arch.num_layers, 1, m.target.kv_heads_per_rank, s, m.arch.head_dim, torch.float32)
    return pos, cos, sin, full, chunked, cache


def _hf_ffn(layer):
    return getattr(layer, "feed_forward", None) or layer.mlp


@pytest.mark.parametrize("s", [20, 40])
@pytest.mark.parametrize("name", sorted(CASES))
@torch.no_grad()
def test_attention_and_layer_match_hf(built: _Built, name: str, s: int) -> None:
    seen = _capture(built.hf, s)
    m = built.ours
    pos, cos, sin, full, chunked, cache = _ours_inputs(m, s)
    slots = torch.tensor([0])
    torch.manual_seed(s)
    for i, (layer, hf_layer) in enumerate(zip(m.layers, built.hf.model.layers, strict=True)):
        mask = chunked if layer.chunked else full
        x = torch.randn(1, s, m.arch.hidden_size)
        want = _call(hf_layer.self_attn, *seen[i]["attn"], x)
        got = layer.attn(x, cos, sin, pos, slots, mask, cache, True)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=lambda e, i=i: f"attn {i}: {e}")
        want = _call(hf_layer, *seen[i]["layer"], x)
        got = layer(x, cos, sin, pos, slots, mask, cache, True)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=lambda e, i=i: f"layer {i}: {e}")


@pytest.mark.parametrize("name", sorted(CASES))
@torch.no_grad()
def test_mlp_or_moe_block_matches_hf(built: _Built, name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 9, built.arch.hidden_size)
    for layer, hf_layer in zip(built.ours.layers, built.hf.model.layers, strict=True):
        ours = layer.moe if layer.moe is not None else layer.mlp
        want = _hf_ffn(hf_layer)(x)
        want = (want[0] if isinstance(want, tuple) else want).reshape(x.shape)  # Llama4: [T, H]
        torch.testing.assert_close(ours(x), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "name", [n for n, (f, _) in CASES.items() if f in ("mixtral", "qwen3_moe", "llama4")]
)
@torch.no_grad()
def test_moe_block_sharded_on_intermediate_dim(built: _Built, name: str) -> None:
    """tp = 2: each rank holds every expert's half of the intermediate dim and the whole router; the
    sum of the ranks' partial outputs (what the all-reduce does) equals the HF block."""
    ranks = built.model(2)
    torch.manual_seed(1)
    x = torch.randn(1, 7, built.arch.hidden_size)
    checked = 0
    for i, hf_layer in enumerate(built.hf.model.layers):
        blocks = [r.layers[i].moe for r in ranks]
        if blocks[0] is None:
            continue
        assert isinstance(blocks[0], MoE)
        assert torch.equal(blocks[0].router.weight, blocks[1].router.weight)  # replicated
        e, two_i, _ = blocks[0].experts.gate_up.shape
        assert e == built.arch.moe.num_experts and two_i == built.arch.moe.intermediate_size  # 2 * I / 2
        want = _hf_ffn(hf_layer)(x)
        want = (want[0] if isinstance(want, tuple) else want).reshape(x.shape)  # Llama4: [T, H]
        torch.testing.assert_close(sum(b(x) for b in blocks), want, rtol=0, atol=ATOL)
        checked += 1
    assert checked == len(built.arch.moe.moe_layers)
