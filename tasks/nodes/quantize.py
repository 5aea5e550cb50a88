"""The quantize node: PMQ (MC-MoE mixed-precision expert quantization) of a checkpoint.

    run_quantize(QuantizeConfig(avg_bits=2.5), model_dir, data, out_dir) -> metrics

The method is in `slimmoe.tasks.mcmoe.pipeline`; this node checks the inputs, loads the model and
calibration data, runs it, and writes the packed checkpoint with its report.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from typing import Callable

from torch import nn

from slimmoe.tasks.core.checkpoint import load_config, load_model
from slimmoe.tasks.core.runtime import DTYPES, resolve_device
from slimmoe.tasks.core.storage import ensure_free_output, write_json_atomic
from slimmoe.tasks.data.calibration import calibration_batches
from slimmoe.tasks.mcmoe.config import QuantizeConfig, check_config_for_model
from slimmoe.tasks.mcmoe.packed import quantized_sizes, save_quantized
from slimmoe.tasks.mcmoe.pipeline import QuantizeResult, quantize_model, resolve_keep_dtype

REPORT_FILE = "quantize_report.json"


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
    t0 = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir, cfg.trust_remote_code)
    check_config_for_model(cfg, config)
    device = resolve_device(cfg.run_device(torch.cuda.is_available()))
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
