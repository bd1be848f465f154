"""Serving int8 weight-only artifacts (``prepare --quantize int8``) — issue #9's quality bar.

* Every family, tp 1 and 2, through the real ``prepare`` -> exec path with the ``dequant`` kernel
  (exact fp32 arithmetic): 32 greedy tokens equal transformers ``generate`` on the SAME model with
  each quantized weight replaced by its int8 round trip (``dequantize(quantize_int8(W))``), and the
  first-step logits within 1e-4. That checks every scale, its sharding and its use, against an
  independent implementation of the model.
* The cpu ``int8pack`` kernel (bfloat16 activations) against the exact result.
* SmolLM2-135M-Instruct (the real model, slow): perplexity on a shipped 2,224-token text within 3% of
  fp32 (fp32 itself equal to transformers'), greedy agreement with fp32 >= 80/160 tokens and first-step
  cosine >= 0.99 for 5 prompts, tp 2 == tp 1 for the int8 artifact, and an exec server reporting
  the scheme in GetModelInfo while streaming the same tokens.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from exec_service.artifact import open_artifact
from exec_service.engine import Engine, Request, RuntimeConfig, StoppingCriteria
from exec_service.model.parallel import INT8PACK_MAX_ROWS, int8_linear
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from shared.quantize import dequantize, quantize_int8
from tests.family_exec import CASES, CONFIG, N_NEW, PROMPTS, FamilyCase, run_engine
from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.timeout(900)

DATA = Path(__file__).parent / "data"
FAMILIES = ["llama", "qwen2", "qwen3", "granite", "phi3", "mixtral", "qwen3_moe", "llama4"]
DEQUANT = RuntimeConfig(**{**CONFIG.__dict__, "int8_kernel": "dequant"})


# ---- the reference: transformers with int8-rounded weights ----------------------------------------


def _round_trip(t: torch.Tensor, in_dim: int) -> torch.Tensor:
    """W -> dequantize(quantize_int8(W)) with the input (reduced) dim at ``in_dim``."""
    moved = t.detach().float().movedim(in_dim, -1)
    q, s = quantize_int8(moved)
    return dequantize(q, s).movedim(-1, in_dim).to(t.dtype)


def hf_int8_rounded(model, lm_head: bool = False):
    """A copy of the HF model whose attention / MLP / expert weights (and the LM head) carry exactly
    the values an int8 artifact stores. Routers, norms and embeddings stay."""
    ref = copy.deepcopy(model)
    hidden = ref.config.get_text_config().hidden_size
    n = 0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".layers." not in name or p.dim() < 2 or name.endswith(("mlp.gate.weight", "router.weight")):
                continue
            in_dim = -1
            if p.dim() == 3:  # stacked experts: Mixtral [E, out, in]; Llama4 [E, in, out]
                transposed = p.shape[-1] != hidden if "gate_up" in name else p.shape[-1] == hidden
                in_dim = -2 if transposed else -1
            p.copy_(_round_trip(p, in_dim))
            n += 1
        if lm_head:  # its own tensor even when tied (prep writes lm_head.weight)
            w = ref.get_output_embeddings().weight
            ref.get_output_embeddings().weight = torch.nn.Parameter(_round_trip(w, -1), requires_grad=False)
    assert n >= 4 * ref.config.get_text_config().num_hidden_layers // 2  # the layers' weights were found
    return ref


class Int8Case(FamilyCase):
    def int8_manifest(self, tp: int, lm_head: bool = False) -> str:
        key = (tp, f"int8{'+head' if lm_head else ''}")
        if key not in self._manifests:
            res = prepare(
                PrepareRequest(
                    source=str(self.checkpoint),
                    tp_degree=tp,
                    output=f"file://{self.root}/store",
                    quantize="int8",
                    quantize_lm_head=lm_head,
                )
            )
            self._manifests[key] = res.manifest_uri
        return self._manifests[key]

    def int8_reference(self, lm_head: bool = False):
        attr = f"_int8_ref_{lm_head}"
        if not hasattr(self, attr):
            ref = hf_int8_rounded(self.model, lm_head)
            tokens = [hf_greedy(ref, p, N_NEW) for p in PROMPTS]
            logits = [ref(torch.tensor([p])).logits[0, -1].float() for p in PROMPTS]
            setattr(self, attr, (tokens, logits))
        return getattr(self, attr)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Int8Case]:
    table = {"llama": ("llama", {}), **CASES}
    return {name: Int8Case(name, *table[name], tmp_path_factory.mktemp(name)) for name in FAMILIES}


def check_int8(case: Int8Case, tp: int, lm_head: bool = False) -> None:
    src = open_artifact(case.int8_manifest(tp, lm_head))
    assert src.target.quantization == "int8" and src.target.quantized_lm_head == lm_head
    want_tokens, want_logits = case.int8_reference(lm_head)
    with torch.no_grad(), Engine(src, DEQUANT) as engine:
        tokens, logits = run_engine(engine, PROMPTS)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_family_tp1_matches_transformers_on_int8_weights(cases, name: str) -> None:
    check_int8(cases[name], 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_int8_family_tp2_matches_transformers_on_int8_weights(cases, name: str) -> None:
    """Column-parallel weights take their rows' scales, row-parallel ones the whole rows' scales
    (replicated), experts their intermediate slice's."""
    check_int8(cases[name], 2)


@pytest.mark.parametrize(("name", "tp"), [("llama", 1), ("qwen2", 1), ("qwen2", 2)])
def test_int8_lm_head(cases, name: str, tp: int) -> None:
    """--quantize-lm-head: the LM head is an int8 tensor of its own, even when tied (Qwen2 here);
    the embedding keeps its float weights."""
    check_int8(cases[name], tp, lm_head=True)


def test_int8pack_kernel_against_exact() -> None:
    """``int8pack`` (bf16 activations, scale in the kernel) vs the exact (x q^T) s: within bf16
    rounding; above INT8PACK_MAX_ROWS rows it IS the exact path."""
    torch.manual_seed(0)
    w = torch.randn(96, 80)
    q, s = quantize_int8(w)
    bias = torch.randn(96)
    for rows in (1, 3, 8, INT8PACK_MAX_ROWS + 1):
        x = torch.randn(2, rows, 80) if rows > 1 else torch.randn(1, 80)
        exact = x @ dequantize(q, s).T + bias
        dq = int8_linear(x, q, s, s.bfloat16(), bias, "dequant")
        torch.testing.assert_close(dq, exact, rtol=1e-5, atol=1e-4)
        packed = int8_linear(x, q, s, s.bfloat16(), bias, "int8pack")
        assert packed.dtype == x.dtype and packed.shape == exact.shape
        if rows > INT8PACK_MAX_ROWS:
            assert torch.equal(packed, dq)
        else:
            err = float((packed - exact).abs().max() / exact.abs().max())
            assert err < 2e-2, err
            assert torch.nn.functional.cosine_similarity(packed.flatten(), exact.flatten(), dim=0) > 0.9999


def test_int8pack_engine_close_to_exact(cases) -> None:
    case = cases["llama"]
    src = open_artifact(case.int8_manifest(1))
    with torch.no_grad():
        with Engine(src, DEQUANT) as engine:
            _, exact = run_engine(engine, PROMPTS, 1)
        with Engine(src, RuntimeConfig(**{**CONFIG.__dict__, "int8_kernel": "int8pack"})) as engine:
            _, packed = run_engine(engine, PROMPTS, 1)
    for a, b in zip(packed, exact, strict=True):
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999


# compiled graphs over int8 weights (what a graph set of an int8 artifact holds): 3 graphs
COMPILED_INT8 = RuntimeConfig(
    max_batch_size=2,
    max_seq_len=128,
    context_buckets=(64,),
    kv_buckets=(128,),
    compile=True,
    int8_kernel="dequant",
)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_int8_compiled_graphs_match_transformers_on_int8_weights(cases, tp: int) -> None:
    case = cases["llama"]
    want_tokens, _ = case.int8_reference(False)
    with torch.no_grad(), Engine(open_artifact(case.int8_manifest(tp)), COMPILED_INT8) as engine:
        tokens, _ = run_engine(engine, PROMPTS)
    assert tokens == want_tokens


@pytest.mark.slow
def test_int8pack_compiled_close_to_eager(cases) -> None:
    """The int8pack kernel inside compiled graphs: the eager int8pack engine's logits (bf16
    activations either way) and its tokens."""
    src = open_artifact(cases["llama"].int8_manifest(1))
    cfg = RuntimeConfig(**{**COMPILED_INT8.__dict__, "int8_kernel": "int8pack", "return_logits": True})
    with torch.no_grad():
        with Engine(src, dataclasses.replace(cfg, compile=False)) as engine:
            eager_tokens, eager = run_engine(engine, PROMPTS)
        with Engine(src, cfg) as engine:
            tokens, compiled = run_engine(engine, PROMPTS)
    for a, b in zip(compiled, eager, strict=True):
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999
    same = sum(x == y for t, e in zip(tokens, eager_tokens, strict=True) for x, y in zip(t, e, strict=True))
    assert same >= 0.9 * sum(map(len, eager_tokens)), (tokens, eager_tokens)


def test_unknown_quantization_scheme_is_refused(cases, tmp_path: Path) -> None:
    import json

    from exec_service.artifact import ArtifactError

    uri = cases["llama"].int8_manifest(1)
    path = Path(uri.removeprefix("file://"))
    doc = json.loads(path.read_text())
    doc["target"]["quantization"] = "int4"
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="unknown quantization scheme 'int4'"):
        open_artifact(f"file://{bad}")


# ---- the real model ---------------------------------------------------------------------------------

SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about static shapes and compilers.",
    "List three prime numbers.",
    "Explain what a KV cache is in one sentence.",
    "Translate 'good morning' into Spanish.",
]
SMOL_CONFIG = RuntimeConfig(max_batch_size=5, max_seq_len=256, context_buckets=(16, 64), return_logits=True)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory):
    """(HF fp32 model, tokenizer, chat prompts, {variant: manifest uri}) — one GGUF prepared as fp32
    tp 1, int8 tp 1 and int8 tp 2 into one store."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import smollm2_gguf

    gguf = Path(smollm2_gguf())
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    prompts = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for t in SMOL_PROMPTS
    ]
    store = f"file://{tmp_path_factory.mktemp('smol')}/store"
    uris = {
        name: prepare(PrepareRequest(source=str(gguf), output=store, tp_degree=tp, quantize=q)).manifest_uri
        for name, tp, q in [("fp32", 1, None), ("int8", 1, "int8"), ("int8-tp2", 2, "int8")]
    }
    return model, tok, prompts, uris


def _greedy(
    uri: str, prompts: list[list[int]], n: int = 32, int8_kernel: str = "auto"
) -> tuple[list[list[int]], list[torch.Tensor]]:
    config = RuntimeConfig(**{**SMOL_CONFIG.__dict__, "int8_kernel": int8_kernel})
    with torch.no_grad(), Engine(open_artifact(uri), config) as engine:
        return run_engine(engine, prompts, n)


@pytest.mark.slow
def test_smollm2_int8_perplexity_within_3_percent(smol) -> None:
    from exec_service.evaluate import perplexity

    model, tok, _, uris = smol
    ids = tok((DATA / "apache-2.0.txt").read_text())["input_ids"]
    assert len(ids) >= 2000
    with torch.no_grad():  # the independent reference for the fp32 number
        hf_logits = model(torch.tensor([ids])).logits[0, :-1].double()
        hf_nll = float(torch.nn.functional.cross_entropy(hf_logits, torch.tensor(ids[1:]), reduction="mean"))
    fp32 = perplexity(open_artifact(uris["fp32"]), ids)
    int8 = perplexity(open_artifact(uris["int8"]), ids)
    ratio = int8.perplexity / fp32.perplexity
    print(
        f"\nSmolLM2-135M perplexity on {fp32.tokens + 1} tokens (tests/data/apache-2.0.txt): "
        f"transformers fp32 {torch.tensor(hf_nll).exp():.4f}, ours fp32 {fp32.perplexity:.4f}, "
        f"ours int8 {int8.perplexity:.4f} (x{ratio:.4f})"
    )
    assert fp32.tokens == len(ids) - 1
    assert abs(fp32.nll - hf_nll) < 1e-4, (fp32.nll, hf_nll)
    assert ratio <= 1.03


@pytest.mark.slow
def test_smollm2_int8_agreement_and_first_step_cosine(smol) -> None:
    _, tok, prompts, uris = smol
    fp_tokens, fp_logits = _greedy(uris["fp32"], prompts)
    q_tokens, q_logits = _greedy(uris["int8"], prompts)
    lines = []
    for text, a, b, la, lb in zip(SMOL_PROMPTS, fp_tokens, q_tokens, fp_logits, q_logits, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        equal = sum(x == y for x, y in zip(a, b, strict=True))
        cos = float(torch.nn.functional.cosine_similarity(la, lb, dim=0))
        lines.append(f"  {text!r}: first {same}/32 identical, {equal}/32 equal, first-step cosine {cos:.5f}")
        assert cos >= 0.99, (text, cos)
        assert a[0] == b[0], (text, tok.decode(a), tok.decode(b))
    agree = sum(x == y for a, b in zip(fp_tokens, q_tokens, strict=True) for x, y in zip(a, b, strict=True))
    print(f"\nint8 vs fp32 greedy agreement: {agree}/{32 * len(prompts)} tokens\n" + "\n".join(lines))
    # Recorded: 98/160 (per prompt 32, 32, 22, 11, 1) and 100/160 (32, 32, 22, 11, 3) in the run
    # that set this floor; the first token equal for all five (asserted above). One flipped near-tie
    # changes the rest of a greedy sequence, so the count is noisy by nature; the floor, half of the
    # 160, leaves ~20 tokens of margin for rounding changes in the int8 kernel and still fails when
    # int8 drifts from fp32 early in most prompts.
    assert agree >= 80, agree
    assert "Paris" in tok.decode(q_tokens[0])


def _greedy_steps(
    uri: str, prompts: list[list[int]], n: int = 32
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy tokens and every step's full-vocab logits, per prompt (cpu ``int8pack`` kernel)."""
    with torch.no_grad(), Engine(open_artifact(uri), SMOL_CONFIG) as engine:
        ids = [
            engine.add_request(Request(p, stopping=StoppingCriteria(max_new_tokens=n, ignore_eos=True)))
            for p in prompts
        ]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        logits: dict[str, list[torch.Tensor]] = {i: [] for i in ids}
        done: set[str] = set()
        while len(done) < len(ids):
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
                logits[out.request_id] += list(out.logits)
                if out.finish_reason is not None:
                    done.add(out.request_id)
    return [tokens[i] for i in ids], [logits[i] for i in ids]


# bfloat16 rounding of the row-parallel partial sums moves SmolLM2's logits by up to ~3% of their
# largest magnitude (measured: 0.0303 over the 129 shared steps, e.g. 0.68 on logits of ~23), and a
# greedy choice may flip only where the two best logits are closer than NEAR_TIE (measured flip:
# gaps of 0.031 and 0.044). A real bug (a wrong scale, a lost shard) moves logits by far more.
MAX_RELATIVE_DRIFT = 0.05
NEAR_TIE = 0.25


@pytest.mark.slow
def test_smollm2_int8_tp2_equals_tp1(smol) -> None:
    """The tp = 2 artifact (9 heads converted to 10 for MHA, scales split / replicated) gives the same
    160 tokens as tp = 1 with exact arithmetic (``dequant``). With the cpu ``int8pack`` kernel each
    rank's row-parallel partial sum is rounded to bfloat16 before the all-reduce (tp = 1 rounds the
    whole sum once), so the logits differ by bf16 rounding and a greedy choice may flip — but only at
    a near-tie: wherever tp 2 first leaves tp 1's tokens, both runs' logits of the two tokens must be
    within NEAR_TIE of each other, and until then every step's logits agree within MAX_RELATIVE_DRIFT."""
    _, _, prompts, uris = smol
    tp1, _ = _greedy(uris["int8"], prompts, int8_kernel="dequant")
    tp2, _ = _greedy(uris["int8-tp2"], prompts, int8_kernel="dequant")
    assert tp2 == tp1
    p1, s1 = _greedy_steps(uris["int8"], prompts)
    p2, s2 = _greedy_steps(uris["int8-tp2"], prompts)
    agree, worst_drift, flips = 0, 0.0, []
    for a, b, la, lb in zip(p1, p2, s1, s2, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        agree += n
        worst_drift = max(
            [
                worst_drift,
                *(float((x - y).abs().max() / x.abs().max()) for x, y in zip(la[:n], lb[:n], strict=True)),
            ]
        )
        if n < len(a):
            gap1 = float(la[n][a[n]] - la[n][b[n]])  # how much tp 1 preferred its token
            gap2 = float(lb[n][b[n]] - lb[n][a[n]])  # and tp 2 its own
            flips.append((n, gap1, gap2))
    print(
        f"\nint8pack tp 2 vs tp 1: {agree}/{32 * len(prompts)} tokens before the first difference; "
        f"largest logit drift before it {worst_drift:.4f} of the largest logit; flips (step, gap tp1, gap tp2): {flips}"
    )
    assert worst_drift < MAX_RELATIVE_DRIFT
    for _n, gap1, gap2 in flips:
        assert 0 <= gap1 < NEAR_TIE and 0 <= gap2 < NEAR_TIE
    assert [t[:1] for t in p2] == [t[:1] for t in p1]  # the first token never hinges on a near-tie here


@pytest.mark.slow
def test_exec_server_serves_int8_and_reports_the_scheme(smol) -> None:
    from exec_service.server import ServeConfig
    from protos import exec_pb2
    from tests.test_exec_server import Served, _generate, _ids_req, _info

    _, _, prompts, uris = smol
    want, _ = _greedy(uris["int8"], prompts[:1], 16)
    served = Served(
        ServeConfig(manifest_uri=uris["int8"], max_batch_size=2, max_seq_len=256, context_buckets=(16, 64))
    )
    try:
        info = asyncio.run(_info(served.target))
        assert info.quantization == "int8"
        msgs = asyncio.run(_generate(served.target, _ids_req(prompts[0], 16)))
        got = [t for m in msgs for t in m.token_ids]
        assert got == want[0]
        assert msgs[-1].finish_reason == exec_pb2.LENGTH
    finally:
        served.close()
