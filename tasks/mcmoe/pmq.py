"""PMQ (MC-MoE's pre-loading mixed-precision quantization) for one MoE layer.

For every expert of the layer, on the calibration tokens the router sends it:
  * freq          share of the layer's tokens routed to it (over a layer, sum = top_k),
  * mean_weight   its mean routing weight when routed (the router's own output weights),
  * loss[bits]    Frobenius norm of the change of the MoE block's output when only this expert is
                  quantized at `bits`. The router is not quantized, so routing does not change and
                  that change is exactly sum over routed tokens of weight * (E(x) - E_q(x)); it is
                  computed per expert from the captured tokens, without re-running the block.
The expert is quantized at each candidate width with the same quantizer that produces the final
checkpoint (GPTQ: gate_up on the routed tokens, down on the hidden activations of the *quantized*
gate_up, both Hessians weighted by the squared routing weight, because the block's output error
scales with the weight), so the loss the allocator sees is the loss the checkpoint has, and the
chosen width's tensors are reused as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimmoe.tasks.core.adapters import MoEAdapter
from .experts import canonical_experts, expert_hidden, expert_output, routed_tokens
from .quantizer import QuantizedTensor, dequantize_codes, quantize_weight, to_quantized_tensors


@dataclass
class LayerFactors:
    layer: int
    tokens: int  # calibration tokens seen by the layer
    routed: list[int]  # tokens routed to each expert
    freq: list[float]
    mean_weight: list[float]
    loss: dict[int, list[float]]  # bits -> per expert

    def to_json(self) -> dict:
        return {"layer": self.layer, "tokens": self.tokens, "routed": self.routed, "freq": self.freq,
                "mean_weight": self.mean_weight, "loss": {str(b): v for b, v in self.loss.items()}}


def _weighted_gram(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xw = x.to(torch.float32) * w.to(torch.float32).unsqueeze(-1)
    return xw.T @ xw


def _gram_or_zero(x: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros(dim, dim, dtype=torch.float32, device=x.device)
    return _weighted_gram(x, w)


@torch.no_grad()
def layer_candidates(adapter: MoEAdapter, experts: nn.Module, layer: int, x: torch.Tensor, weights: torch.Tensor,
                     index: torch.Tensor, candidates: list[int], method: str, group_size: int, damp: float,
                     clip_search: bool) -> tuple[LayerFactors, dict[int, tuple[list[QuantizedTensor], list[QuantizedTensor]]]]:
    """Factors of every expert of one layer, and each expert quantized at every candidate width."""
    device = experts.gate_up_proj.device
    gu, down = canonical_experts(adapter, experts)
    gu, down = gu.to(torch.float32), down.to(torch.float32)
    n_exp = gu.shape[0]
    x = x.to(device=device, dtype=torch.float32)
    weights, index = weights.to(device), index.to(device)
    routed = [routed_tokens(weights, index, e) for e in range(n_exp)]
    xs = [x[tok] for tok, _ in routed]
    ws = [w.to(torch.float32) for _, w in routed]
    n_tokens = x.shape[0]
    factors = LayerFactors(
        layer=layer, tokens=n_tokens, routed=[int(t.numel()) for t, _ in routed],
        freq=[float(t.numel()) / max(n_tokens, 1) for t, _ in routed],
        mean_weight=[float(w.mean()) if w.numel() else 0.0 for w in ws],
        loss={},
    )
    reference = [expert_output(experts, e, xs[e], gu[e], down[e]) for e in range(n_exp)]
    h_gu = torch.stack([_gram_or_zero(xs[e], ws[e], gu.shape[2]) for e in range(n_exp)]) if method == "gptq" else None
    out: dict[int, tuple[list[QuantizedTensor], list[QuantizedTensor]]] = {}
    for bits in candidates:
        c, s, z, g = quantize_weight(gu, bits, group_size, method, h_gu, damp, clip_search)
        gu_q = dequantize_codes(c, s, z, g, gu.shape[2])
        gu_qt = to_quantized_tensors(c, s, z, bits, g, gu.shape[2])
        hidden = [expert_hidden(experts, e, xs[e], gu_q[e]) for e in range(n_exp)]
        h_down = (torch.stack([_gram_or_zero(hidden[e], ws[e], down.shape[2]) for e in range(n_exp)])
                  if method == "gptq" else None)
        c, s, z, g = quantize_weight(down, bits, group_size, method, h_down, damp, clip_search)
        down_q = dequantize_codes(c, s, z, g, down.shape[2])
        down_qt = to_quantized_tensors(c, s, z, bits, g, down.shape[2])
        losses = []
        for e in range(n_exp):
            if xs[e].shape[0] == 0:
                losses.append(0.0)
                continue
            y = expert_output(experts, e, xs[e], gu_q[e], down_q[e])
            losses.append(float(((y - reference[e]) * ws[e].unsqueeze(-1)).norm()))
        factors.loss[bits] = losses
        out[bits] = (gu_qt, down_qt)
    return factors, out


def allocation_costs(factors: LayerFactors, candidates: list[int], freq_exponent: float,
                     weight_exponent: float) -> list[list[float]]:
    """cost[e][j] = freq_e^a * mean_weight_e^b * loss_e(candidates[j]) (0^0 counts as 1)."""
    costs = []
    for e in range(len(factors.freq)):
        scale = (factors.freq[e] ** freq_exponent) * (factors.mean_weight[e] ** weight_exponent)
        costs.append([scale * factors.loss[b][e] for b in candidates])
    return costs
