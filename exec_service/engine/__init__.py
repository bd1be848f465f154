"""Engine API (token level): ``Engine.add_request / step / abort``."""

from exec_service.engine.engine import Engine
from exec_service.engine.types import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
    TokenLogprob,
)
from exec_service.runtime.runner import RuntimeConfig

__all__ = [
    "Engine",
    "FinishReason",
    "Request",
    "RequestOutput",
    "RuntimeConfig",
    "SamplingParams",
    "StoppingCriteria",
    "TokenLogprob",
]
