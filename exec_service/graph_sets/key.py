"""``graph_key``: a hash of exactly what changes the compiled code, and never the weights.

It is computed from (and ``graphs.json`` records in clear):

* ``architecture``: the model's shape (``Architecture``) without the fields no graph reads (token
  ids, the checkpoint's own dtype): two checkpoints of one config share a key;
* ``target``: tp degree, dtype, quantization, head / vocab padding (``Target``);
* ``serving_shape``: max batch, max sequence length, context / KV / batch buckets, speculation
  (drafter and k: the verify graphs' shapes);
* ``backend``: its name and every runtime option that changes a graph's code;
* ``versions``: torch, Python, and a digest of this package's model + runtime sources (the code
  the graphs are traced from);
* ``device_target``: the CPU's vector ISA as Inductor picks it (cpu), the device's name and
  compute capability (cuda), or the Neuron target (trn2 / trn3), ``NEURON_CC_FLAGS`` and the
  torch-neuronx, neuronx-cc and Neuron runtime versions (neuron: TorchNeuron's NEFF cache keys on
  the StableHLO, target and flags but not on the compiler version, so this key does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from exec_service.runtime.runner import RuntimeConfig
from shared.families.base import Architecture
from shared.layout import Target

KEY_SCHEMA = 1
# Architecture fields no graph reads (host-side token ids; the checkpoint's dtype, for information)
_NOT_IN_GRAPHS = ("bos_token_id", "eos_token_ids", "pad_token_id", "torch_dtype")
_CODE_DIRS = ("model", "runtime")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(_jsonable(v) for v in value)
    return value


def code_digest() -> str:
    """sha256 over the model and runtime sources that graphs are traced from."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in _CODE_DIRS:
        for path in sorted((root / d).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def device_target(backend: str) -> dict[str, str | None]:
    if backend == "neuron":
        from exec_service.runtime.neuron.sdk import device_target as neuron_target

        return neuron_target()
    import torch

    if backend == "cuda":
        if not torch.cuda.is_available():
            return {"device": "cuda", "name": "unavailable"}
        major, minor = torch.cuda.get_device_capability()
        return {"device": "cuda", "name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {
        "device": backend,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "inductor_vec_isa": str(pick_vec_isa()) or "none",
    }


def key_inputs(arch: Architecture, target: Target, config: RuntimeConfig) -> dict[str, Any]:
    import torch

    architecture = {k: v for k, v in _jsonable(arch).items() if k not in _NOT_IN_GRAPHS}
    return {
        "key_schema": KEY_SCHEMA,
        "architecture": architecture,
        "target": _jsonable(target),
        "serving_shape": {
            "max_batch_size": config.max_batch_size,
            "max_seq_len": config.max_seq_len,
            "context_buckets": list(config.context_buckets),
            "kv_buckets": list(config.kv_buckets),
            "batch_buckets": list(config.batch_buckets),
            "speculation": config.speculation,
            "num_speculative_tokens": config.num_speculative_tokens,
        },
        "backend": {
            "name": config.backend,
            "options": {
                "cpu_linear": config.cpu_linear if config.backend == "cpu" else "aten",
                "int8_kernel": config.resolved_int8_kernel() if target.quantization else None,
                "num_candidates": config.num_candidates,
                "num_top_logprobs": config.num_top_logprobs,
                "max_suppressed_ids": config.max_suppressed_ids,
                "return_logits": config.return_logits,
                "return_candidates": config.return_candidates,
            },
        },
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "code": code_digest(),
        },
        "device_target": device_target(config.backend),
    }


def graph_key(inputs: dict[str, Any]) -> str:
    """32 hex digits of the sha256 of the canonical JSON of ``inputs``."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def graph_set_prefix(key: str) -> str:
    """Where a graph set lives in a store (DESIGN §4)."""
    return f"graphs/{key}"
