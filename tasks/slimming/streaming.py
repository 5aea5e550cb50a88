"""Streaming slimming surgery: cut a checkpoint on disk one tensor at a time.

A 42B-parameter teacher is 84 GB in bf16, so `surgery.slim_model` (the whole model in memory) cannot
cut it on an ordinary machine. Here every source tensor is read alone (`get_slice(name)[index]` reads
just the kept rows, expert by expert for fused 3-D tensors), cut by a `KeepPlan` and written straight
into sharded safetensors whose headers are computed before any data is read, so about one tensor is
held at a time, never a shard or the model.

Which tensor plays which role comes from the family's adapter, walked on a meta-device model built
from the config (no weights): the module names of the routed experts, shared experts and attention.
Two checkpoint layouts are read, and each is written back as it came, so `from_pretrained` converts
the output exactly as it converts the input:
  fused       the model's own names: `<layer>.mlp.experts.gate_up_proj` [E, 2I, H] (GPT-OSS: transposed,
              interleaved, with biases) and `down_proj`;
  per-expert  one tensor per expert (`<layer>.block_sparse_moe.experts.<e>.w1.weight` for PhiMoE and
              Mixtral, `<layer>.mlp.experts.<e>.gate_proj.weight` for the Qwen family), what the Hub
              holds and what transformers 5 fuses at load time (and `save_pretrained` writes).
A tensor inside a module the cut shrinks that matches neither layout is refused by name before
anything is written; every written tensor's shape is checked against the slimmed config.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from slimmoe.tasks.core.adapters import MoEAdapter, get_adapter
from slimmoe.tasks.core.checkpoint import copy_tokenizer_files, load_config, save_config
from slimmoe.tasks.core.safetensors_files import (MAX_SHARD_BYTES, CheckpointTensors, TensorEntry, TensorSpec,
                                                  release_freed_memory, write_sharded)
from slimmoe.tasks.core.storage import atomic_output_dir, ensure_free_output
from slimmoe.tasks.slimming.config import validate_targets
from slimmoe.tasks.slimming.scores import (KV_PROJECTIONS, Scores, gate_up_bias_neuron_sum, kv_group_total,
                                           kv_rows_per_group)
from slimmoe.tasks.slimming.surgery import KeepPlan, attention_rows, meta_model, module_names, slimmed_config


class CheckpointLayoutError(ValueError):
    """A checkpoint the streaming surgery cannot cut correctly (it names the tensor and what is supported)."""


# The most a copied tensor is read at once: larger ones (embeddings, heads) are copied in dim-0 chunks.
PIECE_BYTES = 64 * 2**20


def _pieces(src: CheckpointTensors, name: str, cut: "_Cut | None", shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """The output tensor as consecutive blocks of its row-major data: a copied tensor in dim-0
    chunks of at most PIECE_BYTES, a fused expert tensor expert by expert, any other cut whole.
    (Each piece is yielded without a name bound to it here, so the writer's `del` frees it.)"""
    entry = src.entries[name]
    if cut is None:
        rows = entry.shape[0] if entry.shape else 0
        if rows <= 1 or entry.nbytes <= PIECE_BYTES:
            yield _checked(name, src.read(name), shape, False)
            return
        step = max(1, PIECE_BYTES // (entry.nbytes // rows))
        for start in range(0, rows, step):
            yield _checked(name, src.read(name, (slice(start, min(start + step, rows)),)), shape, False)
    elif cut.per_expert:
        for j in range(cut.index.shape[0]):
            e = j if cut.experts is None else int(cut.experts[j])
            key = (e,) + (slice(None),) * (cut.axis - 1) + (cut.index[j].tolist(),)
            yield _checked(name, src.read(name, key), shape, True)
    else:
        yield _checked(name, src.read(name, (slice(None),) * cut.axis + (cut.index.tolist(),)), shape, False)


def _checked(name: str, piece: torch.Tensor, shape: tuple[int, ...], per_expert: bool) -> torch.Tensor:
    if not (tuple(piece.shape) == shape[1:] if per_expert else
            piece.dim() == len(shape) and tuple(piece.shape[1:]) == shape[1:]):
        raise RuntimeError(f"{name}: read a piece of shape {tuple(piece.shape)}, planned {shape}")
    return piece


def _out_bytes(entry: TensorEntry, shape: tuple[int, ...]) -> int:
    numel = math.prod(entry.shape)
    if numel == 0:
        return 0
    if entry.nbytes % numel:
        raise CheckpointLayoutError(f"cannot cut a tensor of sub-byte dtype {entry.dtype} (shape {entry.shape})")
    return entry.nbytes // numel * math.prod(shape)


# -- which tensors the plan cuts, and how ----------------------------------------------------------------

@dataclass(frozen=True)
class _Cut:
    """Keep `index` along `axis` of the source tensor; per expert (index [E', k], axis counted with the
    expert axis 0) for fused expert tensors, output expert j read from source expert `experts[j]`
    (None: every expert, in place)."""

    axis: int
    index: torch.Tensor
    source: tuple[int, ...]  # the shape the source config implies
    expected: tuple[int, ...]  # the output shape the slimmed config implies
    per_expert: bool = False
    experts: torch.Tensor | None = None

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        out[self.axis] = self.index.shape[-1]
        if self.per_expert:
            out[0] = self.index.shape[0]
        return tuple(out)


@dataclass
class _Module:
    """One module the cut shrinks: its names (the model's and on disk) and, per layout it may be
    stored in, the tensors that layout must have (each as its alternative on-disk names)."""

    what: str
    prefixes: tuple[str, ...]
    supported: str
    layouts: dict[str, list[tuple[str, ...]]]
    routed: bool = False  # the routed experts (whose layout the report names)


@dataclass
class _Layout:
    adapter: MoEAdapter
    cuts: dict[str, _Cut] = field(default_factory=dict)
    modules: list[_Module] = field(default_factory=list)
    experts: dict[int, tuple[str, ...]] = field(default_factory=dict)  # layer -> (fused prefix, per-expert prefix)
    routers: dict[int, str] = field(default_factory=dict)  # layer -> router module prefix
    # Dropping experts: a kept expert's per-expert tensors take its new number (on-disk name -> output
    # name), and the dropped experts' tensors are not written.
    renames: dict[str, str] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    shared: dict[int, str] = field(default_factory=dict)  # layer -> shared-expert module prefix
    attention: dict[int, str] = field(default_factory=dict)  # layer -> attention module prefix
    model_names: dict[str, str] = field(default_factory=dict)  # on-disk name -> the model's name
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # model name -> shape in the source config


def _forms(adapter: MoEAdapter, model_name: str) -> tuple[str, ...]:
    """The names a tensor or module prefix can have on disk: the model's own, and the family's renamed one."""
    renamed = adapter.checkpoint_name(model_name)
    return (model_name,) if renamed == model_name else (model_name, renamed)


def _walk(config, trust_remote_code: bool = False) -> tuple[MoEAdapter, nn.Module, _Layout]:
    """Module names of the routed experts, shared experts and attention of every layer, from the
    adapter walked on a meta-device model of `config`."""
    adapter = get_adapter(config)
    meta = meta_model(config, trust_remote_code)
    names = module_names(meta)
    layout = _Layout(adapter)
    layers = adapter.decoder_layers(meta)
    for idx, block in adapter.moe_blocks(meta):
        fused = names[id(block.experts)]
        per_expert = adapter.checkpoint_name(fused) if adapter.checkpoint_expert_names else None
        layout.experts[idx] = (fused, per_expert)
        layout.routers[idx] = names[id(adapter.router(block))]
        shared = adapter.shared_expert(block)
        if shared is not None:
            layout.shared[idx] = names[id(shared)]
    for idx, layer in enumerate(layers):
        layout.attention[idx] = names[id(adapter.attention(layer))]
    for name, t in meta.state_dict().items():
        layout.shapes[name] = tuple(t.shape)
        for disk in _forms(adapter, name):
            layout.model_names.setdefault(disk, name)
    return adapter, meta, layout


def _expert_names(adapter: MoEAdapter, per_expert_prefix: str, n_experts: int) -> list[tuple[str, str, str]]:
    gate, up, down = adapter.checkpoint_expert_names
    return [tuple(f"{per_expert_prefix}{e}.{part}.weight" for part in (gate, up, down)) for e in range(n_experts)]


def _plan_cuts(config, plan: KeepPlan, layout: _Layout, slim_shapes: dict[str, tuple[int, ...]],
               experts_module) -> None:
    adapter, shapes = layout.adapter, layout.shapes

    def add(model_name: str, axis: int, index: torch.Tensor, per_expert: bool = False,
            experts: torch.Tensor | None = None) -> tuple[str, ...]:
        forms = _forms(adapter, model_name)
        for disk in forms:
            layout.cuts[disk] = _Cut(axis, index, shapes[model_name], slim_shapes[model_name], per_expert, experts)
        return forms

    n_experts, inter = adapter.num_experts(config), adapter.expert_size(config)
    for idx, (fused, per_expert) in layout.experts.items():
        keep = plan.experts[idx]
        ids = plan.expert_ids.get(idx)
        rows = adapter.neuron_rows(keep, inter)
        fused_set = [add(fused + "gate_up_proj", adapter.gate_up_axis(), rows, True, ids),
                     add(fused + "down_proj", adapter.down_axis(), keep, True, ids)]
        if getattr(experts_module(idx), "gate_up_proj_bias", None) is not None:
            fused_set.append(add(fused + "gate_up_proj_bias", 1, rows, True, ids))
        if ids is not None:
            _plan_expert_rows(layout, idx, ids, fused, add)
        layouts = {"fused": fused_set}
        supported = f"fused {fused}gate_up_proj / down_proj"
        if per_expert is not None:
            # A split tensor is one expert's slice of the fused one: gate and up [I, H], down [H, I].
            _, two_i, hidden = shapes[fused + "gate_up_proj"]
            k = slim_shapes[fused + "gate_up_proj"][1] // 2
            split = _expert_names(adapter, per_expert, n_experts)
            source = list(range(n_experts)) if ids is None else ids.tolist()
            for j, e in enumerate(source):
                gate, up, down = split[e]
                layout.cuts[gate] = _Cut(0, keep[j], (two_i // 2, hidden), (k, hidden))
                layout.cuts[up] = _Cut(0, keep[j], (two_i // 2, hidden), (k, hidden))
                layout.cuts[down] = _Cut(1, keep[j], (hidden, two_i // 2), (hidden, k))
                if j != e:
                    layout.renames.update(zip(split[e], split[j]))
            layout.dropped.update(n for e in set(range(n_experts)) - set(source) for n in split[e])
            layouts["per-expert"] = [(n,) for triple in split for n in triple]
            g, u, d = adapter.checkpoint_expert_names
            supported += f", or per-expert {per_expert}<e>.{g}.weight / {u}.weight / {d}.weight"
        prefixes = tuple(dict.fromkeys(_forms(adapter, fused) + ((per_expert,) if per_expert else ())))
        layout.modules.append(_Module(f"layer {idx}'s routed experts", prefixes, supported, layouts, routed=True))
    for idx, keep in plan.shared.items():
        prefix = layout.shared[idx]
        required = [add(prefix + name, axis, keep)
                    for name, axis in (("gate_proj.weight", 0), ("up_proj.weight", 0), ("down_proj.weight", 1))]
        layout.modules.append(_Module(f"layer {idx}'s shared expert", _forms(adapter, prefix),
                                      f"{prefix}gate_proj.weight / up_proj.weight / down_proj.weight",
                                      {"as named": required}))
    if plan.kv_groups:
        hd = adapter.head_dim(config)
        for idx, keep_g in plan.kv_groups.items():
            prefix = layout.attention[idx]
            q_heads, q_rows, kv_rows = attention_rows(keep_g, config.num_attention_heads,
                                                      config.num_key_value_heads, hd)
            required = []
            for proj, proj_rows in zip(KV_PROJECTIONS, (q_rows, kv_rows, kv_rows)):
                required.append(add(f"{prefix}{proj}.weight", 0, proj_rows))
                if f"{prefix}{proj}.bias" in shapes:  # not every family has q/k/v biases
                    required.append(add(f"{prefix}{proj}.bias", 0, proj_rows))
            required.append(add(prefix + "o_proj.weight", 1, q_rows))
            for name in adapter.per_head_attention_params:
                required.append(add(prefix + name, 0, q_heads))
            layout.modules.append(_Module(
                f"layer {idx}'s attention", _forms(adapter, prefix),
                f"{prefix}q_proj / k_proj / v_proj (weight, bias) and o_proj.weight"
                + "".join(f", {prefix}{n}" for n in adapter.per_head_attention_params), {"as named": required}))


def _plan_expert_rows(layout: _Layout, idx: int, ids: torch.Tensor, fused: str, add) -> None:
    """Layer `idx` keeps the experts `ids`: its router's tensors (one row per expert: weight, bias,
    DeepSeek-V3's e_score_correction_bias) and the experts' other per-expert tensors (GPT-OSS's
    down_proj_bias) keep those rows. The router is guarded like the modules the cut shrinks."""
    router = layout.routers[idx]
    cut = {fused + n for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias")}
    required = []
    for name in layout.shapes:
        if name.startswith(router) or (name.startswith(fused) and name not in cut):
            forms = add(name, 0, ids)
            if name.startswith(router):
                required.append(forms)
    layout.modules.append(_Module(f"layer {idx}'s router", _forms(layout.adapter, router),
                                  " / ".join(forms[-1] for forms in required), {"as named": required}))


def _check_plan_fits(config, plan: KeepPlan, layout: _Layout) -> None:
    validate_targets(config, plan.targets, strict=False)
    missing = sorted(set(layout.experts) - set(plan.experts))
    extra = sorted(set(plan.experts) - set(layout.experts))
    if missing or extra:
        raise ValueError(f"the keep plan does not fit this model: MoE layers {sorted(layout.experts)}, plan for "
                         f"{sorted(plan.experts)}; build the plan with keep_plan on this model's config")
    n = plan.targets.num_experts
    want_ids = set(layout.experts) if n is not None and n != layout.adapter.num_experts(config) else set()
    if set(plan.expert_ids) != want_ids:
        raise ValueError(f"the keep plan drops experts in layers {sorted(plan.expert_ids)}, this cut needs "
                         f"{sorted(want_ids)}; build the plan with keep_plan on this model's config")
    want_shared = set(layout.shared) if plan.targets.shared_expert_intermediate_size is not None or \
        layout.adapter.shared_expert_multiplier_key else set()
    if set(plan.shared) != want_shared:
        raise ValueError(f"the keep plan's shared-expert layers {sorted(plan.shared)} are not this cut's "
                         f"{sorted(want_shared)}; build the plan with keep_plan on this model's config")
    kv = plan.targets.num_key_value_heads
    want_kv = set(layout.attention) if kv is not None and kv != config.num_key_value_heads else set()
    if set(plan.kv_groups) != want_kv:
        raise ValueError(f"the keep plan cuts KV groups in layers {sorted(plan.kv_groups)}, this cut needs "
                         f"{sorted(want_kv)}; build the plan with keep_plan on this model's config")


def _resolve(src: CheckpointTensors, layout: _Layout, slim_shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple], dict]:
    """For every written tensor, by its output name: its source tensor, its output shape and its cut
    (None: copied as it is); and the layout each cut module is stored in. Raises CheckpointLayoutError
    for anything that cannot be cut correctly, before a byte is written."""
    out: dict[str, tuple] = {}
    guarded = [(p, m) for m in layout.modules for p in m.prefixes]
    kind = layout.adapter.model_type
    for name in src.ordered():
        if name in layout.dropped:
            continue
        entry = src.entries[name]
        cut = layout.cuts.get(name)
        if cut is not None:
            if entry.shape != cut.source:
                raise CheckpointLayoutError(f"{name} has shape {entry.shape} in the checkpoint, but its config.json "
                                            f"implies {cut.source}; the weights do not belong to this config")
            shape = cut.out_shape(entry.shape)
            if shape != cut.expected:  # a bug here, not the user's: never write it
                raise RuntimeError(f"{name} would be written as {shape}, the slimmed config needs {cut.expected}")
            out[layout.renames.get(name, name)] = (name, shape, cut)
            continue
        model_name = layout.model_names.get(name)
        expected = slim_shapes.get(model_name) if model_name else None
        owner = next((m for p, m in guarded if name.startswith(p)), None)
        if owner is not None and expected != entry.shape:
            raise CheckpointLayoutError(
                f"{name} {entry.shape} belongs to {owner.what}, which this cut shrinks, but it is not a tensor the "
                f"streaming surgery knows how to cut for {kind} (supported: {owner.supported}); refusing to copy "
                "it unchanged. Quantized or otherwise repacked checkpoints must be converted to plain weights "
                "first (load them and save_pretrained with transformers)")
        if expected is not None and expected != entry.shape:
            raise CheckpointLayoutError(f"{name} has shape {entry.shape}, but the slimmed config needs {expected} and "
                                        f"the streaming surgery does not know how to cut it for {kind}")
        out[name] = (name, entry.shape, None)
    used = {}
    for module in layout.modules:
        have = {k: [any(n in src for n in forms) for forms in required] for k, required in module.layouts.items()}
        complete = [k for k, found in have.items() if all(found)]
        touched = [k for k, found in have.items() if any(found)]
        if len(complete) != 1 or len(touched) != 1:
            found = sorted(n for n in src.entries if any(n.startswith(p) for p in module.prefixes))
            raise CheckpointLayoutError(
                f"{module.what}: the checkpoint holds {found[:6]}{' ...' if len(found) > 6 else ''} there, which is "
                f"not exactly one complete layout of {module.supported}")
        if module.routed:
            used[module.what] = complete[0]
    return out, used


# -- writing --------------------------------------------------------------------------------------------

def stream_slim(model_dir: str | Path, out_dir: str | Path, plan: KeepPlan, *,
                max_shard_bytes: int = MAX_SHARD_BYTES, tokenizer_from: str | Path | None = None,
                overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Write `model_dir` cut by `plan` to `out_dir` (atomically), one tensor at a time.

    `out_dir` gets the slimmed config.json, the source's generation_config.json, the weights as
    `core.safetensors_files.write_sharded` writes them (`model.safetensors`, or past `max_shard_bytes`
    `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`), and the tokenizer
    files of `tokenizer_from` (default: `model_dir`).
    Every tensor keeps its dtype and its name; tensors the plan does not cut are copied as they are.
    Returns a report: tensors, cut, bytes, files, expert_layouts, peak_tensor_bytes (the most tensor bytes
    held at once), largest_source_tensor_bytes."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not overwrite:
        ensure_free_output(out_dir)
    config = load_config(model_dir, trust_remote_code)
    adapter, meta, layout = _walk(config, trust_remote_code)
    _check_plan_fits(config, plan, layout)
    new_config = slimmed_config(config, plan.targets)
    slim_shapes = {k: tuple(v.shape) for k, v in meta_model(new_config, trust_remote_code).state_dict().items()}
    blocks = dict(adapter.moe_blocks(meta))
    _plan_cuts(config, plan, layout, slim_shapes, lambda idx: blocks[idx].experts)
    src = CheckpointTensors(model_dir, adapter)
    resolved, layouts = _resolve(src, layout, slim_shapes)
    specs = [TensorSpec(name, src.entries[source].dtype, shape, _out_bytes(src.entries[source], shape))
             for name, (source, shape, _) in resolved.items()]

    def pieces(spec: TensorSpec) -> Iterator[torch.Tensor]:
        source, shape, cut = resolved[spec.name]
        return _pieces(src, source, cut, shape)

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_config(new_config, tmp)
        if (model_dir / "generation_config.json").is_file():
            shutil.copy2(model_dir / "generation_config.json", tmp / "generation_config.json")
        written = write_sharded(tmp, specs, pieces, max_shard_bytes)
        copy_tokenizer_files(tokenizer_from if tokenizer_from is not None else model_dir, tmp)
    return {
        "tensors": len(resolved),
        "cut": sum(1 for _, _, cut in resolved.values() if cut is not None),
        "bytes": written.bytes,
        "files": written.files,
        "expert_layouts": sorted(set(layouts.values())),
        "peak_tensor_bytes": written.peak_piece_bytes,
        "largest_source_tensor_bytes": max(e.nbytes for e in src.entries.values()),
    }


# -- data-free scores, streamed ------------------------------------------------------------------------

def streaming_magnitude_scores(model_dir: str | Path, with_heads: bool = True,
                               trust_remote_code: bool = False) -> Scores:
    """`scores.magnitude_scores` of the checkpoint (sum |w| per expert neuron, shared-expert neuron
    and KV group), computed reading one tensor at a time: the same numbers, without the model."""
    config = load_config(model_dir, trust_remote_code)
    adapter, meta, layout = _walk(config, trust_remote_code)
    src = CheckpointTensors(model_dir, adapter)
    out = Scores(method="magnitude")

    def values(model_name: str, key: tuple | None = None) -> torch.Tensor:
        release_freed_memory()  # what the previous reads freed
        name = src.find(model_name)
        if name is None:
            raise CheckpointLayoutError(f"{model_dir} holds no tensor {model_name} (nor "
                                        f"{adapter.checkpoint_name(model_name)})")
        # |w| as magnitude_values computes it, in place: the tensor was just read and is ours
        return src.read(name, key).float().abs_()

    n_experts = adapter.num_experts(config)
    for idx, (fused, per_expert) in layout.experts.items():
        if src.find(fused + "gate_up_proj") is not None:
            # expert by expert ([1, ...] slices of the fused tensors): the same sums, one expert held
            rows = []
            for e in range(n_experts):
                one = (slice(e, e + 1),)
                total = (adapter.per_neuron_gate_up(values(fused + "gate_up_proj", one))
                         + adapter.per_neuron_down(values(fused + "down_proj", one)))
                if src.find(fused + "gate_up_proj_bias") is not None:
                    total = total + gate_up_bias_neuron_sum(adapter, values(fused + "gate_up_proj_bias", one))
                rows.append(total[0])
            total = torch.stack(rows)
        elif per_expert is not None and f"{per_expert}0.{adapter.checkpoint_expert_names[0]}.weight" in src:
            rows = []
            for gate, up, down in _expert_names(adapter, per_expert, n_experts):
                # per expert what per_neuron_gate_up / per_neuron_down compute on the fused tensors
                rows.append(values(gate).sum(dim=1) + values(up).sum(dim=1) + values(down).sum(dim=0))
            total = torch.stack(rows)
        else:
            raise CheckpointLayoutError(f"layer {idx}: {model_dir} holds neither {fused}gate_up_proj nor per-expert "
                                        f"weights {per_expert}<e>.*; cannot score its experts")
        out.experts[idx] = total.float()
    for idx, prefix in layout.shared.items():
        out.shared[idx] = (values(prefix + "gate_proj.weight").sum(1) + values(prefix + "up_proj.weight").sum(1)
                           + values(prefix + "down_proj.weight").sum(0)).float()
    if with_heads and adapter.head_pruning:
        n_kv = config.num_key_value_heads
        for idx, prefix in layout.attention.items():
            parts = []
            for proj in KV_PROJECTIONS:
                rows = values(f"{prefix}{proj}.weight").sum(dim=1)
                if src.find(f"{prefix}{proj}.bias") is not None:
                    rows = rows + values(f"{prefix}{proj}.bias")
                parts.append(kv_rows_per_group(rows, n_kv))
            parts.append(kv_rows_per_group(values(prefix + "o_proj.weight").sum(dim=0), n_kv))
            out.kv_groups[idx] = kv_group_total(parts)
    return out
