"""PMQ over a whole model: mixed-precision quantization of a MoE model's experts (MC-MoE).

1. calibration tokens (`calibration_batches`: token shards, or text + the model's tokenizer) run
   once through the model; every MoE router's inputs and decisions are captured (and, when
   attention / shared experts are quantized too, their linears' input Hessians);
2. per MoE layer: each expert is quantized (GPTQ, group-wise) at every candidate width, which gives
   its PMQ factors (frequency, mean routing weight, block-output loss per width, see mcmoe/pmq.py);
3. per layer the widths are allocated by the exact knapsack (mcmoe/allocation.py) under the
   average-bit budget, and the chosen quantized experts are kept;
4. attention and shared experts are quantized at their fixed widths (16 = kept in `keep_dtype`);
5. the packed checkpoint is written (mcmoe/packed.py); `load_quantized(out_dir)` rebuilds it.

All Hessians come from the original model's activations (one calibration pass, no layer-by-layer
re-propagation through the already quantized layers). Memory during step 1: the router inputs of
every MoE layer, calibration tokens x hidden size x 4 bytes per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from slimmoe.tasks.core.adapters import get_adapter
from slimmoe.tasks.core.runtime import DTYPES
from slimmoe.tasks.mcmoe.allocation import allocate_bits
from slimmoe.tasks.mcmoe.config import QuantizeConfig, check_config_for_model
from slimmoe.tasks.mcmoe.experts import capture_routing
from slimmoe.tasks.mcmoe.packed import QuantizedEntry
from slimmoe.tasks.mcmoe.pmq import allocation_costs, layer_candidates
from slimmoe.tasks.mcmoe.quantizer import quantize_weight, to_quantized_tensors


@dataclass
class QuantizeResult:
    entries: list[QuantizedEntry]
    layers: list[dict] = field(default_factory=list)
    calibration_tokens: int = 0
    keep_dtype: torch.dtype = torch.float16


def _linear_targets(model: nn.Module, cfg: QuantizeConfig) -> dict[str, tuple[nn.Linear, int]]:
    adapter = get_adapter(model)
    names = {m: n for n, m in model.named_modules()}
    targets: dict[str, tuple[nn.Linear, int]] = {}
    groups = []
    if cfg.attention_bits < 16:
        groups += [(adapter.attention(layer), cfg.attention_bits) for layer in adapter.decoder_layers(model)]
    if cfg.shared_expert_bits < 16:
        groups += [(adapter.shared_expert(block), cfg.shared_expert_bits) for _, block in adapter.moe_blocks(model)]
    for module, bits in groups:
        if module is None:
            continue
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                targets[f"{names[sub]}.weight"] = (sub, bits)
    return targets


@torch.no_grad()
def quantize_model(model: nn.Module, batches: list[torch.Tensor], cfg: QuantizeConfig,
                   keep_dtype: torch.dtype = torch.float16, log: Callable[[str], None] = print) -> QuantizeResult:
    """Quantize `model` in place (its weights become the dequantized values, everything kept is
    rounded through `keep_dtype`), so it computes exactly what the saved checkpoint will."""
    adapter = get_adapter(model)
    check_config_for_model(cfg, model.config)
    if not batches:
        raise ValueError("quantize_model needs at least one calibration batch of token ids")
    names = {m: n for n, m in model.named_modules()}
    linear_targets = _linear_targets(model, cfg)
    captures, hessians = capture_routing(model, adapter, batches, {n: lin for n, (lin, _) in linear_targets.items()})
    result = QuantizeResult(entries=[], keep_dtype=keep_dtype,
                            calibration_tokens=sum(int(b.numel()) for b in batches))
    for idx, block in adapter.moe_blocks(model):
        experts = block.experts
        x, w, index = captures.pop(idx).cat()
        factors, cands = layer_candidates(adapter, experts, idx, x, w, index, cfg.candidate_bits, cfg.method,
                                          cfg.group_size, cfg.damp, cfg.clip_search)
        costs = allocation_costs(factors, cfg.candidate_bits, cfg.freq_exponent, cfg.weight_exponent)
        bits = allocate_bits(costs, cfg.candidate_bits, cfg.avg_bits, cfg.paper_constraints, cfg.exact_budget)
        prefix = names[experts]
        for j, attr in enumerate(("gate_up_proj", "down_proj")):
            param = getattr(experts, attr)
            entry = QuantizedEntry(f"{prefix}.{attr}", "experts", tuple(param.shape), adapter.transposed_experts,
                                   [cands[b][j][e] for e, b in enumerate(bits)])
            param.data = entry.dequantize(param.dtype).to(param.device)
            result.entries.append(entry)
        chosen_loss = sum(c[cfg.candidate_bits.index(b)] for c, b in zip(costs, bits))
        result.layers.append(dict(factors.to_json(), bits=bits, avg_bits=sum(bits) / len(bits), objective=chosen_loss))
        log(f"layer {idx}: experts at {bits} bits (avg {sum(bits) / len(bits):.3f}); "
            f"routed tokens {factors.routed}")
    for name, (lin, bits) in linear_targets.items():
        acc = hessians[name]
        c, s, z, g = quantize_weight(lin.weight.detach().float().unsqueeze(0), bits, cfg.group_size, cfg.method,
                                     acc.h.unsqueeze(0).to(lin.weight.device), cfg.damp, cfg.clip_search)
        qt = to_quantized_tensors(c, s, z, bits, g, lin.in_features)[0]
        entry = QuantizedEntry(name, "linear", tuple(lin.weight.shape), False, [qt])
        lin.weight.data = qt.dequantize(lin.weight.dtype).to(lin.weight.device)
        result.entries.append(entry)
    if linear_targets:
        log(f"quantized {len(linear_targets)} attention/shared-expert linears")
    quantized = {e.name for e in result.entries}
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in quantized and t.is_floating_point():
            t.data = t.data.to(keep_dtype).to(t.dtype)
    return result


def resolve_keep_dtype(cfg: QuantizeConfig, config) -> torch.dtype:
    if cfg.keep_dtype != "auto":
        return DTYPES[cfg.keep_dtype]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
