"""What one engine can take: the model-dependent rules for a request, written once.

``Engine.add_request`` applies :func:`check_request`; a front end (the gRPC servicer) checks only
what the protocol adds (field ranges, stop strings, chat) and lets the engine refuse the rest, so a
rule lives in exactly one place and every front end answers with the same words. The messages name
the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from exec_service.engine.types import Request


@dataclass(frozen=True)
class EngineLimits:
    max_seq_len: int
    vocab_size: int
    max_top_logprobs: int
    max_suppressed_ids: int
    eos_token_ids: frozenset[int]

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_seq_len - 1  # room for at least one generated token

    @property
    def max_new_tokens(self) -> int:
        """What the server accepts (``requests.Limits``); the engine itself stops a longer request
        at the context length (FinishReason.CONTEXT_LENGTH)."""
        return self.max_seq_len - 1


def check_request(request: Request, limits: EngineLimits) -> None:
    """Raise ValueError naming the first field this engine cannot take."""
    n = len(request.prompt_token_ids)
    if n > limits.max_prompt_tokens:
        raise ValueError(
            f"prompt has {n} tokens; the limit is {limits.max_prompt_tokens} (this engine takes at most "
            f"{limits.max_prompt_tokens}: max_seq_len {limits.max_seq_len} minus one generated token)"
        )
    vocab = limits.vocab_size
    bad = [t for t in request.prompt_token_ids if t >= vocab]
    if bad:
        raise ValueError(f"prompt_token_ids {bad[:4]} are outside the vocabulary (size {vocab})")
    sp, stop = request.sampling, request.stopping
    if sp.top_k > vocab:
        raise ValueError(f"sampling.top_k must be at most the vocabulary size {vocab}, got {sp.top_k}")
    if sp.top_logprobs > limits.max_top_logprobs:
        raise ValueError(
            f"output.top_logprobs must be at most {limits.max_top_logprobs} (top_logprobs {sp.top_logprobs} "
            f"> the configured maximum {limits.max_top_logprobs})"
        )
    bad = [t for t in stop.stop_token_ids if t >= vocab]
    if bad:
        raise ValueError(f"stop_token_ids {bad[:4]} are outside the vocabulary (size {vocab})")
    if stop.min_new_tokens:
        eos = set() if stop.ignore_eos else set(limits.eos_token_ids)
        n_sup = len(set(stop.stop_token_ids) | eos)
        if n_sup > limits.max_suppressed_ids:
            raise ValueError(
                f"min_new_tokens with {n_sup} stop/EOS ids: at most {limits.max_suppressed_ids} supported"
            )
