"""The ExecService servicer: validate, convert, delegate — nothing else.

``Generate`` = ``requests.to_engine_request`` (the proto → ``GenerateParams`` → the one validation)
→ ``gateway.Gateway`` (ready gate, engine check, admission, the stream: shared with the HTTP front)
→ the ``GenerateResponse`` messages as they come. Errors are raised, never aborted here:
``gateway.ERRORS`` is the one exception → status map, applied to every RPC by
``shared.grpc_util.add_service`` (the loading / draining gate included) with the rejected-requests
metric as its hook; the HTTP front maps the same statuses to HTTP ones (``exec_service.http.errors``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from exec_service.gateway import Gateway
from exec_service.metrics import ExecMetrics
from exec_service.requests import to_engine_request, tokenize_request
from protos import exec_pb2, exec_pb2_grpc


class ExecServicer(exec_pb2_grpc.ExecServiceServicer):
    """The gRPC front of ``gateway`` (UNAVAILABLE while loading and draining)."""

    def __init__(self, metrics: ExecMetrics, gateway: Gateway) -> None:
        self.metrics = metrics.grpc
        self.gateway = gateway

    async def Generate(
        self, request: exec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[exec_pb2.GenerateResponse]:
        arrived = time.monotonic()
        s = self.gateway.ready()
        metadata_id = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        parsed = to_engine_request(request, s.tokenizer, s.limits, s.defaults, metadata_id)
        with self.gateway.open(s, parsed, self.metrics, arrived) as generation:
            async for msg in generation.messages():
                yield msg

    async def Tokenize(
        self, request: exec_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> exec_pb2.TokenizeResponse:
        s = self.gateway.ready()
        ids = tokenize_request(request, s.tokenizer, s.limits)
        return exec_pb2.TokenizeResponse(ids=ids, tokens=s.tokenizer.convert_ids_to_tokens(ids))

    async def GetModelInfo(
        self, request: exec_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> exec_pb2.ModelInfo:
        s = self.gateway.ready()
        man, engine = s.artifact.manifest, s.loop.engine
        cfg, counts = engine.config, s.loop.counts
        return exec_pb2.ModelInfo(
            model=man.name,
            revision=man.source.get("revision") or "",
            family=man.family,
            dtype=man.target.dtype,
            tp_degree=man.target.tp_degree,
            device=s.device,
            max_batch_size=cfg.max_batch_size,
            max_seq_len=cfg.max_seq_len,
            context_buckets=list(cfg.context_buckets),
            kv_buckets=list(cfg.kv_buckets),
            batch_buckets=list(cfg.batch_buckets),
            eos_token_ids=sorted(engine.eos_token_ids),
            vocab_size=man.architecture.vocab_size,
            manifest_digest=s.artifact.digest,
            limits=s.limits.to_proto(),
            running_requests=counts.running,
            waiting_requests=counts.waiting,
            free_slots=counts.free_slots,
            quantization=man.target.quantization or "none",
            manifest_uri=s.artifact.uri,
            graphs=exec_pb2.GraphSetInfo(key=s.graphs.key, origin=s.graphs.origin, count=s.graphs.count),
            speculation=exec_pb2.SpeculationInfo(
                method=cfg.speculation,
                num_speculative_tokens=cfg.num_speculative_tokens,
                draft_model=s.draft_model,
            ),
        )
