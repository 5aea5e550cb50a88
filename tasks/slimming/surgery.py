"""Expert slimming surgery: keep the best neurons within each expert and the best KV groups, and
optionally the best experts.

Every kept expert keeps its routing (its router row goes with it) and only its intermediate width
shrinks; a cut with `num_experts` drops the other experts whole, top-k unchanged. Attention
loses whole KV groups (a KV head with the query heads that share it). Which indices survive is a
`KeepPlan` (`keep_plan`); applying it here builds a fresh model from a config with the new sizes,
so it is exactly what `from_pretrained` rebuilds. `streaming.stream_slim` applies the same plan to
a checkpoint on disk, one tensor at a time.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimmoe.tasks.core.adapters import MoEAdapter, get_adapter
from slimmoe.tasks.core.checkpoint import build_from_state
from slimmoe.tasks.slimming.config import SlimTargets, validate_targets
from slimmoe.tasks.slimming.scores import Scores
from slimmoe.tasks.trimming.surgery import choose_experts, select_experts


def _top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best along the last axis, in their original order (stable for ties)."""
    # Sort by descending score with the index as tie-break so equal scores keep the lower index.
    order = torch.sort(score.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def slimmed_config(config, targets: SlimTargets):
    adapter = get_adapter(config)
    new = copy.deepcopy(config)
    setattr(new, adapter.expert_size_key, targets.expert_intermediate_size)
    if targets.num_experts is not None:
        setattr(new, adapter.num_experts_key, targets.num_experts)
    if targets.shared_expert_intermediate_size is not None:
        setattr(new, adapter.shared_expert_size_key, targets.shared_expert_intermediate_size)
    if targets.num_key_value_heads is not None and targets.num_key_value_heads != config.num_key_value_heads:
        group = config.num_attention_heads // config.num_key_value_heads
        # head_dim must be pinned: most families default it to hidden_size // num_attention_heads.
        new.head_dim = adapter.head_dim(config)
        new.num_key_value_heads = targets.num_key_value_heads
        new.num_attention_heads = targets.num_key_value_heads * group
    return new


# -- which indices survive ----------------------------------------------------------------------------

@dataclass
class KeepPlan:
    """The indices a cut keeps, per layer, ascending: routed experts [E'] (only when experts are
    dropped), their neurons [E', k] (E' = every expert otherwise), shared-expert neurons [k_s] (only
    layers whose shared expert shrinks), KV groups [kv] (only when heads are cut)."""

    targets: SlimTargets
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    shared: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_groups: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_ids: dict[int, torch.Tensor] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{kind}.{layer}": t.contiguous() for kind in ("experts", "shared", "kv_groups", "expert_ids")
                   for layer, t in getattr(self, kind).items()}
        save_file(tensors, str(path), metadata={"targets": json.dumps(asdict(self.targets))})

    @classmethod
    def load(cls, path: str | Path) -> "KeepPlan":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            plan = cls(SlimTargets(**json.loads((f.metadata() or {})["targets"])))
            for name in f.keys():
                kind, layer = name.split(".")
                getattr(plan, kind)[int(layer)] = f.get_tensor(name)
        return plan


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """A model of `config` on the meta device: its modules and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _check_score_shape(what: str, layer: int, score: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(score.shape) != expected:
        raise ValueError(f"scores for layer {layer} {what} have shape {tuple(score.shape)}, but this model needs "
                         f"{expected}; were they computed on this model?")


def kept_experts(config, scores: Scores, layers: list[int], num_experts: int) -> dict[int, torch.Tensor]:
    """The `num_experts` most important experts of every MoE layer, ascending, by `scores.expert_importance`;
    under group-limited routing (DeepSeek-V3) as many from every group (trimming's `choose_experts`)."""
    n_experts = get_adapter(config).num_experts(config)
    for idx in layers:
        if idx not in scores.expert_importance:
            raise ValueError(f"scores have no expert importance for layer {idx}, so the experts to drop cannot be "
                             "chosen; score with num_experts set (the calibration pass then ranks the experts)")
        _check_score_shape("expert importance", idx, scores.expert_importance[idx], (n_experts,))
    removed = choose_experts(config, {idx: scores.expert_importance[idx].cpu() for idx in layers},
                             n_experts - num_experts)
    return {idx: torch.tensor([e for e in range(n_experts) if e not in set(out)], dtype=torch.long)
            for idx, out in removed.items()}


def keep_plan(config, scores: Scores, targets: SlimTargets, *, strict: bool = True,
              model: nn.Module | None = None) -> KeepPlan:
    """The indices `targets` keeps: the best experts per layer (when `num_experts` drops some), the
    best-scoring neurons of each kept expert, and the best KV groups per layer.

    Validates `targets` first. The layers are walked on `model` when given, else on a meta-device
    model built from `config` (no weights)."""
    validate_targets(config, targets, strict=strict)
    adapter = get_adapter(config)
    walk = model if model is not None else meta_model(config)
    plan = KeepPlan(targets)
    n_experts, inter = adapter.num_experts(config), adapter.expert_size(config)
    blocks = list(adapter.moe_blocks(walk))
    if targets.num_experts is not None and targets.num_experts != n_experts:
        plan.expert_ids = kept_experts(config, scores, [idx for idx, _ in blocks], targets.num_experts)
    for idx, block in blocks:
        if idx not in scores.experts:
            raise ValueError(f"scores have no expert entry for layer {idx}; were they computed on this model?")
        _check_score_shape("experts", idx, scores.experts[idx], (n_experts, inter))
        neuron_scores = scores.experts[idx]
        if idx in plan.expert_ids:
            neuron_scores = neuron_scores.index_select(0, plan.expert_ids[idx].to(neuron_scores.device))
        plan.experts[idx] = _top_indices(neuron_scores, targets.expert_intermediate_size).cpu()
        shared = adapter.shared_expert(block)
        if shared is None:
            continue
        new_shared = (
            targets.expert_intermediate_size * int(getattr(config, adapter.shared_expert_multiplier_key))
            if adapter.shared_expert_multiplier_key else targets.shared_expert_intermediate_size
        )
        if new_shared is not None:
            if idx not in scores.shared:
                raise ValueError(f"scores have no shared-expert entry for layer {idx}; were they computed on this model?")
            _check_score_shape("shared expert", idx, scores.shared[idx], (shared.gate_proj.weight.shape[0],))
            plan.shared[idx] = _top_indices(scores.shared[idx], new_shared).cpu()
    kv = targets.num_key_value_heads
    if kv is not None and kv != config.num_key_value_heads:
        for idx in range(len(adapter.decoder_layers(walk))):
            if idx not in scores.kv_groups:
                raise ValueError(f"scores have no KV-group entry for layer {idx}; score with heads to prune heads")
            _check_score_shape("KV groups", idx, scores.kv_groups[idx], (config.num_key_value_heads,))
            plan.kv_groups[idx] = _top_indices(scores.kv_groups[idx], kv).cpu()
    return plan


def attention_rows(keep_groups: torch.Tensor, n_heads: int, n_kv: int, head_dim: int):
    """(query heads, q/o rows, k/v rows) that belong to the kept KV groups."""
    group = n_heads // n_kv
    q_heads = (keep_groups[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
    q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    kv_rows = (keep_groups[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    return q_heads, q_rows, kv_rows


# -- applying a plan to a model in memory --------------------------------------------------------------

def _per_expert_select(w: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """w[e] restricted to idx[e] along `axis` (an axis of the full [E, ...] tensor), for every expert e."""
    return torch.stack([w[e].index_select(axis - 1, idx[e].to(w.device)) for e in range(w.shape[0])])


def _slice_experts(adapter: MoEAdapter, prefix: str, experts: nn.Module, keep: torch.Tensor, sd: dict) -> None:
    inter = experts.down_proj.shape[adapter.down_axis()]
    rows = adapter.neuron_rows(keep, inter)
    sd[prefix + "gate_up_proj"] = _per_expert_select(sd[prefix + "gate_up_proj"], adapter.gate_up_axis(), rows)
    sd[prefix + "down_proj"] = _per_expert_select(sd[prefix + "down_proj"], adapter.down_axis(), keep)
    if prefix + "gate_up_proj_bias" in sd:
        b = sd[prefix + "gate_up_proj_bias"]
        sd[prefix + "gate_up_proj_bias"] = torch.stack([b[e, rows[e]] for e in range(b.shape[0])])


def _slice_shared(prefix: str, keep: torch.Tensor, sd: dict) -> None:
    sd[prefix + "gate_proj.weight"] = sd[prefix + "gate_proj.weight"][keep]
    sd[prefix + "up_proj.weight"] = sd[prefix + "up_proj.weight"][keep]
    sd[prefix + "down_proj.weight"] = sd[prefix + "down_proj.weight"][:, keep]


def _slice_attention(adapter: MoEAdapter, prefix: str, keep_groups: torch.Tensor, n_heads: int, n_kv: int,
                     head_dim: int, sd: dict) -> None:
    q_heads, q_rows, kv_rows = attention_rows(keep_groups, n_heads, n_kv, head_dim)
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        sd[f"{prefix}{name}.weight"] = sd[f"{prefix}{name}.weight"][rows]
        if f"{prefix}{name}.bias" in sd:
            sd[f"{prefix}{name}.bias"] = sd[f"{prefix}{name}.bias"][rows]
    sd[prefix + "o_proj.weight"] = sd[prefix + "o_proj.weight"][:, q_rows]
    for name in adapter.per_head_attention_params:
        sd[prefix + name] = sd[prefix + name][q_heads]


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its name with a trailing dot ("" for the root): the prefix of its state-dict keys."""
    return {id(m): (n + "." if n else "") for n, m in model.named_modules()}


@torch.no_grad()
def slice_state(model: nn.Module, plan: KeepPlan, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (tensors named and shaped like `model`'s state dict: its weights, or anything that lives
    beside them such as AdamW's moments) with every tensor the plan cuts restricted to the kept rows.
    Names `state` lacks are left out; the rest pass through untouched."""
    config = model.config
    adapter = get_adapter(model)
    names = module_names(model)
    sd = dict(state)
    blocks = dict(adapter.moe_blocks(model))
    for idx, keep in plan.experts.items():
        block = blocks[idx]
        if idx in plan.expert_ids:  # whole experts first: the neuron indices are per kept expert
            select_experts(adapter, block, names, plan.expert_ids[idx], adapter.num_experts(config), sd)
        _slice_experts(adapter, names[id(block.experts)], block.experts, keep, sd)
        if idx in plan.shared:
            _slice_shared(names[id(adapter.shared_expert(block))], plan.shared[idx], sd)
    if plan.kv_groups:
        hd = adapter.head_dim(config)
        layers = adapter.decoder_layers(model)
        for idx, keep_g in plan.kv_groups.items():
            _slice_attention(adapter, names[id(adapter.attention(layers[idx]))], keep_g, config.num_attention_heads,
                             config.num_key_value_heads, hd, sd)
    return sd


@torch.no_grad()
def apply_plan(model: nn.Module, plan: KeepPlan) -> nn.Module:
    """A new model with the plan's sizes, holding the kept slices of `model`'s weights."""
    state = slice_state(model, plan, model.state_dict())
    return build_from_state(slimmed_config(model.config, plan.targets), state, model)


@torch.no_grad()
def slim_model(model: nn.Module, scores: Scores, targets: SlimTargets, strict: bool = True) -> nn.Module:
    """A new model with `targets` sizes, keeping the best-scoring neurons per expert and KV groups per layer."""
    return apply_plan(model, keep_plan(model.config, scores, targets, strict=strict, model=model))
