"""The canonical TP-sharded layout (DESIGN §4): GQA head planning, vocab padding, and one generic
sharder driven by a declarative plan keyed by parameter name.

Shapes (H = q heads, KV = kv heads, D = head_dim, I = intermediate, E = experts):
  layers.{i}.attn.qkv.weight   [(H + 2 KV) D, hidden]  column, fused parts (q, k, v), per rank [q_r; k_r; v_r]
  layers.{i}.attn.o.weight     [hidden, H D]           row (input dim, per head)
  layers.{i}.mlp.gate_up.weight[2 I, hidden]           column, fused parts (gate, up), per rank [gate_r; up_r]
  layers.{i}.mlp.down.weight   [hidden, I]             row
  layers.{i}.moe.experts.gate_up [E, 2 I, hidden]      column on dim 1, fused (gate, up)
  layers.{i}.moe.experts.down  [E, hidden, I]          row on dim 2
  embed.weight, lm_head.weight [V, hidden]             vocab: padded to a multiple of tp, split on dim 0
  norms, routers, q/k norms    replicated
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from shared.families.base import Architecture

NONE = "none"
REPLICATE = "replicate_to_tp_degree"
MHA = "convert_to_mha"


class LayoutError(ValueError):
    """The requested tensor-parallel degree cannot shard this architecture."""


@dataclass(frozen=True)
class HeadLayout:
    """Where each padded/replicated head comes from.

    ``q_map[j]`` is the original q head stored at padded position j (-1 = a zero pad head);
    ``kv_map`` likewise for kv heads. Rank r holds positions [r*per_rank, (r+1)*per_rank).
    Within a rank, local q head i attends local kv head i // (heads_per_rank // kv_heads_per_rank).
    """

    strategy: str
    tp: int
    q_map: tuple[int, ...]
    kv_map: tuple[int, ...]

    @property
    def heads_per_rank(self) -> int:
        return len(self.q_map) // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        return len(self.kv_map) // self.tp


def plan_heads(num_heads: int, num_kv_heads: int, tp: int, strategy: str | None = None) -> HeadLayout:
    """Choose and build the GQA layout. ``strategy`` None picks: plain sharding when kv % tp == 0,
    REPLICATE_TO_TP_DEGREE when tp % kv == 0, else CONVERT_TO_MHA."""
    h, kv = num_heads, num_kv_heads
    g = h // kv  # q heads per kv group
    if strategy not in (None, NONE, REPLICATE, MHA):
        raise LayoutError(f"unknown gqa_strategy {strategy!r}; use {REPLICATE} or {MHA}")
    if strategy is None:
        strategy = NONE if kv % tp == 0 else REPLICATE if tp % kv == 0 else MHA
    elif strategy == REPLICATE:
        if kv % tp == 0:
            strategy = NONE  # every rank already has whole kv heads: nothing to replicate
        elif tp % kv != 0:
            raise LayoutError(
                f"gqa_strategy {REPLICATE} needs tp ({tp}) to be a multiple of num_key_value_heads "
                f"({kv}); use {MHA} or a tp that divides or is divided by {kv}"
            )
    elif strategy == NONE and kv % tp != 0:
        raise LayoutError(f"num_key_value_heads ({kv}) is not divisible by tp ({tp})")

    if strategy == NONE:
        q_map, kv_map = tuple(range(h)), tuple(range(kv))
    elif strategy == REPLICATE:
        rep = tp // kv
        gp = math.ceil(g / rep) * rep  # each group padded so its q heads split evenly over rep ranks
        q_map = tuple(j * g + t if t < g else -1 for j in range(kv) for t in range(gp))
        kv_map = tuple(j for j in range(kv) for _ in range(rep))
    else:  # MHA: each q head gets its own copy of its kv head; pad heads at the tail
        hp = math.ceil(h / tp) * tp
        q_map = tuple(i if i < h else -1 for i in range(hp))
        kv_map = tuple(i // g if i < h else -1 for i in range(hp))
    layout = HeadLayout(strategy, tp, q_map, kv_map)
    assert len(q_map) % tp == 0 and len(kv_map) % tp == 0
    assert layout.heads_per_rank % layout.kv_heads_per_rank == 0
    return layout


@dataclass(frozen=True)
class Target:
    """The deployment shape of an artifact: recorded in the manifest, read back by exec."""

    tp_degree: int
    dtype: str
    gqa_strategy: str
    num_heads_padded: int
    num_kv_heads_padded: int
    heads_per_rank: int
    kv_heads_per_rank: int
    vocab_size: int
    vocab_size_padded: int
    vocab_per_rank: int
    intermediate_per_rank: int
    moe_intermediate_per_rank: int
    q_map: tuple[int, ...]
    kv_map: tuple[int, ...]
    quantization: str | None = None  # None, or "int8": see shared/quantize.py
    quantized_lm_head: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["q_map"], d["kv_map"] = list(self.q_map), list(self.kv_map)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        d = dict(d)
        d["q_map"], d["kv_map"] = tuple(d["q_map"]), tuple(d["kv_map"])
        return cls(**d)


def divide(n: int, tp: int, what: str) -> int:
    """``n // tp`` when ``tp`` divides ``n``; else :class:`LayoutError` naming ``what`` (the one
    check of every per-rank size, in prep's target planning and in exec's parallel layers)."""
    if tp < 1 or n % tp != 0:
        raise LayoutError(f"{what} ({n}) is not divisible by tp ({tp})")
    return n // tp


def make_target(
    arch: Architecture,
    tp: int,
    dtype: str,
    gqa_strategy: str | None = None,
    quantization: str | None = None,
    quantized_lm_head: bool = False,
) -> Target:
    if tp < 1:
        raise LayoutError(f"tp must be >= 1, got {tp}")
    heads = plan_heads(arch.num_heads, arch.num_kv_heads, tp, gqa_strategy)
    vocab_padded = math.ceil(arch.vocab_size / tp) * tp
    moe_i = 0
    if arch.moe is not None:
        moe_i = divide(arch.moe.intermediate_size, tp, "moe intermediate_size")
        if arch.moe.shared_expert_intermediate_size:
            divide(arch.moe.shared_expert_intermediate_size, tp, "shared expert intermediate_size")
    return Target(
        tp_degree=tp,
        dtype=dtype,
        gqa_strategy=heads.strategy,
        num_heads_padded=len(heads.q_map),
        num_kv_heads_padded=len(heads.kv_map),
        heads_per_rank=heads.heads_per_rank,
        kv_heads_per_rank=heads.kv_heads_per_rank,
        vocab_size=arch.vocab_size,
        vocab_size_padded=vocab_padded,
        vocab_per_rank=vocab_padded // tp,
        intermediate_per_rank=divide(arch.intermediate_size, tp, "intermediate_size"),
        moe_intermediate_per_rank=moe_i,
        q_map=heads.q_map,
        kv_map=heads.kv_map,
        quantization=quantization,
        quantized_lm_head=quantized_lm_head and quantization is not None,
    )


# ---------------------------------------------------------------------------------------------
# The plan: parameter name -> how it is split. One table, applied by one sharder.
# ---------------------------------------------------------------------------------------------

REPLICATED = "replicate"
QKV = "qkv"  # column, fused (q, k, v) with head remapping
O_PROJ = "o"  # row on dim 1 with head remapping
FUSED2 = "fused2"  # column on `dim`, two equal fused parts (gate, up)
ROW = "row"  # split on `dim`
VOCAB = "vocab"  # padded to vocab_size_padded on dim 0, split on dim 0


@dataclass(frozen=True)
class ShardSpec:
    kind: str
    dim: int = 0


PLAN: tuple[tuple[str, ShardSpec], ...] = (
    (r"layers\.\d+\.attn\.qkv\.(weight|bias)", ShardSpec(QKV, 0)),
    (r"layers\.\d+\.attn\.o\.weight", ShardSpec(O_PROJ, 1)),
    (r"layers\.\d+\.(mlp|moe\.shared)\.gate_up\.(weight|bias)", ShardSpec(FUSED2, 0)),
    (r"layers\.\d+\.(mlp|moe\.shared)\.down\.weight", ShardSpec(ROW, 1)),
    (r"layers\.\d+\.moe\.experts\.gate_up", ShardSpec(FUSED2, 1)),
    (r"layers\.\d+\.moe\.experts\.down", ShardSpec(ROW, 2)),
    (r"(embed|lm_head)\.weight", ShardSpec(VOCAB, 0)),
    (
        r"layers\.\d+\.(input_norm|post_attn_norm|pre_ff_norm|post_ff_norm)\.weight"
        r"|layers\.\d+\.attn\.(q_norm|k_norm)\.weight"
        r"|layers\.\d+\.attn\.o\.bias|layers\.\d+\.(mlp|moe\.shared)\.down\.bias"
        r"|layers\.\d+\.moe\.router\.(weight|bias)|layers\.\d+\.moe\.shared_gate\.weight"
        r"|norm\.weight",
        ShardSpec(REPLICATED),
    ),
)
_COMPILED = tuple((re.compile(p), s) for p, s in PLAN)


SCALE_SUFFIX = "_scale"  # per-output-channel scales of a quantized weight: "<weight name>_scale"


def spec_for(name: str) -> ShardSpec:
    if name.endswith(SCALE_SUFFIX):
        # A weight's scales [..., out] follow its output rows: split with column-parallel rows,
        # replicated where the weight is split on its input dim (row-parallel).
        base = spec_for(name[: -len(SCALE_SUFFIX)])
        return ShardSpec(REPLICATED) if base.kind in (O_PROJ, ROW) else base
    for pattern, spec in _COMPILED:
        if pattern.fullmatch(name):
            return spec
    raise LayoutError(f"no sharding rule for parameter {name!r}")


def _gather_heads(t: torch.Tensor, head_map: Sequence[int], head_dim: int, dim: int) -> torch.Tensor:
    """Reorder/replicate/zero-pad heads along ``dim`` (size n_heads*head_dim) by ``head_map``."""
    shape = list(t.shape)
    n = shape[dim] // head_dim
    if tuple(head_map) == tuple(range(n)):
        return t  # plain split: nothing to move (the common case, and a full copy otherwise)
    heads = t.reshape([*shape[:dim], n, head_dim, *shape[dim + 1 :]])
    src = torch.tensor([max(i, 0) for i in head_map], dtype=torch.long, device=t.device)
    out = heads.index_select(dim, src)
    if any(i < 0 for i in head_map):
        keep = torch.tensor([i >= 0 for i in head_map], device=t.device)
        view = [1] * out.dim()
        view[dim] = len(head_map)
        out = out * keep.reshape(view).to(out.dtype)
    return out.reshape([*shape[:dim], len(head_map) * head_dim, *shape[dim + 1 :]])


def _ungather_heads(t: torch.Tensor, head_map: Sequence[int], head_dim: int, dim: int) -> torch.Tensor:
    """Inverse of _gather_heads: the first stored copy of each original head, padding dropped."""
    n_orig = max(head_map) + 1
    first = [head_map.index(h) for h in range(n_orig)]
    shape = list(t.shape)
    heads = t.reshape([*shape[:dim], len(head_map), head_dim, *shape[dim + 1 :]])
    out = heads.index_select(dim, torch.tensor(first, dtype=torch.long, device=t.device))
    return out.reshape([*shape[:dim], n_orig * head_dim, *shape[dim + 1 :]])


def _split(t: torch.Tensor, tp: int, dim: int, name: str) -> list[torch.Tensor]:
    if t.shape[dim] % tp != 0:
        raise LayoutError(f"{name}: dim {dim} of size {t.shape[dim]} is not divisible by tp ({tp})")
    return [c.contiguous() for c in t.chunk(tp, dim=dim)] if tp > 1 else [t.contiguous()]


def shard(name: str, t: torch.Tensor, arch: Architecture, target: Target) -> list[torch.Tensor]:
    """Split one canonical (converted, unpadded) tensor into ``tp`` rank tensors."""
    spec, tp, d = spec_for(name), target.tp_degree, arch.head_dim
    if spec.kind == REPLICATED:
        return [t.contiguous()] * tp
    if spec.kind == QKV:
        q, k, v = t.split([arch.q_size, arch.kv_size, arch.kv_size], dim=0)
        qs = _split(_gather_heads(q, target.q_map, d, 0), tp, 0, name)
        ks = _split(_gather_heads(k, target.kv_map, d, 0), tp, 0, name)
        vs = _split(_gather_heads(v, target.kv_map, d, 0), tp, 0, name)
        return [torch.cat([qs[r], ks[r], vs[r]], dim=0) for r in range(tp)]
    if spec.kind == O_PROJ:
        return _split(_gather_heads(t, target.q_map, d, spec.dim), tp, spec.dim, name)
    if spec.kind == FUSED2:
        a, b = t.chunk(2, dim=spec.dim)
        as_, bs = _split(a, tp, spec.dim, name), _split(b, tp, spec.dim, name)
        return [torch.cat([as_[r], bs[r]], dim=spec.dim) for r in range(tp)]
    if spec.kind == ROW:
        return _split(t, tp, spec.dim, name)
    if spec.kind == VOCAB:
        pad = target.vocab_size_padded - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], dim=0)
        return _split(t, tp, 0, name)
    raise AssertionError(spec.kind)


def unshard(name: str, shards: Sequence[torch.Tensor], arch: Architecture, target: Target) -> torch.Tensor:
    """Inverse of :func:`shard`: the converted tensor, with padding and replicas dropped."""
    spec, d = spec_for(name), arch.head_dim
    if spec.kind == REPLICATED:
        return shards[0]
    if spec.kind == QKV:
        qp, kp = target.heads_per_rank * d, target.kv_heads_per_rank * d
        parts = [s.split([qp, kp, kp], dim=0) for s in shards]
        q = _ungather_heads(torch.cat([p[0] for p in parts]), target.q_map, d, 0)
        k = _ungather_heads(torch.cat([p[1] for p in parts]), target.kv_map, d, 0)
        v = _ungather_heads(torch.cat([p[2] for p in parts]), target.kv_map, d, 0)
        return torch.cat([q, k, v], dim=0)
    if spec.kind == O_PROJ:
        return _ungather_heads(torch.cat(list(shards), dim=spec.dim), target.q_map, d, spec.dim)
    if spec.kind == FUSED2:
        halves = [s.chunk(2, dim=spec.dim) for s in shards]
        a = torch.cat([h[0] for h in halves], dim=spec.dim)
        b = torch.cat([h[1] for h in halves], dim=spec.dim)
        return torch.cat([a, b], dim=spec.dim)
    if spec.kind == ROW:
        return torch.cat(list(shards), dim=spec.dim)
    if spec.kind == VOCAB:
        return torch.cat(list(shards), dim=0)[: target.vocab_size]
    raise AssertionError(spec.kind)


def canonical_shape(name: str, arch: Architecture) -> tuple[int, ...] | None:
    """The expected shape of a converted (unsharded) parameter; None when not checked here."""
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    qkv = arch.q_size + 2 * arch.kv_size
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    local = m.group(2) if m else name
    moe = arch.moe
    table: dict[str, tuple[int, ...]] = {
        "embed.weight": (v, h),
        "lm_head.weight": (v, h),
        "norm.weight": (h,),
        "input_norm.weight": (h,),
        "post_attn_norm.weight": (h,),
        "attn.qkv.weight": (qkv, h),
        "attn.qkv.bias": (qkv,),
        "attn.o.weight": (h, arch.q_size),
        "attn.o.bias": (h,),
        "attn.q_norm.weight": (arch.head_dim,),
        "attn.k_norm.weight": (arch.head_dim,),
        "mlp.gate_up.weight": (2 * i, h),
        "mlp.gate_up.bias": (2 * i,),
        "mlp.down.weight": (h, i),
        "mlp.down.bias": (h,),
    }
    if moe is not None:
        e, mi, si = moe.num_experts, moe.intermediate_size, moe.shared_expert_intermediate_size
        table |= {
            "moe.router.weight": (e, h),
            "moe.experts.gate_up": (e, 2 * mi, h),
            "moe.experts.down": (e, h, mi),
            "moe.shared.gate_up.weight": (2 * si, h),
            "moe.shared.down.weight": (h, si),
        }
    return table.get(local)
