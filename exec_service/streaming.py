"""One stream's text side: engine outputs → ``GenerateResponse`` messages.

A :class:`GenerationStream` owns the incremental detokenizer and the stop-string matcher of one
request (``exec_service.text``) and its bookkeeping (first/last token times, counts, seed). The
gateway (``exec_service.gateway``, for both fronts) feeds it each batch of ``RequestOutput``s that the engine loop delivered (everything that
piled up while the client lagged goes out in one message) and sends what it returns. A stop string
or a time limit ends the stream here; the gateway then aborts the engine request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from exec_service.engine import FinishReason, RequestOutput
from exec_service.engine_loop import Delivered
from exec_service.metrics import ProtocolMetrics
from exec_service.requests import ParsedRequest
from exec_service.text import IncrementalDetokenizer, StopMatcher, TokenDecoders
from protos import exec_pb2

FINISH_REASONS = {
    FinishReason.EOS: exec_pb2.EOS,
    FinishReason.STOP_TOKEN: exec_pb2.STOP_TOKEN,
    FinishReason.LENGTH: exec_pb2.LENGTH,
    FinishReason.CONTEXT_LENGTH: exec_pb2.CONTEXT_LENGTH,
    # only the server aborts an engine request: after a stop string (answered here, before the
    # abort's output arrives) or at the time limit
    FinishReason.ABORTED: exec_pb2.TIME_LIMIT,
}


@dataclass
class _Timing:
    arrived: float
    first_at: float | None = None
    last_at: float | None = None
    queue_ms: float = 0.0


@dataclass
class GenerationStream:
    parsed: ParsedRequest
    tokenizer: Any
    metrics: ProtocolMetrics  # the front's (protocol-labelled) metrics
    arrived: float = field(default_factory=time.monotonic)
    finished: bool = False
    generated: int = 0
    seed: int = 0
    decoders: TokenDecoders | None = None  # the server's shared ones for this tokenizer

    def __post_init__(self) -> None:
        p = self.parsed
        skip = p.skip_special_tokens
        self._detok = IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids=p.prompt_ids,
            skip_special_tokens=skip,
            decoder=None if self.decoders is None else self.decoders.get(skip),
        )
        self._stops = StopMatcher(list(p.stop_strings), include_stop_in_output=p.include_stop_in_output)
        self._timing = _Timing(self.arrived)

    @property
    def request_id(self) -> str:
        return self.parsed.request_id

    @property
    def deadline(self) -> float | None:
        """monotonic time of the time limit (None = none)."""
        t = self.parsed.time_limit_s
        return None if t is None else self.arrived + t

    def push(self, outputs: Sequence[Delivered]) -> exec_pb2.GenerateResponse | None:
        """The message for these outputs (None when they add no text and no ids yet). After a
        final message ``finished`` is set; ``stopped_by_text`` tells the gateway to abort."""
        new_ids: list[int] = []
        lps: list[exec_pb2.TokenLogprob] = []
        finish: FinishReason | None = None
        for d in outputs:
            out = d.output
            self._observe(out, d.step_started)
            new_ids.extend(out.new_token_ids)
            lps.extend(self._logprobs(out))
            if out.finish_reason is not None:
                finish = out.finish_reason
                break
        self.metrics.generated_tokens.inc(len(new_ids))
        text = self._stops.push(self._detok.push(new_ids))
        if self._stops.matched is not None:
            return self._final(text, new_ids, lps, exec_pb2.STOP_SEQUENCE, self._stops.matched)
        if finish is not None:
            text += self._stops.push(self._detok.flush()) + self._stops.flush()
            return self._final(text, new_ids, lps, FINISH_REASONS[finish])
        if text or new_ids:
            return exec_pb2.GenerateResponse(
                request_id=self.request_id, text=text, token_ids=new_ids, logprobs=lps
            )
        return None

    @property
    def stopped_by_text(self) -> bool:
        return self._stops.matched is not None

    def time_limit(self) -> exec_pb2.GenerateResponse:
        """The final message when the time limit passed before the engine finished."""
        text = self._stops.push(self._detok.flush()) + self._stops.flush()
        return self._final(text, [], [], exec_pb2.TIME_LIMIT)

    def _observe(self, out: RequestOutput, step_started: float) -> None:
        """Latency metrics and the counters of one engine output."""
        now, t = time.monotonic(), self._timing
        if out.new_token_ids:
            if t.first_at is None:
                t.first_at = now
                t.queue_ms = (step_started - t.arrived) * 1000
                self.metrics.ttft.observe(now - t.arrived)
                self.metrics.queue.observe(max(step_started - t.arrived, 0.0))
            elif t.last_at is not None:
                self.metrics.itl.observe((now - t.last_at) / len(out.new_token_ids))
            t.last_at = now
        self.seed = out.seed
        self.generated = out.num_generated_tokens

    def _logprobs(self, out: RequestOutput) -> list[exec_pb2.TokenLogprob]:
        if out.logprobs is None:
            return []
        tok = self.tokenizer
        return [
            exec_pb2.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[
                    exec_pb2.TopLogprob(token_id=t, logprob=v, token=tok.convert_ids_to_tokens(t) or "")
                    for t, v in lp.top
                ],
            )
            for lp in out.logprobs
        ]

    def _final(self, text: str, ids, lps, reason: int, matched: str = "") -> exec_pb2.GenerateResponse:
        """The last message: finish reason, usage, timing."""
        self.finished = True
        now, t = time.monotonic(), self._timing
        self.metrics.finish(exec_pb2.FinishReason.Name(reason).lower())
        return exec_pb2.GenerateResponse(
            request_id=self.request_id,
            text=text,
            token_ids=ids,
            logprobs=lps,
            finish_reason=reason,
            matched_stop=matched,
            usage=exec_pb2.Usage(prompt_tokens=len(self.parsed.prompt_ids), completion_tokens=self.generated),
            timing=exec_pb2.Timing(
                queue_ms=t.queue_ms,
                ttft_ms=((t.first_at or now) - t.arrived) * 1000,
                total_ms=(now - t.arrived) * 1000,
            ),
            seed=self.seed,
        )
