"""Which tensor-parallel sizes a model's shape can be served at by vLLM and SGLang.

Tensor parallelism splits attention by heads and the experts by their intermediate rows, so:
- query heads must divide by TP;
- KV heads are either split (KV heads a multiple of TP) or replicated (TP a multiple of KV heads);
- every routed (and shared) expert's intermediate size must divide by TP; block-FP8 MoE kernels
  further need each GPU's share to be a multiple of 128 rows.
A cut that breaks these gives a model nobody can serve at the TP they have. Torch-free: the workflow's
validation and `slimmoe plan` call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

TP_SIZES = (1, 2, 4, 8, 16)
FP8_BLOCK = 128


@dataclass(frozen=True)
class ServeShape:
    """The sizes tensor parallelism splits (None where the model has no such part, or it is unknown)."""

    num_attention_heads: Optional[int]
    num_key_value_heads: Optional[int]
    expert_intermediate_size: int
    shared_expert_intermediate_size: Optional[int] = None


def tp_problems(shape: ServeShape, tp: int, block_fp8: bool = False) -> list[tuple[str, str]]:
    """(field, rule broken) for each size that cannot be split over `tp` GPUs; empty when it serves."""
    out = []
    h, kv = shape.num_attention_heads, shape.num_key_value_heads
    if h is not None and h % tp:
        out.append(("num_key_value_heads", f"{h} query heads do not divide by tensor_parallel {tp}"))
    if kv is not None and (tp % kv if tp >= kv else kv % tp):
        out.append(("num_key_value_heads", f"{kv} KV heads can neither be split over {tp} GPUs (a multiple of {tp}) "
                                           f"nor replicated on them ({tp} a multiple of {kv})"))
    for field, size in (("expert_intermediate_size", shape.expert_intermediate_size),
                        ("shared_expert_intermediate_size", shape.shared_expert_intermediate_size)):
        if size is None:
            continue
        if size % tp:
            out.append((field, f"{field}={size} does not divide by tensor_parallel {tp}"))
        elif block_fp8 and (size // tp) % FP8_BLOCK:
            out.append((field, f"{field}={size} gives {size // tp} rows per GPU at tensor_parallel {tp}; block-FP8 "
                               f"MoE kernels need a multiple of {FP8_BLOCK}"))
    return out


def servable_tp(shape: ServeShape, sizes: Iterable[int] = TP_SIZES, block_fp8: bool = False) -> list[int]:
    return [tp for tp in sizes if not tp_problems(shape, tp, block_fp8)]


def kv_heads_that_serve(shape: ServeShape, tensor_parallel: Sequence[int], most: int) -> list[int]:
    """The KV-head counts up to `most` (query heads following, as a cut keeps each group whole) that serve
    at every size in `tensor_parallel`."""
    h, kv = shape.num_attention_heads, shape.num_key_value_heads
    group = h // kv if h and kv else None
    fits = []
    for n in range(1, most + 1):
        trial = ServeShape(group * n if group else None, n, shape.expert_intermediate_size)
        if all(not any(f == "num_key_value_heads" for f, _ in tp_problems(trial, tp)) for tp in tensor_parallel):
            fits.append(n)
    return fits


def sizes_that_serve(size: int, tensor_parallel: Sequence[int], align: int = 1, block_fp8: bool = False,
                     most: Optional[int] = None) -> list[int]:
    """The nearest sizes below and above `size` (up to `most`) on a multiple every TP size (and `align`)
    accepts."""
    step = align
    for tp in tensor_parallel:
        need = tp * (FP8_BLOCK if block_fp8 else 1)
        step = step * need // _gcd(step, need)
    lower = size // step * step
    return [s for s in (lower, lower + step) if s > 0 and (most is None or s <= most)]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
