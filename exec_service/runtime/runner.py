"""One rank's runtime: the model with its shard loaded, the KV cache, the token counts and the step
graphs for every static shape, run through a backend. The engine (rank 0) and TP workers (ranks > 0)
each own one ``Runner`` and call ``run`` with identical inputs: ``run(spec, StepInputs) ->
StepOutputs`` converts between the named step I/O and the graph's positional tensors."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from exec_service.model.collectives import SINGLE, Collectives
from exec_service.model.decoder import DecoderModel
from exec_service.model.loading import ShardLoadError, load_strict, torch_dtype
from exec_service.model.parallel import INT8_KERNELS, int8pack_available, pack_linears, prepare_int8
from exec_service.runtime.backends import Backend, GraphFn, get_backend
from exec_service.runtime.compiled import CompiledGraphs, install
from exec_service.runtime.graphs import GraphSpec, example_step, graph_module, graph_set
from exec_service.runtime.kv_cache import KVCache
from exec_service.runtime.sampling import TokenCounts
from exec_service.runtime.step_io import StepInputs, StepOutputs
from shared.families.base import Architecture
from shared.layout import Target
from shared.shapes import ServingShape


@dataclass(frozen=True)
class RuntimeConfig:
    """The serving shape (``shared.shapes.ServingShape``: empty buckets are derived) and the
    runtime's options."""

    max_batch_size: int = 4
    max_seq_len: int = 256
    context_buckets: tuple[int, ...] = (16, 64)
    kv_buckets: tuple[int, ...] = field(default=())
    batch_buckets: tuple[int, ...] = field(default=())
    # speculation (shared.shapes): "off" | "ngram" | "draft", and k; with speculation on the verify
    # graphs (S = k + 1) join the graph set, their q width set by the drafter (``draft_width``)
    speculation: str = "off"
    num_speculative_tokens: int = 0
    backend: str = "cpu"
    # torch.compile every graph here, just in time (``neuron-serve compile`` builds graph sets so)
    compile: bool = False
    # a loaded graph set (exec_service.graph_sets): its graphs run compiled from its caches, every
    # other graph eager; None = ``compile`` decides
    graphs: CompiledGraphs | None = None
    num_candidates: int = 256  # per-rank / merged sampling candidates (see sampling.py)
    num_top_logprobs: int = 20  # the most top alternatives a request can ask for
    return_logits: bool = False  # also return full logits per step (parity tests; costs a gather)
    # per-row token ids masked out of sampling (EOS and stop ids while below min_new_tokens)
    max_suppressed_ids: int = 72
    # cpu linear kernels: "onednn" = fp32 weights prepacked for oneDNN (~1.5-2x MKL's GEMV/small
    # GEMM here; eager only), "aten" = plain F.linear (MKL). Other dtypes/backends always use aten.
    cpu_linear: str = "onednn"
    # decode steps whose every row is greedy with neutral penalties and no logprobs run the
    # tkg_*_greedy graph (one argmax instead of the full sampler; chosen by the engine)
    greedy_graphs: bool = True
    # int8 artifacts (prepare --quantize int8): "auto" = "int8pack" on cpu (aten._weight_int8pack_mm,
    # bfloat16 activations, up to INT8PACK_MAX_ROWS rows), "dequant" elsewhere ((x q^T) * scale in
    # the model dtype: cuda, large prefills, and exact-arithmetic parity tests)
    int8_kernel: str = "auto"
    # prefill chunks batched into one step hold at most this many (padded) tokens, B x S; 0 = the
    # default, max(largest context bucket, 1024): 8 prompts of 128 tokens are one step
    max_prefill_tokens: int = 0
    # the full sampler graphs also return the distribution they drew from (cand_ids / cand_probs):
    # a draft model's runtime (its q for exact speculative sampling)
    return_candidates: bool = False

    def __post_init__(self) -> None:
        # the serving-shape rules live in one place (shared/shapes.py; the CLI and Helm use them)
        shape = ServingShape(
            self.max_batch_size,
            self.max_seq_len,
            self.context_buckets,
            self.kv_buckets,
            self.batch_buckets,
            self.speculation,
            self.num_speculative_tokens,
        )
        if self.max_prefill_tokens < 0:
            raise ValueError(f"max_prefill_tokens must be >= 0 (0 = default), got {self.max_prefill_tokens}")
        if self.cpu_linear not in ("onednn", "aten"):
            raise ValueError(f"cpu_linear must be 'onednn' or 'aten', got {self.cpu_linear!r}")
        if self.int8_kernel not in ("auto", *INT8_KERNELS):
            raise ValueError(
                f"int8_kernel must be one of auto, {', '.join(INT8_KERNELS)}, got {self.int8_kernel!r}"
            )
        if self.num_candidates < 1 or self.num_top_logprobs < 1 or self.max_suppressed_ids < 1:
            raise ValueError("num_candidates, num_top_logprobs and max_suppressed_ids must be >= 1")
        object.__setattr__(self, "context_buckets", shape.context_buckets)
        object.__setattr__(self, "kv_buckets", shape.kv_buckets)
        object.__setattr__(self, "batch_buckets", shape.batch_buckets)
        object.__setattr__(self, "num_speculative_tokens", shape.num_speculative_tokens)
        if not self.max_prefill_tokens:
            object.__setattr__(self, "max_prefill_tokens", max(shape.context_buckets[-1], 1024))

    def resolved_int8_kernel(self) -> str:
        if self.int8_kernel != "auto":
            return self.int8_kernel
        return "int8pack" if self.backend == "cpu" and int8pack_available() else "dequant"

    @property
    def draft_width(self) -> int:
        """Q, the width of the verify graph's q per draft: 1 for n-gram drafts (one-hot), the draft
        model's sampling candidates for a draft model (whose runtime uses ``num_candidates`` too)."""
        return self.num_candidates if self.speculation == "draft" else 1

    def graph_specs(self) -> list[GraphSpec]:
        return graph_set(
            self.batch_buckets,
            self.max_seq_len,
            self.context_buckets,
            self.kv_buckets,
            self.max_suppressed_ids,
            self.num_speculative_tokens,
            self.draft_width,
        )


class Runner:
    def __init__(
        self,
        arch: Architecture,
        target: Target,
        state: Mapping[str, torch.Tensor],
        config: RuntimeConfig,
        comm: Collectives = SINGLE,
        rank: int = 0,
        backend: Backend | None = None,
    ) -> None:
        """``state``: this rank's shard (canonical names + ``rank``); ``rank`` is what the caller
        expects it to be (a shard of another rank is refused). ``backend``: runs the graphs
        instead of ``config.backend``'s (the StableHLO lowering traces neuron graphs on cpu)."""
        self.arch, self.target, self.config = arch, target, config
        if "rank" in state and state["rank"].numel() == 1 and int(state["rank"].reshape(-1)[0]) != rank:
            raise ShardLoadError(
                f"the shard loaded for rank {rank} holds rank {int(state['rank'].reshape(-1)[0])}"
            )
        if config.graphs is not None:
            install(config.graphs)  # this rank's process: the compiler caches, before any compile
        self.backend = backend or get_backend(config.backend, config.compile or config.graphs is not None)
        device = self.backend.device
        dtype = torch_dtype(target.dtype)
        model = DecoderModel(arch, target, dtype, comm)
        load_strict(model, state, what=f"rank {rank} shard")
        self.model = model.to(device).eval()
        if config.backend == "cpu" and config.cpu_linear == "onednn":  # eager and compiled
            pack_linears(self.model, config.max_batch_size)
        if target.quantization is not None:
            prepare_int8(self.model, config.resolved_int8_kernel())
        self.cache = KVCache(
            arch.num_layers,
            config.max_batch_size,
            target.kv_heads_per_rank,
            config.max_seq_len,
            arch.head_dim,
            dtype,
            device,
        )
        self.counts = TokenCounts(config.max_batch_size, target.vocab_per_rank, device)
        self.device = device
        self.graphs = {
            spec: graph_module(spec)(
                self.model,
                self.cache,
                self.counts,
                spec,
                config.num_candidates,
                config.num_top_logprobs,
                config.return_logits,
                config.return_candidates,
            )
            for spec in config.graph_specs()
        }
        self._fns: dict[GraphSpec, GraphFn] = {}
        self.warm_up_s: dict[str, float] = {}  # graph name -> seconds of its first call at start
        if self.backend.warm_up_at_start:
            self.warm_up()

    def runs_compiled(self, spec: GraphSpec) -> bool:
        graphs = self.config.graphs
        if graphs is not None:
            return graphs.runs_compiled(spec.name)
        return self.config.compile or self.backend.compiles_every_graph

    def fn(self, spec: GraphSpec) -> GraphFn:
        if spec not in self.graphs:
            raise KeyError(f"no graph {spec.name} in this runtime's graph set")
        if spec not in self._fns:
            graph = self.graphs[spec]
            self._fns[spec] = self.backend.prepare(graph) if self.runs_compiled(spec) else graph
        return self._fns[spec]

    @torch.no_grad()
    def run(self, spec: GraphSpec, inputs: StepInputs) -> StepOutputs:
        args = inputs.args(spec)  # checked against the spec, in its argument order
        fn = self.fn(spec)
        return StepOutputs.from_graph(self.graphs[spec].output_names, fn(*self.backend.place(args)))

    @torch.no_grad()
    def warm_up(self) -> None:
        """Every graph of the serving shape compiled (or loaded from the graph set's caches) and
        called once, in ``graph_specs()`` order — the same on every rank, which meet the same
        collectives — then the cache and the counts cleared and the backend told it is serving
        (neuron: a recompile is an error from here on). A graph set's ``check_loaded`` callback
        names a graph that had to be compiled (``--graphs required`` refuses to start then)."""
        graphs = self.config.graphs
        for spec in self.config.graph_specs():
            if not self.runs_compiled(spec):
                continue
            before = graphs.compiled_state() if graphs is not None else None
            t = time.perf_counter()
            self.fn(spec)(*self.backend.place(example_step(spec).args(spec)))
            self.warm_up_s[spec.name] = time.perf_counter() - t  # its compile, or its load
            if graphs is not None:
                graphs.check_loaded(spec.name, before)
        self.cache.reset()
        self.counts.counts.zero_()
        self.backend.serving()
