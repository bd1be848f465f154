"""Exec loads what prep wrote: manifest -> rank shards, sha256-verified before use (file:// and s3://)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exec_service.artifact import ArtifactError, open_artifact
from exec_service.engine import Engine, Request, RuntimeConfig, StoppingCriteria
from exec_service.model.loading import shards_from_hf_state_dict
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from tests.hf_reference import hf_greedy, tiny_hf

PROMPTS = [[7, 3, 12], list(range(5, 22))]
CONFIG = RuntimeConfig(max_batch_size=2, max_seq_len=64, context_buckets=(8, 16))


def _prepared(tmp_path: Path, tp: int, store: str | None = None, **overrides):
    model = tiny_hf(seed=31, **overrides)
    model.save_pretrained(tmp_path / "ckpt")
    res = prepare(
        PrepareRequest(
            source=str(tmp_path / "ckpt"),
            tp_degree=tp,
            dtype="float32",
            output=store or f"file://{tmp_path}/store",
        )
    )
    return model, res.manifest_uri


def _check_engine(model, manifest_uri: str) -> None:
    with Engine.from_manifest(manifest_uri, CONFIG) as engine:
        res = engine.generate(
            [Request(p, stopping=StoppingCriteria(max_new_tokens=16, ignore_eos=True)) for p in PROMPTS]
        )
    assert [t for t, _ in res.values()] == [hf_greedy(model, p, 16) for p in PROMPTS]


def test_prepared_shards_equal_in_process_conversion(tmp_path: Path) -> None:
    model, uri = _prepared(tmp_path, 2, tie_word_embeddings=True)
    src = open_artifact(uri)
    want = shards_from_hf_state_dict(model.state_dict(), src.arch, src.target)
    for r in range(2):
        got = src.load(r)
        assert sorted(got) == sorted(want[r]) and "lm_head.weight" not in got
        for k in got:
            assert torch.equal(got[k], want[r][k]), k


def test_engine_from_manifest_tp1(tmp_path: Path) -> None:
    model, uri = _prepared(tmp_path, 1)
    _check_engine(model, uri)


@pytest.mark.slow
def test_engine_from_manifest_tp2(tmp_path: Path) -> None:
    model, uri = _prepared(tmp_path, 2, num_attention_heads=9, num_key_value_heads=3, hidden_size=72)
    _check_engine(model, uri)


def test_corrupt_shard_is_refused_before_use(tmp_path: Path) -> None:
    _model, uri = _prepared(tmp_path, 1)
    src = open_artifact(uri)
    path = Path(uri.removeprefix("file://")).parent / "shards/rank-00000-of-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"rank-00000-of-00001.safetensors: sha256 .* does not match"):
        src.load(0)
    with pytest.raises(ArtifactError, match="rank 1 out of range"):
        src.load(1)


def test_manifest_without_the_shard_entry(tmp_path: Path) -> None:
    import json

    _model, uri = _prepared(tmp_path, 1)
    mpath = Path(uri.removeprefix("file://"))
    d = json.loads(mpath.read_text())
    d["files"] = [f for f in d["files"] if not f["path"].startswith("shards/")]
    mpath.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=r"lists no file 'shards/rank-00000-of-00001\.safetensors'"):
        open_artifact(uri)  # refused when the manifest is read, before any shard is fetched


def test_engine_from_s3_manifest(tmp_path: Path, s3_env: str) -> None:
    model, uri = _prepared(tmp_path, 1, store=s3_env)
    assert uri.startswith("s3://")
    _check_engine(model, uri)


def test_hf_shards_convert_a_checkpoint_dir(tmp_path: Path) -> None:
    """The test helper that converts a checkpoint directory in process gives the rank files the real
    prep pipeline writes (read with safetensors, not through exec), and its shards reassemble into
    the HF tensors, fused by name here."""
    from safetensors.torch import load_file

    from shared.layout import unshard
    from tests.hf_reference import HFShards

    model = tiny_hf(seed=32, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "ckpt")
    src = HFShards(tmp_path / "ckpt", tp=2)
    got = [src.load(r) for r in range(2)]

    res = prepare(
        PrepareRequest(
            source=str(tmp_path / "ckpt"), tp_degree=2, dtype="float32", output=f"file://{tmp_path}/store"
        )
    )
    root = Path(res.manifest_uri.removeprefix("file://")).parent
    for r in range(2):
        written = load_file(str(root / f"shards/rank-{r:05d}-of-00002.safetensors"))
        assert sorted(got[r]) == sorted(written)
        for k in written:
            assert torch.equal(got[r][k], written[k]), (r, k)
        assert got[r]["rank"].tolist() == [r]

    hf = model.state_dict()
    want = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    for i in range(model.config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        want |= {
            f"layers.{i}.input_norm.weight": hf[f"model.layers.{i}.input_layernorm.weight"],
            f"layers.{i}.post_attn_norm.weight": hf[f"model.layers.{i}.post_attention_layernorm.weight"],
            f"layers.{i}.attn.qkv.weight": torch.cat([hf[a + f"{x}_proj.weight"] for x in "qkv"]),
            f"layers.{i}.attn.o.weight": hf[a + "o_proj.weight"],
            f"layers.{i}.mlp.gate_up.weight": torch.cat(
                [hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]
            ),
            f"layers.{i}.mlp.down.weight": hf[m + "down_proj.weight"],
        }
    assert sorted(k for k in got[0] if k != "rank") == sorted(want)  # tied: no lm_head
    for k, full in want.items():
        assert torch.equal(unshard(k, [g[k] for g in got], src.arch, src.target), full), k
    # split, not replicated: each rank holds half of the MLP's intermediate columns
    cfg = model.config
    assert got[0]["layers.0.mlp.down.weight"].shape == (cfg.hidden_size, cfg.intermediate_size // 2)
