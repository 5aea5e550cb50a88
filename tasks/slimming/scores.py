"""First-order Taylor sensitivity of expert neurons and attention KV groups.

The score of a structure is `sum |w * dL/dw|` over every weight that belongs to it: for expert
neuron i its row in gate and up and its column in down; for a KV group its KV head's k/v rows,
the q rows of the query heads that share it, and their o columns. Scores are accumulated in
float32 over calibration batches, one |w*g| per batch (not |w * sum g|), so a neuron whose
gradient changes sign across batches still counts as important.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimmoe.tasks.core.adapters import MoEAdapter, get_adapter
from slimmoe.tasks.core.runtime import rank_and_world
from slimmoe.tasks.slimming.losses import kd_loss, next_token_loss
from slimmoe.tasks.trimming.scores import TrimStats, watching_routing


@dataclass
class Scores:
    """Per-layer importance: expert neurons [E, I], shared-expert neurons [I_s], KV groups [n_kv], and
    whole routed experts [E] (`expert_importance`, only when the cut drops experts)."""

    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    shared: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_groups: dict[int, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    method: str = "taylor"
    expert_importance: dict[int, torch.Tensor] = field(default_factory=dict)

    def _items(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind in ("experts", "shared", "kv_groups", "expert_importance"):
            for layer, t in getattr(self, kind).items():
                out[f"{kind}.{layer}"] = t
        return out

    def flat(self) -> torch.Tensor:
        """All scores as one vector, in a fixed order (for all-reduce)."""
        return torch.cat([t.reshape(-1) for _, t in sorted(self._items().items())])

    def load_flat(self, flat: torch.Tensor) -> None:
        offset = 0
        for name, t in sorted(self._items().items()):
            kind, layer = name.split(".")
            n = t.numel()
            getattr(self, kind)[int(layer)] = flat[offset : offset + n].view_as(t).clone()
            offset += n

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self._items().items()}, str(path),
                  metadata={"batches": str(self.batches), "method": self.method})

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        from safetensors import safe_open

        from slimmoe.tasks.core.safetensors_files import read_header

        # A truncated or foreign file: BrokenCheckpointError naming it, not safetensors' own error.
        read_header(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        scores = cls(batches=int(meta.get("batches", 0)), method=meta.get("method", "taylor"))
        for name, t in load_file(str(path)).items():
            kind, layer = name.split(".")
            getattr(scores, kind)[int(layer)] = t
        return scores


# The sums below are split per tensor so that `streaming.streaming_magnitude_scores` can compute the
# very same numbers reading one checkpoint tensor at a time: same operations, same order.
KV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def kv_rows_per_group(rows: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Per-row sums of one of q/k/v ([rows], the weight's row sums plus the bias) -> [n_kv]."""
    return rows.view(n_kv, -1).sum(dim=1)


def kv_group_total(parts: list[torch.Tensor]) -> torch.Tensor:
    """The q, k, v, o contributions ([n_kv] each, in that order) added up as `_kv_group_sum` does."""
    total = torch.zeros(parts[0].shape[0], dtype=torch.float32, device=parts[0].device)
    for part in parts:
        total += part
    return total


def _kv_group_sum(attn: nn.Module, values: Callable[[torch.Tensor], torch.Tensor], n_heads: int, n_kv: int,
                  head_dim: int) -> torch.Tensor:
    """Sum `values(param)` (elementwise, >= 0) over each KV group's q/k/v rows and o columns."""
    parts = []
    for name in KV_PROJECTIONS:
        proj = getattr(attn, name)
        rows = values(proj.weight).sum(dim=1)
        if getattr(proj, "bias", None) is not None:
            rows = rows + values(proj.bias)
        parts.append(kv_rows_per_group(rows, n_kv))
    parts.append(kv_rows_per_group(values(attn.o_proj.weight).sum(dim=0), n_kv))
    return kv_group_total(parts)


def gate_up_bias_neuron_sum(adapter: MoEAdapter, b: torch.Tensor) -> torch.Tensor:
    """[E, 2I] values of the fused gate/up bias -> [E, I]."""
    if adapter.interleaved_gate_up:
        return b[:, 0::2] + b[:, 1::2]
    return b[:, : b.shape[1] // 2] + b[:, b.shape[1] // 2 :]


def _expert_neuron_sum(adapter: MoEAdapter, experts: nn.Module, values) -> torch.Tensor:
    total = adapter.per_neuron_gate_up(values(experts.gate_up_proj)) + adapter.per_neuron_down(values(experts.down_proj))
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is not None:  # [E, 2I]
        total = total + gate_up_bias_neuron_sum(adapter, values(bias))
    return total


def _shared_neuron_sum(shared: nn.Module, values) -> torch.Tensor:
    return values(shared.gate_proj.weight).sum(1) + values(shared.up_proj.weight).sum(1) + values(shared.down_proj.weight).sum(0)


def magnitude_values(param: torch.Tensor) -> torch.Tensor:
    return param.detach().float().abs()


def _structure_sums(model: nn.Module, values, with_heads: bool) -> Scores:
    adapter = get_adapter(model)
    cfg = model.config
    out = Scores()
    for idx, block in adapter.moe_blocks(model):
        out.experts[idx] = _expert_neuron_sum(adapter, block.experts, values).float()
        shared = adapter.shared_expert(block)
        if shared is not None:
            out.shared[idx] = _shared_neuron_sum(shared, values).float()
    if with_heads:
        hd = adapter.head_dim(cfg)
        for idx, layer in enumerate(adapter.decoder_layers(model)):
            out.kv_groups[idx] = _kv_group_sum(adapter.attention(layer), values, cfg.num_attention_heads,
                                               cfg.num_key_value_heads, hd)
    return out


EXPERT_SCORES = ("taylor", "frequency", "reconstruction")


def expert_importance(kind: str, scores: Scores, stats: TrimStats | None = None) -> dict[int, torch.Tensor]:
    """[E] per MoE layer, higher = keep: the ranking `StageConfig.expert_score` names. Every value is a
    sum over the calibration tokens, so it adds up over batches and ranks like the neuron scores:
    "taylor" sums the expert's neuron scores; "frequency" is the routing weight the expert received
    (trimming's frequency score times the token count: the same order); "reconstruction" the squared
    norm of its weighted output (the square of trimming's reconstruction score: the same order)."""
    if kind == "taylor":
        return {layer: t.sum(dim=1) for layer, t in scores.experts.items()}
    if kind not in EXPERT_SCORES:
        raise ValueError(f"expert_score {kind!r} is unknown; choose one of {', '.join(EXPERT_SCORES)}")
    if stats is None:
        raise ValueError(f"expert_score: {kind} ranks experts by their routing on calibration data, and there is "
                         "none; give calibration data or use expert_score: taylor")
    sums = stats.expert_weight_sum if kind == "frequency" else stats.expert_recon_sq
    return {layer: v.float() for layer, v in sums.items()}


def routing_watch(model: nn.Module, expert_score: str | None, stats: TrimStats):
    """The routing statistics `expert_score` needs, collected over the passes made inside (none for
    "taylor", which needs only the neuron scores)."""
    if expert_score in (None, "taylor"):
        return nullcontext(stats)
    return watching_routing(model, stats, reconstruction=expert_score == "reconstruction")


def _taylor_values(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:
        return torch.zeros_like(param, dtype=torch.float32)
    return (param.detach().float() * param.grad.float()).abs()


def _add_into(acc: Scores, new: Scores) -> None:
    for kind in ("experts", "shared", "kv_groups"):
        a, n = getattr(acc, kind), getattr(new, kind)
        for k, v in n.items():
            a[k] = a[k] + v if k in a else v.clone()


def taylor_scores(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    with_heads: bool = True,
    expert_score: str | None = None,
) -> Scores:
    """Accumulate |w * dL/dw| over `batches`. `loss_fn(model, batch)` returns a scalar loss. With
    `expert_score`, the same pass also ranks whole experts (`expert_importance`).

    Gradients are taken for every parameter but nothing is updated; the model's grads are cleared
    before and after."""
    adapter = get_adapter(model)
    if with_heads and not adapter.head_pruning:
        with_heads = False
    was_training = model.training
    model.eval()  # no dropout, deterministic routing (PhiMoE's sparsemixer jitters in train mode)
    acc = Scores(method="taylor")
    stats = TrimStats()
    model.zero_grad(set_to_none=True)
    with routing_watch(model, expert_score, stats):
        for batch in batches:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"calibration loss is {float(loss)} on batch {acc.batches}")
            loss.backward()
            with torch.no_grad():
                _add_into(acc, _structure_sums(model, _taylor_values, with_heads))
            model.zero_grad(set_to_none=True)
            acc.batches += 1
    model.train(was_training)
    if acc.batches == 0:
        raise ValueError("calibration data is empty: taylor scores need at least one batch")
    if expert_score is not None:
        acc.expert_importance = expert_importance(expert_score, acc, stats)
    return acc


@torch.no_grad()
def magnitude_scores(model: nn.Module, with_heads: bool = True) -> Scores:
    """Data-free fallback: sum |w| over each structure."""
    adapter = get_adapter(model)
    scores = _structure_sums(model, magnitude_values, with_heads and adapter.head_pruning)
    scores.method = "magnitude"
    return scores


def all_reduce_scores(scores: Scores) -> Scores:
    """Sum scores over all ranks of the default process group, so every rank slims alike."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        flat = scores.flat().to(torch.float64)
        dist.all_reduce(flat)
        scores.load_flat(flat.float())
        n = torch.tensor([scores.batches], dtype=torch.int64, device=flat.device)
        dist.all_reduce(n)
        scores.batches = int(n.item())
    return scores


def next_token_score_loss(model: nn.Module, batch) -> torch.Tensor:
    input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
    input_ids = input_ids.to(next(model.parameters()).device)
    return next_token_loss(model(input_ids=input_ids).logits, input_ids)


def kd_score_loss(temperature: float = 1.0, next_token_weight: float = 0.0) -> Callable[[nn.Module, dict], torch.Tensor]:
    """Scoring loss against cached teacher log-probs. At stage 1 the student *is* the teacher, so
    this loss and its gradient are exactly zero there: use next-token scores for the first cut."""

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=b["input_ids"]).logits
        loss = kd_loss(logits, b["topk_ids"], b["topk_logprobs"], b["rest_logprob"], temperature)
        if next_token_weight:
            loss = loss + next_token_weight * next_token_loss(logits, b["input_ids"])
        return loss

    return loss_fn


def score_model(model: nn.Module, batches: Iterable | None, loss_fn=next_token_score_loss,
                with_heads: bool = True, expert_score: str | None = None) -> Scores:
    """Taylor scores over `batches`, or weight magnitudes when there is no calibration data. With
    `expert_score`, whole experts are ranked too (by magnitude only as "taylor")."""
    if batches is None:
        scores = magnitude_scores(model, with_heads=with_heads)
        if expert_score is not None:
            scores.expert_importance = expert_importance(expert_score, scores)
        return scores
    return taylor_scores(model, batches, loss_fn, with_heads=with_heads, expert_score=expert_score)
