"""Where each MoE family in `transformers` 5 keeps its experts, router, shared expert and attention.

One small `MoEAdapter` per architecture family; everything that walks a model (scoring, slimming,
trimming, quantization, parameter counts) goes through these so the family knowledge lives here
and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model is not an MoE, or its architecture has no adapter."""


class UnsupportedOperationError(ValueError):
    """The adapter knows the model but the requested surgery cannot be expressed for it."""


@dataclass(frozen=True)
class MoEAdapter:
    model_type: str
    # Attribute on the decoder layer holding the sparse MoE block.
    moe_attr: str
    # Attribute on the MoE block holding the router (a module whose `.weight` is [E, H]).
    router_attr: str
    # Config keys.
    expert_size_key: str  # intermediate size of one routed expert
    num_experts_key: str
    top_k_key: str = "num_experts_per_tok"
    # Group-limited routing (DeepSeek-V3): experts split into `expert_groups_key` contiguous groups, and a
    # token picks its experts from the best `groups_per_token_key` of them. None: one group.
    expert_groups_key: str | None = None
    groups_per_token_key: str | None = None
    shared_expert_attr: str | None = None  # module with gate_proj / up_proj / down_proj
    shared_expert_size_key: str | None = None
    shared_expert_gate_attr: str | None = None
    # DeepSeek-V3 sizes its shared experts as n_shared_experts * moe_intermediate_size, so they
    # shrink with the routed experts and have no size key of their own.
    shared_expert_multiplier_key: str | None = None
    # GPT-OSS stores experts as [E, H, 2I] / [E, I, H] with gate and up interleaved.
    transposed_experts: bool = False
    interleaved_gate_up: bool = False
    # Attention: standard q/k/v/o projections with whole KV groups removable.
    head_pruning: bool = True
    head_pruning_blocker: str = ""
    # Per-query-head parameters of attention (GPT-OSS attention sinks).
    per_head_attention_params: tuple[str, ...] = ()
    # How checkpoints name what the model fuses. transformers 5 saves and loads routed experts one
    # tensor per expert (`experts.<e>.<gate|up|down>.weight`) and fuses them into gate_up_proj /
    # down_proj in memory; some families also rename modules on disk. None: stored fused, as named.
    checkpoint_expert_names: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")
    # (in the model's name, on disk) substitutions, applied in order.
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # The `architectures` name the family's Hub checkpoints carry, where it differs from the class
    # name transformers writes: serving engines (vLLM's registry, llama.cpp's converter) look it up.
    # transformers itself picks the class by model_type, so either name loads.
    hub_architecture: str | None = None
    # llama.cpp's graph for the family sizes the query and output projections at hidden x hidden, so a
    # model with fewer query heads (heads x head_dim < hidden) converts to GGUF but does not load.
    llama_cpp_fixed_attention: bool = False

    # -- walking the model ---------------------------------------------------------------------

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _inner_model(model).layers

    def moe_blocks(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        """(layer index, sparse MoE block) for every layer that has routed experts."""
        for idx, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.moe_attr, None)
            if block is not None and hasattr(block, "experts") and hasattr(block.experts, "gate_up_proj"):
                yield idx, block

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def shared_expert(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.shared_expert_attr) if self.shared_expert_attr else None

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    # -- config ----------------------------------------------------------------------------------

    def expert_size(self, config) -> int:
        return int(getattr(config, self.expert_size_key))

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_key))

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_key))

    def expert_groups(self, config) -> int:
        return int(getattr(config, self.expert_groups_key, 1) or 1) if self.expert_groups_key else 1

    def groups_per_token(self, config) -> int:
        return int(getattr(config, self.groups_per_token_key, 1) or 1) if self.groups_per_token_key else 1

    def shared_expert_size(self, config) -> int | None:
        if self.shared_expert_attr is None:
            return None
        if self.shared_expert_multiplier_key:
            return self.expert_size(config) * int(getattr(config, self.shared_expert_multiplier_key))
        return int(getattr(config, self.shared_expert_size_key))

    def head_dim(self, config) -> int:
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def require_head_pruning(self) -> None:
        if not self.head_pruning:
            raise UnsupportedOperationError(
                f"attention head pruning is not supported for {self.model_type}: {self.head_pruning_blocker}. "
                "Leave num_key_value_heads / num_attention_heads unset to slim only the experts."
            )

    # -- expert weights in one canonical layout ----------------------------------------------------

    def neuron_rows(self, keep: torch.Tensor, inter: int) -> torch.Tensor:
        """Indices along the fused gate/up axis that belong to the given intermediate neurons."""
        if self.interleaved_gate_up:
            return torch.stack([2 * keep, 2 * keep + 1], dim=-1).reshape(*keep.shape[:-1], -1)
        return torch.cat([keep, keep + inter], dim=-1)

    def gate_up_axis(self) -> int:
        """Axis of `experts.gate_up_proj` that runs over the 2*I fused neurons."""
        return 2 if self.transposed_experts else 1

    def down_axis(self) -> int:
        """Axis of `experts.down_proj` that runs over the I neurons."""
        return 1 if self.transposed_experts else 2

    def per_neuron_gate_up(self, tensor: torch.Tensor) -> torch.Tensor:
        """[E, 2I, H]-shaped (or transposed) tensor -> [E, I] summed |.| over gate and up rows."""
        t = tensor.abs()
        if self.transposed_experts:
            t = t.transpose(1, 2)
        t = t.sum(dim=2)  # [E, 2I]
        if self.interleaved_gate_up:
            return t[:, 0::2] + t[:, 1::2]
        inter = t.shape[1] // 2
        return t[:, :inter] + t[:, inter:]

    def checkpoint_name(self, model_name: str) -> str:
        """The name `model_name` has on disk when it is not fused (after the family's renames)."""
        for ours, theirs in self.checkpoint_renames:
            model_name = model_name.replace(ours, theirs)
        return model_name

    def per_neuron_down(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.abs()
        return t.sum(dim=2) if self.transposed_experts else t.sum(dim=1)


def _inner_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `.model.layers`; expected a *ForCausalLM decoder model"
        )
    return inner


ADAPTERS: dict[str, MoEAdapter] = {
    a.model_type: a
    for a in [
        MoEAdapter("phimoe", moe_attr="mlp", router_attr="router",
                   expert_size_key="intermediate_size", num_experts_key="num_local_experts",
                   checkpoint_expert_names=("w1", "w3", "w2"),
                   checkpoint_renames=((".mlp.", ".block_sparse_moe."), (".router.weight", ".gate.weight")),
                   hub_architecture="PhiMoEForCausalLM", llama_cpp_fixed_attention=True),
        MoEAdapter("mixtral", moe_attr="mlp", router_attr="gate",
                   expert_size_key="intermediate_size", num_experts_key="num_local_experts",
                   checkpoint_expert_names=("w1", "w3", "w2"), checkpoint_renames=((".mlp.", ".block_sparse_moe."),)),
        MoEAdapter("qwen2_moe", moe_attr="mlp", router_attr="gate",
                   expert_size_key="moe_intermediate_size", num_experts_key="num_experts",
                   shared_expert_attr="shared_expert", shared_expert_size_key="shared_expert_intermediate_size",
                   shared_expert_gate_attr="shared_expert_gate", llama_cpp_fixed_attention=True),
        MoEAdapter("qwen3_moe", moe_attr="mlp", router_attr="gate",
                   expert_size_key="moe_intermediate_size", num_experts_key="num_experts"),
        MoEAdapter("olmoe", moe_attr="mlp", router_attr="gate",
                   expert_size_key="intermediate_size", num_experts_key="num_experts",
                   head_pruning=False,
                   head_pruning_blocker="its q_norm is built with hidden_size channels, so fewer query heads "
                                        "cannot be expressed in a plain OlmoeConfig"),
        MoEAdapter("deepseek_v3", moe_attr="mlp", router_attr="gate",
                   expert_size_key="moe_intermediate_size", num_experts_key="n_routed_experts",
                   expert_groups_key="n_group", groups_per_token_key="topk_group",
                   shared_expert_attr="shared_experts", shared_expert_multiplier_key="n_shared_experts",
                   head_pruning=False,
                   head_pruning_blocker="its multi-head latent attention (MLA) has no separable KV groups"),
        MoEAdapter("gpt_oss", moe_attr="mlp", router_attr="router",
                   expert_size_key="intermediate_size", num_experts_key="num_local_experts",
                   transposed_experts=True, interleaved_gate_up=True,
                   per_head_attention_params=("sinks",), checkpoint_expert_names=None),
    ]
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config) -> MoEAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts architecture; "
            f"supported: {', '.join(supported_architectures())}"
        )
    if not hasattr(config, adapter.num_experts_key) or not getattr(config, adapter.num_experts_key):
        raise UnsupportedModelError(
            f"config of model_type {model_type!r} has no routed experts ({adapter.num_experts_key} is unset); "
            f"supported MoE architectures: {', '.join(supported_architectures())}"
        )
    return adapter
