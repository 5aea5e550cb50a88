"""Group-wise asymmetric weight quantization: round-to-nearest and GPTQ.

Every weight is handled in its canonical [out, in] layout (rows = output features). Groups run
along the input axis: `group = min(group_size, in)`, and when `in` is not a multiple of that the
last group is zero-padded (the padded columns are dropped on dequantization). Per (row, group):
a float16 scale and a float16 zero point (an integer, as in GPTQ), with codes in [0, 2**b - 1]:

    w ~ (code - zero) * scale,  scale = (max - min) / (2**b - 1),  zero = round(-min / scale)

where [min, max] covers the group and 0 (so 0 stays exactly representable). With `clip_search`
the range is shrunk by the factor (out of a grid, per row and group) that minimises
sum |w - w_q|^2.4 (GPTQ's `mse` option), which mostly matters at 1-3 bits.

Why GPTQ and not HQQ: MC-MoE's PMQ quantizes with GPTQ; at 2-3 bits a quantizer that sees the
inputs is clearly better than a data-free one; the routed tokens of every expert are captured anyway
for the PMQ factors, so the Hessians cost one matmul each; and it needs no extra dependency. An
expert that saw no calibration tokens gets an identity Hessian, where GPTQ reduces to RTN.

Scales are rounded to float16 *before* they are used, so the error GPTQ compensates is the error of
the values that are stored, and a saved model dequantizes bit-for-bit to the in-memory one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_codes, packed_row_bytes, unpack_codes

CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.8
CLIP_NORM = 2.4


def effective_group(in_features: int, group_size: int) -> tuple[int, int]:
    """(group actually used, padded input width)."""
    g = min(group_size, in_features)
    return g, -(-in_features // g) * g


@dataclass
class QuantizedTensor:
    """One [out, in] weight at one width: packed codes + float16 scales and zeros per group."""

    bits: int
    group_size: int  # effective group
    shape: tuple[int, int]  # [out, in] before padding
    qweight: torch.Tensor  # uint8 [out, ceil(in_pad/8) * bits]
    scales: torch.Tensor  # float16 [out, groups]
    zeros: torch.Tensor  # float16 [out, groups]

    @property
    def in_padded(self) -> int:
        return self.scales.shape[1] * self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_codes(self.qweight, self.bits, self.in_padded)
        return dequantize_codes(codes, self.scales, self.zeros, self.group_size, self.shape[1]).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.qweight": self.qweight.contiguous(), f"{prefix}.scales": self.scales.contiguous(),
                f"{prefix}.zeros": self.zeros.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, bits: int, group_size: int,
                     shape: tuple[int, int]) -> "QuantizedTensor":
        qt = cls(bits, group_size, tuple(shape), tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scales"],
                 tensors[f"{prefix}.zeros"])
        expect = (shape[0], packed_row_bytes(qt.in_padded, bits))
        if tuple(qt.qweight.shape) != expect or qt.qweight.dtype != torch.uint8:
            raise ValueError(f"{prefix}.qweight has shape {tuple(qt.qweight.shape)}, expected {expect} uint8 "
                             f"for a {bits}-bit {tuple(shape)} weight in groups of {group_size}")
        return qt


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                     in_features: int) -> torch.Tensor:
    """codes [..., out, in_pad] -> float32 [..., out, in]. The single dequantization rule everyone uses."""
    *lead, out, in_pad = codes.shape
    c = codes.to(torch.float32).view(*lead, out, in_pad // group, group)
    w = (c - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.view(*lead, out, in_pad)[..., :in_features]


def _params_for_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (xmax - xmin) / maxq
    flat = scale <= 0
    scale = torch.where(flat, torch.ones_like(scale) * 2 / maxq, scale)  # an all-zero group: any scale works
    scale = scale.clamp(min=1e-7).to(torch.float16).to(torch.float32)
    zero = torch.round(-torch.where(flat, -torch.ones_like(xmin), xmin) / scale).clamp(0, maxq)
    return scale, zero


def _fake(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, (q - zero) * scale


def group_params(w: torch.Tensor, bits: int, clip_search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., g] -> (scale [...], zero [...]) for each group along the last axis."""
    maxq = (1 << bits) - 1
    xmin = w.min(dim=-1).values.clamp(max=0)
    xmax = w.max(dim=-1).values.clamp(min=0)
    scale, zero = _params_for_range(xmin, xmax, maxq)
    if not clip_search:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(CLIP_GRID):
        p = 1 - CLIP_MAX_SHRINK * i / CLIP_GRID
        s, z = _params_for_range(p * xmin, p * xmax, maxq)
        _, wq = _fake(w, s.unsqueeze(-1), z.unsqueeze(-1), maxq)
        err = (wq - w).abs().pow(CLIP_NORM).sum(dim=-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _pad_in(w: torch.Tensor, in_pad: int) -> torch.Tensor:
    extra = in_pad - w.shape[-1]
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, clip_search: bool = False):
    """w [..., out, in] -> (codes uint8 [..., out, in_pad], scales, zeros [..., out, groups], group)."""
    g, in_pad = effective_group(w.shape[-1], group_size)
    wp = _pad_in(w.to(torch.float32), in_pad)
    grouped = wp.view(*wp.shape[:-1], in_pad // g, g)
    scale, zero = group_params(grouped, bits, clip_search)
    q, _ = _fake(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), (1 << bits) - 1)
    return q.view(wp.shape).to(torch.uint8), scale, zero, g


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (batched), with dampening raised until H is positive definite."""
    n = h.shape[-1]
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(dim=-1).clamp(min=1e-8)
    for attempt in range(6):
        hd = h + (damp * (10 ** attempt)) * mean_diag[..., None, None] * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if not bool((info != 0).any()):
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
    raise FloatingPointError("the GPTQ Hessian is not positive definite even with heavy dampening")


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
                  clip_search: bool = True, block_size: int = 128):
    """GPTQ (Frantar et al. 2022) batched over a leading axis.

    w [B, out, in], hessian [B, in, in] (sum of x x^T over the inputs that matter, weighted as the
    output error should be). Minimises sum_b ||(W_b - Q_b) X_b||^2 greedily column by column with
    the inverse-Hessian error feedback. Group scales are fitted when the sweep reaches a group, on
    the already error-corrected weights (GPTQ's non-static groups). Returns what `quantize_rtn` does.
    """
    if w.dim() != 3 or hessian.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"gptq expects w [B, out, in] and hessian [B, in, in]; got {tuple(w.shape)}, {tuple(hessian.shape)}")
    maxq = (1 << bits) - 1
    nb, out, in_features = w.shape
    g, in_pad = effective_group(in_features, group_size)
    W = _pad_in(w.to(torch.float32), in_pad).clone()
    H = torch.zeros(nb, in_pad, in_pad, dtype=torch.float32, device=w.device)
    H[:, :in_features, :in_features] = hessian.to(torch.float32)
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0
    # Inputs never seen (padding, unrouted experts): a unit diagonal makes GPTQ act as RTN there.
    diag.add_(dead.to(torch.float32))
    Hinv = _inverse_hessian_factor(H, damp)

    codes = torch.zeros(nb, out, in_pad, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(nb, out, in_pad // g, dtype=torch.float32, device=w.device)
    zeros = torch.zeros_like(scales)
    block = max(1, block_size // g) * g  # whole groups per block, so a group's fit sees its updated weights
    for i1 in range(0, in_pad, block):
        i2 = min(i1 + block, in_pad)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                s, z = group_params(W1[:, :, i:i + g], bits, clip_search)
                scales[:, :, col // g], zeros[:, :, col // g] = s, z
            s, z = scales[:, :, col // g], zeros[:, :, col // g]
            wcol = W1[:, :, i]
            q, wq = _fake(wcol, s, z, maxq)
            codes[:, :, col] = q.to(torch.uint8)
            d = Hinv1[:, i, i].unsqueeze(-1)  # [B, 1]
            err = (wcol - wq) / d
            W1[:, :, i:] -= err.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)
            Err1[:, :, i] = err
        if i2 < in_pad:
            W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])
    return codes, scales, zeros, g


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, method: str = "gptq",
                    hessian: torch.Tensor | None = None, damp: float = 0.01, clip_search: bool = True):
    """Batched [B, out, in] -> (codes, scales, zeros, group). `method` is "gptq" or "rtn"."""
    if method == "gptq":
        if hessian is None:
            hessian = torch.zeros(w.shape[0], w.shape[2], w.shape[2], dtype=torch.float32, device=w.device)
        return quantize_gptq(w, hessian, bits, group_size, damp=damp, clip_search=clip_search)
    if method == "rtn":
        return quantize_rtn(w, bits, group_size, clip_search=clip_search)
    raise ValueError(f"unknown quantization method {method!r}; use 'gptq' or 'rtn'")


def to_quantized_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
                         in_features: int) -> list[QuantizedTensor]:
    """Batched codes -> one packed QuantizedTensor per batch entry (per expert)."""
    out = []
    for b in range(codes.shape[0]):
        out.append(QuantizedTensor(bits, group, (codes.shape[1], in_features), pack_codes(codes[b].cpu(), bits),
                                   scales[b].cpu().to(torch.float16), zeros[b].cpu().to(torch.float16)))
    return out
