"""The prep pipeline end to end, into a file:// store and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prep_service.api import PrepareRequest, PrepCancelled, PrepError, Progress
from prep_service.convert import prepare
from shared.layout import unshard
from shared.manifest import Manifest, shard_path
from shared.storage import open_store, split_uri
from tests.helpers import canonical_from_hf, make_llama, read_config, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("s3_env")


def _manifests(store_uri: str) -> list[str]:
    return [o.key for o in open_store(store_uri).list("") if o.key.endswith("manifest.json")]


def _verify_by_download(manifest_uri: str, tmp_path: Path) -> Manifest:
    """Re-download every file the manifest lists and check size + sha256."""
    import hashlib

    store, key = split_uri(manifest_uri)
    man = Manifest.from_json(store.get_bytes(key))
    for f in man.files:
        dest = tmp_path / "verify" / f.path
        info = store.download_file(f.path, dest)
        assert info.size == f.size == dest.stat().st_size
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == f.sha256 == info.sha256
    return man


@pytest.mark.parametrize("tp", [1, 2])
def test_prepare_publishes_verified_artifact_and_reuses_it(tmp_path: Path, store_uri: str, tp: int) -> None:
    model = make_llama(tmp_path / "ckpt")
    seen: list[Progress] = []
    res = prepare(
        PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=tp, output=store_uri), progress=seen.append
    )
    assert (
        not res.reused
        and res.manifest_uri.startswith(store_uri)
        and res.manifest_uri.endswith("manifest.json")
    )
    assert {"hashing", "converting", "uploading", "done"} <= {p.stage for p in seen}
    man = _verify_by_download(res.manifest_uri, tmp_path)
    paths = {f.path for f in man.files}
    assert {shard_path(r, tp) for r in range(tp)} | {"config.json", "generation_config.json"} <= paths
    assert man.family == "llama" and man.target.tp_degree == tp and man.artifact_key == res.artifact_key
    assert [f["path"] for f in man.source["files"]] == [
        "model.safetensors",
        "config.json",
        "generation_config.json",
    ]

    # the shards hold exactly the converted tensors
    shards = [load_file(tmp_path / "verify" / shard_path(r, tp)) for r in range(tp)]
    expected = canonical_from_hf(model.state_dict(), "llama", read_config(tmp_path / "ckpt"))
    assert set(shards[0]) == set(expected) | {"rank"}
    for name, t in expected.items():
        assert torch.equal(unshard(name, [s[name] for s in shards], man.architecture, man.target), t), name

    again = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=tp, output=store_uri))
    assert again.reused and again.manifest_uri == res.manifest_uri
    forced = prepare(
        PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=tp, output=store_uri, force=True)
    )
    assert not forced.reused and forced.manifest_uri == res.manifest_uri
    assert len(_manifests(store_uri)) == 1


def test_different_target_is_a_different_artifact(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    out = f"file://{tmp_path}/store"
    a = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), output=out))
    b = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), output=out, dtype="bfloat16"))
    assert a.artifact_key != b.artifact_key
    store, key = split_uri(b.manifest_uri)
    man = Manifest.from_json(store.get_bytes(key))
    shard = load_file(Path(b.manifest_uri.removeprefix("file://")).parent / shard_path(0, 1))
    assert man.target.dtype == "bfloat16" and shard["embed.weight"].dtype == torch.bfloat16


def test_default_store_is_used_when_no_output(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    res = prepare(PrepareRequest(source=f"file://{tmp_path}/ckpt"))
    assert res.manifest_uri.startswith(os.environ["NEURON_SERVE_STORE"])


def test_s3_source(tmp_path: Path, s3_env: str) -> None:
    make_llama(tmp_path / "ckpt")
    src = open_store(f"{s3_env}/checkpoints/tiny")
    for p in (tmp_path / "ckpt").iterdir():
        src.put_file(p.name, p)
    res = prepare(PrepareRequest(source=f"{s3_env}/checkpoints/tiny", tp_degree=2, output=f"{s3_env}/store"))
    man = _verify_by_download(res.manifest_uri, tmp_path)
    assert man.source["uri"] == f"{s3_env}/checkpoints/tiny" and man.source["kind"] == "s3"
    # the digests come from the download (it hashes what it writes), not from a second pass
    for f in man.source["files"]:
        assert f["sha256"] == _sha(tmp_path / "ckpt" / f["path"]), f["path"]


def test_cancel_midway_leaves_no_manifest(tmp_path: Path, store_uri: str) -> None:
    make_llama(tmp_path / "ckpt", num_hidden_layers=4)
    cancel = threading.Event()

    def on_progress(p: Progress) -> None:
        if p.stage == "converting" and p.tensors_done >= 3:
            cancel.set()

    with pytest.raises(PrepCancelled):
        prepare(
            PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=2, output=store_uri),
            progress=on_progress,
            cancel=cancel,
        )
    assert _manifests(store_uri) == []
    res = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=2, output=store_uri))
    assert not res.reused and _manifests(store_uri) != []


def test_cancel_during_upload_removes_partial_files(tmp_path: Path, store_uri: str) -> None:
    make_llama(tmp_path / "ckpt")
    cancel = threading.Event()

    def on_progress(p: Progress) -> None:
        if p.stage == "uploading" and p.bytes_done > 0:
            cancel.set()

    with pytest.raises(PrepCancelled):
        prepare(
            PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=2, output=store_uri),
            progress=on_progress,
            cancel=cancel,
        )
    assert open_store(store_uri).list("models/") == []


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import shared.storage as st
    from prep_service.api import PrepareRequest
    from prep_service.convert import prepare
    calls = []
    for cls in (st.FileStore, st.S3Store):
        orig = cls.adopt_file
        def slow(self, key, path, *, sha256=None, _orig=orig):
            info = _orig(self, key, path, sha256=sha256)
            calls.append(key)
            print("UPLOADED", key, flush=True)
            time.sleep(60)  # the test kills us here, mid-upload
            return info
        cls.adopt_file = slow
    prepare(PrepareRequest(source=sys.argv[1], tp_degree=2, output=sys.argv[2]))
    """
)


def test_killed_midway_leaves_no_manifest(tmp_path: Path, store_uri: str) -> None:
    make_llama(tmp_path / "ckpt")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "ckpt"), store_uri],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("UPLOADED"), line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    store = open_store(store_uri)
    assert store.list("models/") != []  # a partial upload really is there ...
    assert _manifests(store_uri) == []  # ... but it is not a model
    res = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=2, output=store_uri))
    _verify_by_download(res.manifest_uri, tmp_path)


# -------------------------------------------------------------------------------------------------
# Bad inputs: each a clear error naming the problem, and nothing published.
# -------------------------------------------------------------------------------------------------


def _rewrite_weights(ckpt: Path, edit) -> None:
    sd = load_file(ckpt / "model.safetensors")
    edit(sd)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})


def _expect_error(tmp_path: Path, source: Path | str, match: str, **kw) -> None:
    out = f"file://{tmp_path}/store"
    with pytest.raises(PrepError, match=match):
        prepare(PrepareRequest(source=str(source), output=out, **kw))
    assert _manifests(out) == []


def test_missing_tensor(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    _rewrite_weights(tmp_path / "ckpt", lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    _expect_error(tmp_path, tmp_path / "ckpt", r"'model\.layers\.1\.self_attn\.k_proj\.weight'.*missing")


def test_wrong_shape(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")

    def edit(sd):
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)

    _rewrite_weights(tmp_path / "ckpt", edit)
    _expect_error(
        tmp_path, tmp_path / "ckpt", r"layers\.0\.mlp\.gate_up\.weight.*up_proj\.weight \[100, 64\]"
    )


def test_unexpected_tensor(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    _rewrite_weights(tmp_path / "ckpt", lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(3)))
    _expect_error(
        tmp_path, tmp_path / "ckpt", r"unexpected tensor 'model\.extra\.weight' in model\.safetensors"
    )


def test_unknown_architecture(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    cfg = read_config(tmp_path / "ckpt")
    cfg.update(model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    _expect_error(
        tmp_path, tmp_path / "ckpt", r"config\.json: unknown architecture: model_type='frobnicator'"
    )


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path, tmp_path / "empty", r"empty.*is empty")


def test_missing_source(tmp_path: Path) -> None:
    _expect_error(tmp_path, tmp_path / "nope", "source not found")


def test_tp_the_heads_cannot_take(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt", num_attention_heads=9, num_key_value_heads=3, hidden_size=72)
    _expect_error(
        tmp_path,
        tmp_path / "ckpt",
        r"needs tp \(2\) to be a multiple of num_key_value_heads \(3\)",
        tp_degree=2,
        gqa_strategy="replicate_to_tp_degree",
    )
    _expect_error(
        tmp_path, tmp_path / "ckpt", r"intermediate_size \(128\) is not divisible by tp \(3\)", tp_degree=3
    )


def test_truncated_safetensors(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _expect_error(tmp_path, tmp_path / "ckpt", r"model\.safetensors.*truncated")


def test_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    model = make_llama(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "ckpt" / "pytorch_model.bin")
    _expect_error(tmp_path, tmp_path / "ckpt", r"pytorch_model\.bin: pickle checkpoints .* --allow-pickle")
    res = prepare(
        PrepareRequest(source=str(tmp_path / "ckpt"), output=f"file://{tmp_path}/store", allow_pickle=True)
    )
    shard = load_file(Path(res.manifest_uri.removeprefix("file://")).parent / shard_path(0, 1))
    assert torch.equal(shard["embed.weight"], model.state_dict()["model.embed_tokens.weight"])


def test_pickle_with_code_is_not_executed(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "ckpt" / "pytorch_model.bin")
    _expect_error(
        tmp_path,
        tmp_path / "ckpt",
        r"pytorch_model\.bin: not loadable with torch\.load\(weights_only=True\)",
        allow_pickle=True,
    )
    assert not marker.exists()


# -------------------------------------------------------------------------------------------------
# The real model (GGUF) and memory
# -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gguf_source_real_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    res = prepare(PrepareRequest(source=str(gguf), tp_degree=2, output=f"file://{tmp_path}/store"))
    man = _verify_by_download(res.manifest_uri, tmp_path)
    assert man.family == "llama" and man.architecture.tie_word_embeddings
    assert man.source["kind"] == "gguf" and man.source["files"][0]["path"] == gguf.name
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {f.path for f in man.files}
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = json.loads((tmp_path / "verify" / "config.json").read_text())
    expected = canonical_from_hf(ref.state_dict(), "llama", cfg)
    shards = [load_file(tmp_path / "verify" / shard_path(r, 2)) for r in range(2)]
    for name in ("embed.weight", "layers.0.attn.qkv.weight", "layers.29.mlp.down.weight", "norm.weight"):
        assert torch.equal(
            unshard(name, [s[name] for s in shards], man.architecture, man.target), expected[name]
        )


_RSS_SCRIPT = textwrap.dedent(
    r"""
    import re, sys
    from prep_service.api import PrepareRequest
    from prep_service.convert import prepare
    prepare(PrepareRequest(source=sys.argv[1], tp_degree=2, output=sys.argv[2]))
    # VmHWM is this process's own peak RSS; getrusage's ru_maxrss would include the RSS of the
    # (large) pytest parent at fork time.
    status = open("/proc/self/status").read()
    print("PEAK_RSS_KB", re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    """
)


def _write_big_llama(path: Path) -> int:
    """A ~1.5 GB random fp32 Llama checkpoint in three safetensors files, written tensor by tensor."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    h, i, kv = 1024, 4096, 256
    files: list[dict[str, torch.Tensor]] = [{}]
    total = 0

    def add(name: str, *shape: int) -> None:
        nonlocal total
        files[-1][name] = torch.randn(*shape, generator=g) * 0.02
        total += files[-1][name].numel() * 4
        if sum(t.numel() for t in files[-1].values()) * 4 > 550e6:
            save_file(files[-1], path / f"model-{len(files):05d}.safetensors")
            files[-1] = {}  # keep the writer's own memory small too
            files.append({})

    add("model.embed_tokens.weight", 32000, h)
    for n in range(20):
        p = f"model.layers.{n}"
        add(f"{p}.input_layernorm.weight", h)
        add(f"{p}.post_attention_layernorm.weight", h)
        add(f"{p}.self_attn.q_proj.weight", h, h)
        add(f"{p}.self_attn.k_proj.weight", kv, h)
        add(f"{p}.self_attn.v_proj.weight", kv, h)
        add(f"{p}.self_attn.o_proj.weight", h, h)
        add(f"{p}.mlp.gate_proj.weight", i, h)
        add(f"{p}.mlp.up_proj.weight", i, h)
        add(f"{p}.mlp.down_proj.weight", h, i)
    add("model.norm.weight", h)
    add("lm_head.weight", 32000, h)
    if files[-1]:
        save_file(files[-1], path / f"model-{len(files):05d}.safetensors")
    return total


@pytest.mark.slow
def test_peak_rss_under_1gb_for_a_1_5gb_checkpoint(tmp_path: Path) -> None:
    size = _write_big_llama(tmp_path / "big")
    assert size > 1.4e9
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big"), f"file://{tmp_path}/store"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peak_kb = int(out.stdout.split("PEAK_RSS_KB")[-1].split()[0])
    print(f"checkpoint {size / 1e9:.2f} GB, peak RSS {peak_kb / 1024:.0f} MiB")
    assert peak_kb * 1024 < 1e9, f"peak RSS {peak_kb / 1024:.0f} MiB"


# -------------------------------------------------------------------------------------------------
# Source digests: remembered by file identity, computed alongside conversion, never stale.
# -------------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_digest_cache_remembers_only_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from prep_service.sources import digests

    cache = digests.DigestCache(tmp_path / "cache")
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert cache.sha256(f) == _sha(f)
    assert cache.lookup(f) is None  # modified within RACY_S of hashing: not remembered
    monkeypatch.setattr(digests, "RACY_S", 0.0)
    assert cache.sha256(f) == _sha(f) and cache.lookup(f) == _sha(f)
    calls = []
    monkeypatch.setattr(digests, "sha256_file", lambda p, on_bytes=None: calls.append(p) or "0" * 64)
    assert cache.sha256(f) == _sha(f) and calls == []  # a hit reads nothing

    # same size, same mtime, different bytes: ctime still gives it away
    st = f.stat()
    time.sleep(0.05)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert cache.lookup(f) is None
    # replaced by another file (new inode) of the same size
    (tmp_path / "other.bin").write_bytes(b"a" * 1000)
    os.replace(tmp_path / "other.bin", f)
    assert cache.lookup(f) is None
    assert digests.DigestCache(None).lookup(f) is None  # disabled


def test_digest_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from prep_service.sources.digests import DigestCache

    monkeypatch.setenv("NEURON_SERVE_DIGEST_CACHE", "off")
    assert DigestCache.default().root is None
    monkeypatch.setenv("NEURON_SERVE_DIGEST_CACHE", str(tmp_path / "c"))
    assert DigestCache.default().root == tmp_path / "c"


def test_second_preparation_reuses_source_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prep_service.sources import digests

    make_llama(tmp_path / "ckpt")
    monkeypatch.setenv("NEURON_SERVE_DIGEST_CACHE", str(tmp_path / "digests"))
    monkeypatch.setattr(digests, "RACY_S", 0.0)
    out = f"file://{tmp_path}/store"
    a = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), output=out))
    hashed: list[Path] = []
    orig = digests.sha256_file
    monkeypatch.setattr(
        digests, "sha256_file", lambda p, on_bytes=None: hashed.append(p) or orig(p, on_bytes)
    )
    b = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), output=out, tp_degree=2))
    assert hashed == [] and a.artifact_key != b.artifact_key
    assert a.manifest["source"]["files"] == b.manifest["source"]["files"]
    for f in b.manifest["source"]["files"]:
        assert f["sha256"] == _sha(tmp_path / "ckpt" / f["path"]), f["path"]


def test_artifact_key_names_the_artifact_directory(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    res = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), output=f"file://{tmp_path}/store"))
    assert len(res.artifact_key) == 32 and int(res.artifact_key, 16) >= 0
    assert res.manifest_uri.endswith(f"/{res.artifact_key}/manifest.json")
    assert res.manifest["artifact_key"] == res.artifact_key


@pytest.mark.parametrize("slow_hash", [False, True])
def test_speculative_conversion_is_dropped_when_the_artifact_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow_hash: bool
) -> None:
    """Cold digests: conversion starts before the key is known; an existing artifact wins either
    when the hash finishes mid-conversion or only after it, and nothing else is left behind."""
    import time

    from prep_service.sources import digests

    monkeypatch.setenv("NEURON_SERVE_DIGEST_CACHE", "off")
    make_llama(tmp_path / "ckpt", num_hidden_layers=4)
    out = f"file://{tmp_path}/store"
    first = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), output=out, tp_degree=2))
    before = sorted(p.relative_to(tmp_path / "store") for p in (tmp_path / "store").rglob("*"))
    if slow_hash:
        orig = digests.sha256_file

        def slow(p: Path, on_bytes=None) -> str:
            time.sleep(0.5)
            return orig(p, on_bytes)

        monkeypatch.setattr(digests, "sha256_file", slow)
    stages: list[str] = []
    again = prepare(
        PrepareRequest(source=str(tmp_path / "ckpt"), output=out, tp_degree=2),
        progress=lambda p: stages.append(p.stage),
    )
    assert again.reused and again.manifest_uri == first.manifest_uri and stages[-1] == "done"
    if slow_hash:
        assert "converting" in stages  # the speculation really ran
    after = sorted(p.relative_to(tmp_path / "store") for p in (tmp_path / "store").rglob("*"))
    assert after == before  # no staging left, nothing republished


def test_torch_thread_count_restored(tmp_path: Path) -> None:
    make_llama(tmp_path / "ckpt")
    n = torch.get_num_threads()
    prepare(PrepareRequest(source=str(tmp_path / "ckpt"), output=f"file://{tmp_path}/store"))
    assert torch.get_num_threads() == n


def test_streaming_writer_round_trip_with_writeback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writeback is started every few bytes; the file is still exactly what safetensors reads."""
    import hashlib

    from prep_service import st_io

    monkeypatch.setattr(st_io, "WRITEBACK_CHUNK", 4096)
    started: list[tuple[int, int]] = []
    orig = st_io.start_writeback
    monkeypatch.setattr(
        st_io, "start_writeback", lambda fd, off, n: started.append((off, n)) or orig(fd, off, n)
    )
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(100, 33, generator=g),
        "b": torch.randint(-128, 127, (7, 5), dtype=torch.int8, generator=g),
        "c": torch.randn(64, 64, generator=g).to(torch.bfloat16).t(),  # non-contiguous
        "empty": torch.empty(0, 3),
    }
    plan = [st_io.PlannedTensor(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    w = st_io.StreamingWriter(tmp_path / "x.safetensors", plan, metadata={"format": "pt"})
    for k, t in tensors.items():
        w.write(k, t)
    digest = w.close()
    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    assert w.size == (tmp_path / "x.safetensors").stat().st_size
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
    assert started and all(n > 0 for _, n in started)
    assert [off for off, _ in started] == sorted(off for off, _ in started)
