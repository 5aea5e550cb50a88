"""PMQ task: mixed-precision quantization of a MoE checkpoint's experts (MC-MoE), as a DAG node.

    run_quantize(QuantizeConfig(avg_bits=2.5), model_dir, data, out_dir) -> metrics

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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from .adapters import get_adapter
from .mcmoe.allocation import allocate_bits, check_budget, check_candidates
from .mcmoe.experts import capture_routing
from .mcmoe.odp import DynamicPruning, apply_dynamic_pruning, calibrate_betas
from .mcmoe.packed import (DTYPES, QuantizedEntry, is_quantized_checkpoint, load_quantized, quantized_sizes,
                           save_quantized)
from .mcmoe.pmq import allocation_costs, layer_candidates
from .mcmoe.quantizer import quantize_weight, to_quantized_tensors
from .storage import write_json_atomic

__all__ = ["QuantizeConfig", "run_quantize", "quantize_model", "load_quantized", "is_quantized_checkpoint", "QuantizeResult",
           "DynamicPruning", "apply_dynamic_pruning", "calibrate_betas"]

REPORT_FILE = "quantize_report.json"


class QuantizeConfig(BaseModel):
    """PMQ settings. `avg_bits` is a per-MoE-layer budget over its routed experts: the average
    width never exceeds it and, with `exact_budget`, equals it whenever an allocation with exactly
    that average exists (see mcmoe/allocation.py). Uniform baselines: `candidate_bits=[b]`,
    `avg_bits=b`."""

    model_config = ConfigDict(extra="forbid")

    avg_bits: float = Field(2.5, gt=0, description="average expert width per MoE layer (budget)")
    candidate_bits: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], description="widths an expert may get")
    paper_constraints: bool = Field(True, description="at least one expert at the highest and one at the second-highest width")
    exact_budget: bool = Field(True, description="use the whole budget (largest reachable total <= budget)")
    freq_exponent: float = Field(1.0, ge=0, description="a in freq^a * weight^b * loss")
    weight_exponent: float = Field(1.0, ge=0, description="b in freq^a * weight^b * loss")
    method: Literal["gptq", "rtn"] = "gptq"
    group_size: int = Field(128, ge=4, description="input columns per scale/zero group (min(group, in_features) used)")
    damp: float = Field(0.01, gt=0, description="GPTQ dampening, relative to the mean Hessian diagonal")
    clip_search: bool = Field(True, description="search a per-group range shrink that minimises |w - w_q|^2.4")
    attention_bits: int = Field(16, description="attention projections: 16 keeps them in keep_dtype, else 2..8 bits")
    shared_expert_bits: int = Field(16, description="shared experts: 16 keeps them in keep_dtype, else 2..8 bits")
    keep_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="dtype of everything not quantized; auto = the checkpoint's 16-bit dtype, float16 for float32 checkpoints")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N: where calibration and GPTQ run")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the model is loaded in for the calibration pass (GPTQ itself runs in float32)")
    calibration_batches: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=2)
    text_field: str = "text"
    trust_remote_code: bool = False

    @field_validator("candidate_bits")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(b < 1 or b > 8 for b in v):
            raise ValueError(f"candidate_bits={v}: give distinct widths between 1 and 8")
        return sorted(v)

    @field_validator("attention_bits", "shared_expert_bits")
    @classmethod
    def _fixed_width(cls, v: int) -> int:
        if v != 16 and not 2 <= v <= 8:
            raise ValueError(f"fixed width {v}: use 16 (keep) or 2..8 bits")
        return v

    @model_validator(mode="after")
    def _budget_range(self) -> "QuantizeConfig":
        if self.avg_bits < min(self.candidate_bits):
            raise ValueError(f"avg_bits={self.avg_bits} is below the smallest candidate width {min(self.candidate_bits)}; "
                             "raise avg_bits or add a lower width to candidate_bits")
        return self


@dataclass
class QuantizeResult:
    entries: list[QuantizedEntry]
    layers: list[dict] = field(default_factory=list)
    calibration_tokens: int = 0
    keep_dtype: torch.dtype = torch.float16


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device='cpu' or 'auto'")
    return device


def resolve_keep_dtype(cfg: QuantizeConfig, config) -> torch.dtype:
    if cfg.keep_dtype != "auto":
        return DTYPES[cfg.keep_dtype]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def check_config_for_model(cfg: QuantizeConfig, config) -> None:
    """Every error the model's shape alone can reveal, before any weight is read."""
    adapter = get_adapter(config)
    check_candidates(cfg.candidate_bits)
    check_budget(cfg.avg_bits, adapter.num_experts(config), cfg.candidate_bits, cfg.paper_constraints,
                 where="every MoE layer; set avg_bits / candidate_bits / paper_constraints")


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


def _size_report(model: nn.Module, result: QuantizeResult, out_dir: Path, model_dir: Path) -> dict:
    quantized = {e.name for e in result.entries}
    kept, seen = 0, set()
    for n, t in model.state_dict().items():
        if n in quantized or t.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(t.data_ptr())
        kept += t.numel() * (2 if t.is_floating_point() else t.element_size())
    packed = sum(e.nbytes for e in result.entries)
    expert_entries = [e for e in result.entries if e.kind == "experts"]
    expert_weights = sum(t.shape[0] * t.shape[1] for e in expert_entries for t in e.tensors)
    per_module: dict[str, int] = {}
    for e in result.entries:
        owner = e.name.rpartition(".")[0]
        per_module[owner] = per_module.get(owner, 0) + 2 * sum(t.shape[0] * t.shape[1] for t in e.tensors)
    params = sum(t.numel() for t in model.parameters())
    original = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    sizes = quantized_sizes(out_dir)
    return {
        "disk_bytes": sizes["directory_bytes"], "weights_file_bytes": sizes["weights_file_bytes"],
        "original_disk_bytes": original, "original_16bit_bytes": 2 * params,
        "packed_bytes": packed,
        "expert_bits_per_weight": 8 * sum(e.nbytes for e in expert_entries) / max(expert_weights, 1),
        # dequantize="forward" at a 16-bit compute dtype: packed + kept tensors resident, plus one
        # module's dequantized weights while it runs (double the float terms for float32 compute).
        "memory_resident_bytes_16bit": packed + kept,
        "memory_peak_transient_bytes_16bit": max(per_module.values(), default=0),
        "memory_dequantized_at_load_bytes_16bit": 2 * params,
    }


def run_quantize(cfg: QuantizeConfig, model_dir: str | Path, data: str | Path, out_dir: str | Path,
                 log: Callable[[str], None] = print) -> dict:
    """Quantize the checkpoint in `model_dir` with calibration `data`; write the packed checkpoint
    (loadable by `load_quantized`) and quantize_report.json into `out_dir`. Returns metrics."""
    from .calibration import calibration_batches
    from .checkpoint import load_config, load_model
    from .storage import ensure_free_output

    t0 = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir, cfg.trust_remote_code)
    check_config_for_model(cfg, config)
    device = resolve_device(cfg.device)
    ensure_free_output(out_dir)
    batches = calibration_batches(data, cfg.calibration_batches, cfg.batch_size, cfg.seq_len,
                                  tokenizer_dir=model_dir, text_field=cfg.text_field)
    keep_dtype = resolve_keep_dtype(cfg, config)
    model = load_model(model_dir, dtype=DTYPES[cfg.compute_dtype], device=device, trust_remote_code=cfg.trust_remote_code)
    log(f"calibrating on {len(batches)} batches of {tuple(batches[0].shape)} tokens; method {cfg.method}, "
        f"group {cfg.group_size}, budget {cfg.avg_bits} bits over widths {cfg.candidate_bits}")
    result = quantize_model(model, batches, cfg, keep_dtype=keep_dtype, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"method": cfg.method, "group_size": cfg.group_size, "avg_bits": cfg.avg_bits,
            "candidate_bits": cfg.candidate_bits, "paper_constraints": cfg.paper_constraints,
            "attention_bits": cfg.attention_bits, "shared_expert_bits": cfg.shared_expert_bits,
            "expert_bits": {str(layer["layer"]): layer["bits"] for layer in result.layers}}
    write_json_atomic(out_dir / REPORT_FILE, {"config": cfg.model_dump(), "layers": result.layers})
    save_quantized(model, result.entries, out_dir, keep_dtype, info, tokenizer_from=model_dir)  # its JSON last
    all_bits = [b for layer in result.layers for b in layer["bits"]]
    hist = {str(b): all_bits.count(b) for b in sorted(set(all_bits))}
    metrics = {
        "device": str(device),
        "avg_bits_target": cfg.avg_bits,
        "avg_bits_experts": sum(all_bits) / max(len(all_bits), 1),
        "bits_histogram": hist,
        "method": cfg.method, "group_size": cfg.group_size, "calibration_tokens": result.calibration_tokens,
        "keep_dtype": str(keep_dtype).replace("torch.", ""),
        "seconds": round(time.time() - t0, 2),
    }
    metrics.update(_size_report(model, result, out_dir, model_dir))
    return metrics
