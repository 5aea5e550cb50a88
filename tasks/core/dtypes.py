"""Dtype names as configs spell them, their sizes, and the one rule for which dtype a device computes in.

Torch-free, so that parsing a workflow and planning it never import torch; `core/runtime.py` maps
these names to torch dtypes where a tensor is made."""

from __future__ import annotations

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a dtype name; use one of {', '.join(DTYPE_BYTES)}") from None


def compute_dtype(on_gpu: bool) -> str:
    """What `auto` means for weights and compute: bfloat16 on a GPU (A100 and later run it at full
    speed and it keeps float32's range), float32 on a CPU (where bfloat16 matmuls are slow)."""
    return "bfloat16" if on_gpu else "float32"


def resolve_dtype(name: str, on_gpu: bool) -> str:
    """A config's dtype field: a name as it is, `auto` by the device."""
    return compute_dtype(on_gpu) if name == "auto" else name
