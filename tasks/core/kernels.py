"""Which fused-experts kernel a device runs, and the GPU numerics every CUDA path turns on.

transformers 5 runs a layer's routed experts through one of three kernels: `grouped_mm`
(`torch._grouped_mm`, one grouped GEMM), `eager` (a loop of plain matmuls over the experts a batch
routes to) or `batched_mm` (for decoding). Two facts decide between the first two on a GPU:

- `torch._grouped_mm` has native kernels from compute capability 9.0 (H100) on; on older GPUs
  (A100 is 8.0) current torch runs it as a per-expert fallback loop with a host sync per call, slower
  than eager's loop.
- it is not autocast-aware: with float32 weights under bf16 autocast (the ddp engine's master
  weights) transformers casts the activations to float32 and the experts run in that same fallback,
  at float32 speed. Eager's `F.linear` is autocast-aware and computes in bf16.

So a GPU path uses grouped_mm only where the expert weights themselves are 16-bit when it computes
(a bf16 teacher, FSDP2's bf16 parameters, DeepSpeed's bf16 module) and the GPU has native kernels;
everywhere else on a GPU it uses eager. On a CPU grouped_mm is the faster of the two (measured on
the demo teacher: 8.2k against 7.2k tokens/s).

Torch-free (the plan calls it with a GPU type's capability); `enable_gpu_numerics` imports torch.
"""

from __future__ import annotations

from typing import Optional

KERNELS = ("eager", "grouped_mm", "batched_mm")
# The first compute capability with native grouped GEMM kernels in torch.
GROUPED_MM_NATIVE_FROM = (9, 0)
# Compute capability of the GPU types `slimmoe plan --gpu` knows.
GPU_CAPABILITY: dict[str, tuple[int, int]] = {"a100": (8, 0), "a10g": (8, 6), "l4": (8, 9), "h100": (9, 0),
                                             "h200": (9, 0), "b200": (10, 0)}


def experts_kernel(requested: Optional[str], on_gpu: bool, capability: Optional[tuple[int, int]] = None,
                   weights_16bit: bool = True) -> str:
    """The experts kernel a model runs with: `requested` when a config names one, else the device's.

    `capability` is the GPU's (major, minor); None when unknown, and then eager, which is never the
    fallback. `weights_16bit` says whether the expert weights are bf16/fp16 while they compute (False
    under autocast over float32 weights)."""
    if requested not in (None, "auto"):
        if requested not in KERNELS:
            raise ValueError(f"experts_implementation={requested!r} is not a kernel; use one of {', '.join(KERNELS)}")
        return requested
    if not on_gpu:
        return "grouped_mm"
    native = capability is not None and tuple(capability) >= GROUPED_MM_NATIVE_FROM
    return "grouped_mm" if native and weights_16bit else "eager"


def fallback_reason(kernel: str, on_gpu: bool, capability: Optional[tuple[int, int]],
                    weights_16bit: bool) -> Optional[str]:
    """Why `kernel` would run the experts through torch's per-expert fallback on this device, or None."""
    if kernel != "grouped_mm" or not on_gpu:
        return None
    if not weights_16bit:
        return ("grouped_mm is not autocast-aware: over float32 weights it computes the experts in float32, "
                "one expert at a time")
    if capability is not None and tuple(capability) < GROUPED_MM_NATIVE_FROM:
        return (f"compute capability {capability[0]}.{capability[1]} has no native grouped GEMM in torch "
                "(it runs one expert at a time)")
    return None


def device_capability(device) -> Optional[tuple[int, int]]:
    """A CUDA device's compute capability; None for any other device."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch

    return tuple(torch.cuda.get_device_capability(device))


def enable_gpu_numerics(device) -> None:
    """TF32 for float32 matmuls and convolutions on a CUDA device (off by default in torch): what
    float32 work remains on a GPU path (scores, held-out KL, evaluation, a float32 teacher) then runs
    on tensor cores instead of CUDA cores. Nothing changes on a CPU: the legacy flags are used because
    `torch.set_float32_matmul_precision` also switches oneDNN's CPU matmuls, and mixing them with the
    per-backend `fp32_precision` API makes torch refuse to report the precision later."""
    import torch

    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
