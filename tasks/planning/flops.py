"""Compute and time: FLOPs from active parameters, seconds and GPU-hours at a model FLOPs utilisation.

A forward is 2 FLOPs per active parameter per token, a training step (forward + backward) 6; a
stage's scoring is a forward and backward over its calibration tokens. Attention's own
seq x seq work is left out (under a tenth of the total at these sizes and a 4k context), which
the MFU absorbs like every other inefficiency.
"""

from __future__ import annotations

# Dense bf16 peak per GPU, TFLOP/s (no sparsity).
PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0}
DEFAULT_MFU = 0.4


def forward_flops(active_params: int, tokens: int) -> float:
    return 2.0 * active_params * tokens


def train_flops(active_params: int, tokens: int) -> float:
    return 6.0 * active_params * tokens


def peak_tflops(gpu: str | None = None, peak: float | None = None) -> float | None:
    """The peak from an explicit value or a GPU name in PEAK_TFLOPS (None when neither is given)."""
    if peak is not None:
        if peak <= 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {peak}")
        return float(peak)
    if gpu is None:
        return None
    try:
        return PEAK_TFLOPS[gpu.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(PEAK_TFLOPS)} or give the peak TFLOP/s") from None


def seconds_for(flops: float, devices: float, peak_tflops_per_device: float, mfu: float = DEFAULT_MFU) -> float:
    """Wall-clock seconds for `flops` on `devices` devices at `mfu` of their peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    return flops / (max(devices, 1e-9) * peak_tflops_per_device * 1e12 * mfu)


def device_hours(seconds: float, devices: float) -> float:
    return seconds * devices / 3600.0


__all__ = ["DEFAULT_MFU", "PEAK_TFLOPS", "device_hours", "forward_flops", "peak_tflops", "seconds_for", "train_flops"]
