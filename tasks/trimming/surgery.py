"""Expert trimming surgery: remove whole experts, whole MoE blocks, or whole decoder layers.

Each operation computes a state dict and a new config, then builds the result with
`slimming.build_from_state` (meta device, strict key check), so the output is exactly what
`AutoModelForCausalLM.from_pretrained` rebuilds from the saved directory with no custom code.
Feasibility checks (`check_*`) read only the config and run before any weights are touched.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from slimmoe.tasks.core.adapters import UnsupportedOperationError, get_adapter
from slimmoe.tasks.core.checkpoint import build_from_state


class TrimTargetError(ValueError):
    """A trimming target that cannot be built: negative, too large, or breaking a routing constraint."""


def _module_prefixes(model: nn.Module) -> dict[int, str]:
    return {id(m): (n + "." if n else "") for n, m in model.named_modules()}


# -- which layers carry what ------------------------------------------------------------------------

def moe_layer_indices(config) -> list[int]:
    """Indices of the decoder layers that hold a routed-expert block, from the config alone."""
    adapter = get_adapter(config)
    n = config.num_hidden_layers
    if adapter.model_type in ("qwen2_moe", "qwen3_moe"):
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    if adapter.model_type == "deepseek_v3":
        return list(range(int(getattr(config, "first_k_dense_replace", 0) or 0), n))
    return list(range(n))


# -- expert drop --------------------------------------------------------------------------------------

def _deepseek_groups(config) -> int:
    return int(getattr(config, "n_group", 1) or 1)


def check_expert_drop(config, n: int) -> None:
    adapter = get_adapter(config)
    E, k = adapter.num_experts(config), adapter.top_k(config)
    if n < 0:
        raise TrimTargetError(f"n must be >= 0 (the number of experts to remove per layer), got {n}")
    if n >= E:
        raise TrimTargetError(f"n={n} would remove every expert: the model has {adapter.num_experts_key}={E}; choose n in 0..{E - 1}")
    if k > E - n:
        raise TrimTargetError(
            f"n={n} leaves {E - n} experts per layer, fewer than {adapter.top_k_key}={k} that each token is routed to; "
            f"choose n <= {E - k} (top-k is kept as it is)"
        )
    if adapter.model_type == "deepseek_v3":
        groups, topk_group = _deepseek_groups(config), int(getattr(config, "topk_group", 1) or 1)
        if n % groups:
            raise TrimTargetError(
                f"DeepSeek-V3 routes within n_group={groups} contiguous groups of experts and needs "
                f"{adapter.num_experts_key} divisible by n_group; n={n} is not a multiple of {groups} "
                f"(experts are removed evenly from every group so group membership is kept)"
            )
        per_group = (E - n) // groups
        if per_group < 2:
            raise TrimTargetError(
                f"n={n} leaves {per_group} expert(s) per routing group; DeepSeek-V3 scores each group by its top-2 "
                f"experts, so keep at least 2 per group (n <= {E - 2 * groups})"
            )
        if k > topk_group * per_group:
            raise TrimTargetError(
                f"n={n} leaves {topk_group} selectable groups x {per_group} experts = {topk_group * per_group} "
                f"candidates per token, fewer than {adapter.top_k_key}={k}; choose a smaller n"
            )


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    # Ascending by score; ties go to the lower index (stable) so the choice is deterministic.
    return sorted(torch.sort(scores.double(), stable=True).indices[:n].tolist())


def choose_experts(config, scores: dict[int, torch.Tensor], n: int) -> dict[int, list[int]]:
    """The n lowest-scoring experts of every MoE layer (DeepSeek-V3: n / n_group from each routing group)."""
    adapter = get_adapter(config)
    E = adapter.num_experts(config)
    groups = _deepseek_groups(config) if adapter.model_type == "deepseek_v3" else 1
    size, per = E // groups, n // groups
    out = {}
    for layer, s in sorted(scores.items()):
        removed = []
        for g in range(groups):
            removed += [g * size + i for i in _lowest(s[g * size:(g + 1) * size], per)]
        out[layer] = sorted(removed)
    return out


def select_experts(adapter, block: nn.Module, prefixes: dict[int, str], keep: torch.Tensor, n_experts: int,
                   state: dict[str, torch.Tensor]) -> None:
    """Restrict `state`'s tensors of `block`'s router and experts to the experts `keep` (in that order),
    in place. Every one of them is per-expert along its first axis (router weight, GPT-OSS router bias,
    DeepSeek-V3's e_score_correction_bias buffer, fused expert weights and biases); anything else is
    refused rather than silently left at the old size. Names `state` lacks (a buffer among AdamW's
    moments) are left out."""
    for mod in (adapter.router(block), block.experts):
        prefix = prefixes[id(mod)]
        for name, t in mod.state_dict().items():
            if t.dim() == 0 or t.shape[0] != n_experts:
                raise UnsupportedOperationError(
                    f"{prefix}{name} has shape {tuple(t.shape)}, not one entry per expert ({n_experts}) along its "
                    f"first axis; expert drop does not know how to cut it for {adapter.model_type}"
                )
            if prefix + name in state:
                state[prefix + name] = state[prefix + name].index_select(0, keep.to(state[prefix + name].device))


@torch.no_grad()
def expert_drop(model: nn.Module, removed: dict[int, list[int]]) -> nn.Module:
    """A new model without the given experts (the same count in every MoE layer) and their router rows.

    Every tensor of the router and the experts module is per-expert along its first axis (router
    weight, GPT-OSS router bias, DeepSeek-V3's e_score_correction_bias buffer, fused expert weights
    and biases); anything else is refused rather than silently left at the old size."""
    adapter = get_adapter(model)
    config = model.config
    E = adapter.num_experts(config)
    blocks = dict(adapter.moe_blocks(model))
    counts = {len(v) for v in removed.values()}
    if set(removed) != set(blocks) or len(counts) > 1:
        raise TrimTargetError("expert drop needs the same number of experts removed in every MoE layer "
                              f"(got {dict((k, len(v)) for k, v in removed.items())} for layers {sorted(blocks)})")
    n = counts.pop() if counts else 0
    check_expert_drop(config, n)
    prefixes = _module_prefixes(model)
    state = dict(model.state_dict())
    for idx, block in blocks.items():
        keep = torch.tensor([e for e in range(E) if e not in set(removed[idx])], dtype=torch.long)
        select_experts(adapter, block, prefixes, keep, E, state)
    new_config = copy.deepcopy(config)
    setattr(new_config, adapter.num_experts_key, E - n)
    return build_from_state(new_config, state, model)


# -- layer drop ---------------------------------------------------------------------------------------

_LAYER_DROP_SUGGESTION = "use --method block-drop (whole layers) or --method expert-drop (experts within layers) instead"


def check_layer_drop(config, n: int, surgery: bool = True) -> None:
    """Layer drop needs a plain config that can say 'this layer has attention and no MoE block'.

    Qwen2-MoE and Qwen3-MoE can: a layer listed in `mlp_only_layers` gets a dense MLP of
    `intermediate_size`, and when no layer uses a dense MLP, `intermediate_size=0` makes that MLP
    zero-width: no parameters and an output of exactly zero, i.e. no MLP at all. The others cannot.
    With `surgery=False` only the count is checked (scoring is possible for every family)."""
    adapter = get_adapter(config)
    moe_layers = moe_layer_indices(config)
    if n < 0:
        raise TrimTargetError(f"n must be >= 0 (the number of MoE blocks to remove), got {n}")
    if n > len(moe_layers):
        raise TrimTargetError(f"n={n} is more than the model's {len(moe_layers)} MoE layers; choose n in 0..{len(moe_layers)}")
    if n == 0 or not surgery:
        return  # the identity is expressible everywhere
    mt = adapter.model_type
    if mt in ("qwen2_moe", "qwen3_moe"):
        dense = [i for i in range(config.num_hidden_layers) if i not in moe_layers]
        if dense and int(config.intermediate_size) > 0:
            raise UnsupportedOperationError(
                f"layer drop cannot be expressed for this {mt} model: it already has dense-MLP layers {dense} of "
                f"intermediate_size={config.intermediate_size}, and a layer without an MoE block can only be written "
                f"as an mlp_only_layers entry, which would give it a dense MLP of that same size; "
                + _LAYER_DROP_SUGGESTION
            )
        return
    reasons = {
        "deepseek_v3": "only the first `first_k_dense_replace` layers can be non-MoE, and they get a dense MLP of "
                       "intermediate_size; there is no per-layer list",
        "gpt_oss": "every GptOssDecoderLayer builds an MoE block; the config has no per-layer MLP list",
    }
    raise UnsupportedOperationError(
        f"layer drop is not supported for {mt}: "
        + reasons.get(mt, f"every {mt} decoder layer builds an MoE block and its config has no per-layer list "
                          "(such as mlp_only_layers or decoder_sparse_step) to mark a layer without one")
        + ", so a layer without its MoE block cannot be saved as a checkpoint that loads with no custom code; "
        + _LAYER_DROP_SUGGESTION
        + " (scores_only still reports the layer-drop ranking)"
    )


@torch.no_grad()
def layer_drop(model: nn.Module, layers: list[int]) -> nn.Module:
    """A new model in which the given layers keep attention but lose their MoE block (router,
    experts and any shared expert): their MLP becomes a zero-width dense MLP (output exactly 0)."""
    adapter = get_adapter(model)
    config = model.config
    layers = sorted(set(layers))
    check_layer_drop(config, len(layers))
    moe_layers = set(moe_layer_indices(config))
    bad = [i for i in layers if i not in moe_layers]
    if bad:
        raise TrimTargetError(f"layers {bad} have no MoE block to remove (MoE layers: {sorted(moe_layers)})")
    if not layers:
        return build_from_state(copy.deepcopy(config), dict(model.state_dict()), model)
    prefixes = _module_prefixes(model)
    decoder = adapter.decoder_layers(model)
    state = dict(model.state_dict())
    dropped_prefixes = [prefixes[id(getattr(decoder[i], adapter.moe_attr))] for i in layers]
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in dropped_prefixes)}
    new_config = copy.deepcopy(config)
    new_config.intermediate_size = 0
    new_config.mlp_only_layers = sorted(set(getattr(config, "mlp_only_layers", None) or []) | set(layers))
    # The zero-width MLP's weights are empty tensors; take their shapes from the new architecture.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        skeleton = AutoModelForCausalLM.from_config(new_config)
    sample = next(iter(state.values()))
    for key, t in skeleton.state_dict().items():
        if key not in state:
            if t.numel() != 0 or not any(key.startswith(p) for p in dropped_prefixes):
                raise RuntimeError(f"layer drop: unexpected new weight {key} of shape {tuple(t.shape)}")
            state[key] = torch.empty(t.shape, dtype=sample.dtype, device=sample.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return build_from_state(new_config, state, model)


# -- block drop ---------------------------------------------------------------------------------------

def check_block_drop(config, n: int) -> None:
    L = config.num_hidden_layers
    if n < 0:
        raise TrimTargetError(f"n must be >= 0 (the number of decoder layers to remove), got {n}")
    if n >= L:
        raise TrimTargetError(f"n={n} would remove every layer: the model has num_hidden_layers={L}; choose n in 0..{L - 1}")


def block_dropped_config(config, layers: list[int]):
    """The config without the given decoder layers: layer count and every per-layer setting renumbered."""
    adapter = get_adapter(config)
    L = config.num_hidden_layers
    drop = set(layers)
    kept = [i for i in range(L) if i not in drop]
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:  # sliding / full attention per layer (GPT-OSS, Qwen2-MoE)
        new.layer_types = [config.layer_types[i] for i in kept]
    if adapter.model_type in ("qwen2_moe", "qwen3_moe"):
        # decoder_sparse_step is a pattern over layer indices that renumbering breaks; the explicit
        # list of dense layers says the same for the kept layers.
        moe = set(moe_layer_indices(config))
        new.mlp_only_layers = [j for j, i in enumerate(kept) if i not in moe]
        new.decoder_sparse_step = 1
        if getattr(config, "max_window_layers", None) is not None:
            new.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
    if adapter.model_type == "deepseek_v3":
        k = int(getattr(config, "first_k_dense_replace", 0) or 0)
        new.first_k_dense_replace = sum(1 for i in kept if i < k)  # dense layers stay a prefix
    return new


@torch.no_grad()
def block_drop(model: nn.Module, layers: list[int]) -> nn.Module:
    """A new model without the given decoder layers; the rest keep their order and are renumbered."""
    adapter = get_adapter(model)
    config = model.config
    layers = sorted(set(layers))
    check_block_drop(config, len(layers))
    L = config.num_hidden_layers
    if any(i < 0 or i >= L for i in layers):
        raise TrimTargetError(f"layers {layers} out of range 0..{L - 1}")
    kept = [i for i in range(L) if i not in set(layers)]
    new_index = {old: new for new, old in enumerate(kept)}
    prefix = _module_prefixes(model)[id(adapter.decoder_layers(model))]
    persistent = set(model.state_dict())
    for name, _ in model.named_buffers():
        if name.startswith(prefix) and name not in persistent:
            # build_from_state copies non-persistent buffers by name, which renumbering would mismatch.
            raise UnsupportedOperationError(f"block drop: per-layer non-persistent buffer {name} is not supported")
    state = {}
    for key, t in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) in new_index:
                state[f"{prefix}{new_index[int(idx)]}.{rest}"] = t
        else:
            state[key] = t
    return build_from_state(block_dropped_config(config, layers), state, model)
