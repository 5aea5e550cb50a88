"""The packed checkpoint format of a PMQ-quantized model, and `load_quantized`.

A quantized model directory holds:
  config.json                   the model's own config (no `quantization_config` key, so nothing in
                                `transformers` mistakes it for one of its quantizers)
  model.quantized.safetensors   every tensor; named so `from_pretrained` refuses the directory
                                (it finds no `model.safetensors`) instead of loading random experts
  quantization_config.json      written last: format, method, group size, per-tensor widths
  tokenizer files               copied from the source model

In the safetensors file, a tensor that is not quantized keeps its state-dict name and is stored in
`keep_dtype`. A quantized weight `NAME` (canonical layout [out, in], see quantizer.py) is stored as
`NAME.qweight` (uint8, packing.py layout), `NAME.scales` and `NAME.zeros` (float16 [out, groups]);
fused experts are stored per expert as `NAME.<e>.qweight|scales|zeros`, each at its own width.

`load_quantized` builds the model on the meta device from the config, loads the plain tensors,
and then either
  * dequantize="forward" (default): keeps the packed tensors as buffers and dequantizes a layer's
    weights in a forward pre-hook, dropping them after the forward. Resident memory is the packed
    size plus the plain tensors; the transient peak adds one module's dequantized weights (for an
    MoE layer, all its experts). It works with every experts implementation (eager, grouped_mm,
    batched_mm) because the experts module sees ordinary tensors during its forward. Quantized
    weights are then buffers, not parameters (parameter counts exclude them); or
  * dequantize="load": dequantizes everything once into ordinary parameters: the model is a plain
    `transformers` model of full size in memory.
No existing `transformers` quantization integration handles mixed per-expert widths in fused 3-D
expert tensors, so the format and loader are our own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimmoe.tasks.core.safetensors_files import read_header

from .quantizer import QuantizedTensor

FORMAT = "slimmoe-mcmoe-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.quantized.safetensors"
QCONFIG_FILE = "quantization_config.json"



class QuantizedFormatError(ValueError):
    """A directory that is not a complete slimmoe quantized checkpoint."""


@dataclass
class QuantizedEntry:
    """One quantized weight: a plain [out, in] linear weight, or fused experts (one tensor each)."""

    name: str  # state-dict name of the parameter it replaces
    kind: str  # "linear" | "experts"
    shape: tuple[int, ...]  # shape of the parameter it replaces (stored layout)
    transposed: bool  # experts only: stored layout is the transpose of canonical (GPT-OSS)
    tensors: list[QuantizedTensor] = field(default_factory=list)

    def meta(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "transposed": self.transposed,
                "canonical_shape": list(self.tensors[0].shape), "group_size": self.tensors[0].group_size,
                "bits": [t.bits for t in self.tensors] if self.kind == "experts" else self.tensors[0].bits}

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "linear":
            return self.tensors[0].dequantize(dtype)
        w = torch.stack([t.dequantize(dtype) for t in self.tensors])
        return w.transpose(1, 2) if self.transposed else w

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        if self.kind == "linear":
            return self.tensors[0].tensors(self.name)
        out = {}
        for e, t in enumerate(self.tensors):
            out.update(t.tensors(f"{self.name}.{e}"))
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias name -> first name for state-dict entries that share storage (tied embeddings)."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen.setdefault(key, name)
    return aliases


def _default_file_mode() -> int:
    """The mode open() gives a new file under this process's umask."""
    umask = os.umask(0)  # the umask can only be read by setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def save_quantized(model: nn.Module, entries: list[QuantizedEntry], out_dir: str | Path, keep_dtype: torch.dtype,
                   info: dict, tokenizer_from: str | Path | None = None) -> dict:
    """Write the packed checkpoint into `out_dir` (an existing empty directory); the JSON last."""
    from slimmoe.tasks.core.checkpoint import copy_tokenizer_files, save_config

    out_dir = Path(out_dir)
    state = model.state_dict()
    aliases = _tied_aliases(state)
    quantized = {e.name for e in entries}
    missing = quantized - set(state)
    if missing:
        raise KeyError(f"quantized entries {sorted(missing)} are not in the model's state dict")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in quantized or name in aliases:
            continue
        t = t.detach().cpu()
        tensors[name] = (t.to(keep_dtype) if t.is_floating_point() else t).contiguous()
    for e in entries:
        tensors.update(e.flat_tensors())
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "slimmoe_format": FORMAT})
    # safetensors creates its file private (mode 0600, whatever the umask): give the weights the mode every
    # other file of the output gets from open(), or whoever may read the output could read all but them.
    os.chmod(out_dir / WEIGHTS_FILE, _default_file_mode())
    save_config(model.config, out_dir)
    copy_tokenizer_files(tokenizer_from, out_dir)
    qconfig = dict(info, format=FORMAT, format_version=FORMAT_VERSION, weights_file=WEIGHTS_FILE,
                   keep_dtype=str(keep_dtype).replace("torch.", ""), tied=aliases,
                   tensors={e.name: e.meta() for e in entries},
                   packing="codes of a row in runs of 8, each run one little-endian 8*b-bit integer written as b bytes; "
                           "w = (code - zero) * scale per (row, group of group_size input columns)")
    from slimmoe.tasks.core.storage import write_json_atomic

    write_json_atomic(out_dir / QCONFIG_FILE, qconfig)
    return qconfig


# -- loading ------------------------------------------------------------------------------------


class PackedWeight(nn.Module):
    """Holds one quantized weight's packed tensors as buffers; `dequantize()` rebuilds the weight."""

    def __init__(self, entry: QuantizedEntry):
        super().__init__()
        self.kind, self.transposed, self.shape = entry.kind, entry.transposed, tuple(entry.shape)
        self.layout = [(t.bits, t.group_size, tuple(t.shape)) for t in entry.tensors]
        for i, t in enumerate(entry.tensors):
            self.register_buffer(f"qweight_{i}", t.qweight)
            self.register_buffer(f"scales_{i}", t.scales)
            self.register_buffer(f"zeros_{i}", t.zeros)

    def entry(self) -> QuantizedEntry:
        tensors = [QuantizedTensor(b, g, s, getattr(self, f"qweight_{i}"), getattr(self, f"scales_{i}"),
                                   getattr(self, f"zeros_{i}")) for i, (b, g, s) in enumerate(self.layout)]
        return QuantizedEntry("", self.kind, self.shape, self.transposed, tensors)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.entry().dequantize(dtype)


def _attach_on_the_fly(module: nn.Module, attr: str, packed: PackedWeight) -> None:
    module.add_module(f"{attr}_packed", packed)

    def pre_hook(mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        setattr(mod, attr, packed.dequantize(x.dtype if x.is_floating_point() else torch.float32))

    def post_hook(mod, args, kwargs, output):
        setattr(mod, attr, None)  # free the dequantized weight until the next forward
        return output

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    module.register_forward_hook(post_hook, with_kwargs=True)
    setattr(module, attr, None)


def read_quantization_config(path: str | Path) -> dict:
    path = Path(path)
    qfile = path / QCONFIG_FILE
    if not qfile.exists():
        raise QuantizedFormatError(
            f"{path} has no {QCONFIG_FILE}: it is not a complete slimmoe quantized checkpoint "
            "(write one with `slimmoe quantize`; a plain model directory loads with from_pretrained)")
    qcfg = json.loads(qfile.read_text())
    if qcfg.get("format") != FORMAT or int(qcfg.get("format_version", -1)) > FORMAT_VERSION:
        raise QuantizedFormatError(f"{qfile} is format {qcfg.get('format')!r} v{qcfg.get('format_version')}; "
                                   f"this slimmoe reads {FORMAT!r} up to v{FORMAT_VERSION}")
    return qcfg


def _entries_from_state(qcfg: dict, state: dict[str, torch.Tensor]) -> list[QuantizedEntry]:
    entries = []
    for name, meta in qcfg["tensors"].items():
        kind = meta["kind"]
        shape = tuple(meta["canonical_shape"])
        bits = meta["bits"] if kind == "experts" else [meta["bits"]]
        prefixes = [f"{name}.{e}" for e in range(len(bits))] if kind == "experts" else [name]
        try:
            tensors = [QuantizedTensor.from_tensors(state, p, b, meta["group_size"], shape) for p, b in zip(prefixes, bits)]
        except KeyError as err:
            raise QuantizedFormatError(f"{WEIGHTS_FILE} lacks {err} for quantized weight {name}") from err
        for p in prefixes:
            for suffix in ("qweight", "scales", "zeros"):
                state.pop(f"{p}.{suffix}")
        entries.append(QuantizedEntry(name, kind, tuple(meta["shape"]), bool(meta["transposed"]), tensors))
    return entries


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner), attr


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   dequantize: str = "forward", trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a working `transformers` model from a packed PMQ checkpoint (see module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dequantize not in ("forward", "load"):
        raise ValueError(f"dequantize={dequantize!r}; use 'forward' (on the fly, low memory) or 'load' (plain model)")
    path = Path(path)
    qcfg = read_quantization_config(path)
    weights = path / qcfg.get("weights_file", WEIGHTS_FILE)
    if not weights.exists():
        raise QuantizedFormatError(f"{weights} is missing: the quantized checkpoint at {path} is incomplete")
    # A truncated or damaged file: BrokenCheckpointError naming it, before any model is built.
    read_header(weights)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    state = load_file(str(weights), device=str(device))
    entries = _entries_from_state(qcfg, state)
    for entry in entries:
        module, attr = _split(model, entry.name)
        if attr in module._parameters:
            del module._parameters[attr]
        if dequantize == "load":
            module.register_parameter(attr, nn.Parameter(entry.dequantize(dtype).to(device), requires_grad=False))
        else:
            _attach_on_the_fly(module, attr, PackedWeight(entry))
    plain = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    result = model.load_state_dict(plain, strict=False, assign=True)
    if result.unexpected_keys:
        raise QuantizedFormatError(f"{weights} holds tensors this model has no place for: {result.unexpected_keys[:5]}")
    aliases = qcfg.get("tied", {})
    for alias, source in aliases.items():
        module, attr = _split(model, alias)
        src_module, src_attr = _split(model, source)
        setattr(module, attr, getattr(src_module, src_attr))
    quantized = {e.name for e in entries}
    packed_buffers = {f"{e.name}_packed." for e in entries}
    missing = [k for k in result.missing_keys
               if k not in quantized and k not in aliases and not any(k.startswith(p) for p in packed_buffers)]
    if missing:
        raise QuantizedFormatError(f"{weights} lacks weights the model needs: {missing[:5]}")
    # Non-persistent buffers (rotary inv_freq) are not in any checkpoint: materialise and initialise
    # them the way `from_pretrained` does.
    for name, module in model.named_modules():
        meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise QuantizedFormatError(f"{name} has uninitialised buffers {meta} next to parameters; "
                                       "load_quantized cannot rebuild it")
        for b in meta:
            module._buffers[b] = torch.empty_like(module._buffers[b], device=device)
        model._init_weights(module)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise QuantizedFormatError(f"weights left uninitialised after loading {path}: {still_meta[:5]}")
    return model.to(device).eval()


def quantized_sizes(path: str | Path) -> dict:
    """Real on-disk bytes of a quantized checkpoint (weights file, and the whole directory)."""
    path = Path(path)
    files = [p for p in path.iterdir() if p.is_file()]
    return {"weights_file_bytes": (path / WEIGHTS_FILE).stat().st_size,
            "directory_bytes": sum(p.stat().st_size for p in files)}


def module_memory_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def is_quantized_checkpoint(path: str | Path) -> bool:
    """True for a directory written by `slimmoe quantize` (load it with `load_quantized`)."""
    return (Path(path) / QCONFIG_FILE).exists()
