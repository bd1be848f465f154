"""The exec server's Prometheus metrics (one registry per server object: several servers in one
process, as in tests, never collide on names).

Per-request metrics carry a ``protocol`` label (``grpc`` | ``http``: the front the request came
through); engine-wide ones (running, waiting, free slots, steps, graphs) do not. A front records
through its :class:`ProtocolMetrics`, whose label children are bound once (a ``labels()`` lookup per
token would cost a dict lookup and a lock on the hot path).
"""

from __future__ import annotations

from typing import Any

from exec_service.engine.types import SpeculationStats
from shared import grpc_util

PROTOCOLS = ("grpc", "http")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ExecMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = grpc_util.new_metrics_registry()
        r, lat = self.registry, LATENCY_BUCKETS
        p = ["protocol"]
        self.ttft = Histogram("neuron_serve_ttft_seconds", "Time to first token", p, buckets=lat, registry=r)
        self.itl = Histogram(
            "neuron_serve_inter_token_latency_seconds",
            "Time between tokens of one stream",
            p,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "neuron_serve_e2e_latency_seconds", "Request latency", p, buckets=lat, registry=r
        )
        self.queue = Histogram(
            "neuron_serve_queue_seconds", "Time before the first step", p, buckets=lat, registry=r
        )
        self.running = Gauge("neuron_serve_running_requests", "Requests holding a KV slot", registry=r)
        self.waiting = Gauge("neuron_serve_waiting_requests", "Requests waiting for a slot", registry=r)
        self.free_slots = Gauge("neuron_serve_free_slots", "Free KV cache slots", registry=r)
        self.prompt_tokens = Counter("neuron_serve_prompt_tokens", "Prompt tokens admitted", p, registry=r)
        self.generated_tokens = Counter("neuron_serve_generated_tokens", "Tokens generated", p, registry=r)
        self.finished = Counter(
            "neuron_serve_requests_finished", "Finished requests by reason", ["reason", *p], registry=r
        )
        self.rejected = Counter(
            "neuron_serve_requests_rejected", "Rejected requests by code", ["code", *p], registry=r
        )
        self.steps = Counter("neuron_serve_engine_steps", "Engine steps", registry=r)
        self.graphs = Gauge(
            "neuron_serve_graphs",
            "Step graphs running compiled, by graph set key and origin (loaded | compiled | eager)",
            ["key", "origin"],
            registry=r,
        )
        self.graph_compiles_at_start = Gauge(
            "neuron_serve_graph_compiles_at_start",
            "Graphs the backend compiler built at start (Inductor FX graph cache misses): 0 with a "
            "complete graph set",
            registry=r,
        )

        self.grpc = ProtocolMetrics(self, "grpc")
        self.http = ProtocolMetrics(self, "http")
        # speculation (exec-server --speculation): cumulative engine counters, mirrored each step
        self.draft_tokens = Counter(
            "neuron_serve_speculation_draft_tokens", "Draft tokens proposed to the verify graph", registry=r
        )
        self.accepted_tokens = Counter(
            "neuron_serve_speculation_accepted_tokens", "Draft tokens the verify graph accepted", registry=r
        )
        self.verified_rows = Counter(
            "neuron_serve_speculation_verified_rows", "Sequences verified with drafts (per step)", registry=r
        )
        self.mean_accepted_length = Gauge(
            "neuron_serve_speculation_mean_accepted_length",
            "Tokens a speculating sequence gains per verify step: 1 + accepted / verified rows",
            registry=r,
        )
        self._speculation = SpeculationStats()

    def speculation(self, stats: SpeculationStats) -> None:
        """The engine's cumulative counters as of this step (counters advance by the difference)."""
        last = self._speculation
        if stats == last:
            return
        self.draft_tokens.inc(stats.draft_tokens - last.draft_tokens)
        self.accepted_tokens.inc(stats.accepted_tokens - last.accepted_tokens)
        self.verified_rows.inc(stats.verified_rows - last.verified_rows)
        self.mean_accepted_length.set(stats.mean_accepted_length)
        self._speculation = stats

    def reject(self, code) -> None:
        """The gRPC error map's hook: every refused or failed RPC, by status code."""
        self.grpc.reject(code)


class ProtocolMetrics:
    """The per-request metrics of one front, label children bound once."""

    def __init__(self, metrics: ExecMetrics, protocol: str) -> None:
        assert protocol in PROTOCOLS, protocol
        self.protocol = protocol
        self._all = metrics
        self.ttft = metrics.ttft.labels(protocol)
        self.itl = metrics.itl.labels(protocol)
        self.e2e = metrics.e2e.labels(protocol)
        self.queue = metrics.queue.labels(protocol)
        self.prompt_tokens = metrics.prompt_tokens.labels(protocol)
        self.generated_tokens = metrics.generated_tokens.labels(protocol)

    def finish(self, reason: str) -> None:
        """A stream ended: ``reason`` is the finish reason's name (``length``, ``eos``, ``cancelled`` …)."""
        self._all.finished.labels(reason, self.protocol).inc()

    def reject(self, code: Any) -> None:
        """A request refused or failed with this status code (a ``grpc.StatusCode``)."""
        self._all.rejected.labels(code.name, self.protocol).inc()
