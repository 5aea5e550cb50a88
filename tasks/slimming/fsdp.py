"""A stage on FSDP2: sharded loading, sharded Taylor scores, the gathered save. (Training and its
checkpoints: `engines.FSDPEngine`.)

No rank ever holds the whole model. The model is built on the meta device, sharded with
`fully_shard` per decoder layer and at the root, and each rank reads only its own rows of every
tensor from the safetensors files (FSDP2 shards in `torch.chunk` pieces: dim 0, except the fused
expert tensors, which are sharded along dim 1 so that more ranks than experts cost no padding).
Master weights, gradients and AdamW moments stay float32 and sharded; on GPU the layers compute in
bf16 with float32 gradient reduction. Past one node a stage shards over a group of ranks and
replicates across groups (HSDP, `stage_meshes`).

Taylor scores come from `register_post_accumulate_grad_hook` on every sharded parameter: FSDP2
calls it with the rank's shard of the weight and its reduce-scattered gradient, the hook folds
`|w * g|` into per-neuron and per-KV-group float32 sums and drops the gradient at once, so no full
gradient ever exists (a plain tensor hook never fires on FSDP2 parameters). Every rank then adds up
the slices the others hold, so all ranks cut the same neurons.

Scores must equal the unsharded definition, a sum of `|w * g_b|` over calibration batches b. A
data-parallel backward would combine the batches of all ranks before the `|.|`, so every rank of a
shard group processes every calibration batch of the group's ranks (rank r's batches, for r in
order) and the reduced gradient is exactly that batch's gradient; under HSDP the model scored is
sharded over the group alone, each group scores its own ranks' batches, and the groups' sums are
added. Scoring therefore costs the shard group's size times the calibration compute of a ddp stage;
it is a few thousand forward-backward passes against billions of training tokens.

The final model is gathered one tensor at a time and written in the layout transformers 5
`save_pretrained` writes (the ddp stage's), the Hub's: routed experts one tensor per expert and
projection under the family's names, which `from_pretrained`, vLLM, SGLang and llama.cpp's converter
read.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from slimmoe.tasks.core.adapters import MoEAdapter, get_adapter
from slimmoe.tasks.core.checkpoint import copy_tokenizer_files, load_config, use_hub_architecture
from slimmoe.tasks.core.runtime import rank_and_world
from slimmoe.tasks.core.safetensors_files import (MAX_SHARD_BYTES, CheckpointTensors, TensorSpec, hub_tensors,
                                                  spec_of, write_sharded)
from slimmoe.tasks.core.storage import atomic_output_dir
from slimmoe.tasks.slimming.scores import Scores, expert_importance, routing_watch
from slimmoe.tasks.trimming.scores import TrimStats

CONFIG_FILES = ("config.json", "generation_config.json")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def shard_rows(global_rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, end) along the sharded dim FSDP2 gives shard `rank` of `world`: torch.chunk
    pieces of ceil(n / world) rows."""
    per = math.ceil(global_rows / world) if global_rows else 0
    start = min(rank * per, global_rows)
    return start, min(start + per, global_rows)


def shard_span(param: torch.Tensor) -> tuple[int, int, int] | None:
    """(dim, start, end): where this rank's piece of a sharded parameter lies in the whole one, by the
    parameter's own mesh and placements (under HSDP a rank's place in its shard group, not its global
    rank); None for a tensor that is not sharded."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return None
    mesh = param.device_mesh
    coordinate = mesh.get_coordinate()
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            dim = placement.dim
            start, end = shard_rows(param.shape[dim], coordinate[mesh_dim], mesh.size(mesh_dim))
            return dim, start, end
    return None


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameter data this rank holds (its shards, without FSDP's padding)."""
    return sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())


def allocated_param_bytes(model: nn.Module) -> int:
    """Bytes FSDP2 allocates for this rank's shards: every rank holds ceil(n / group) rows along the
    sharded dim, padding included, so a rank whose rows run out past the end still allocates them."""
    total = 0
    for p in model.parameters():
        span = shard_span(p)
        if span is None:
            total += local_tensor(p).numel() * p.element_size()
            continue
        dim = span[0]
        group = p.device_mesh.size(next(i for i, pl in enumerate(p.placements) if pl.is_shard()))
        rows = math.ceil(p.shape[dim] / group) if p.shape[dim] else 0
        total += rows * (p.numel() // max(1, p.shape[dim])) * p.element_size()
    return total


_MESHES: dict = {}


def stage_meshes(device: torch.device, shard_group: int):
    """(training mesh, scoring mesh) for shard groups of `shard_group` consecutive ranks: both None under
    full sharding (FSDP2's default: the world); under HSDP the (replicate, shard) mesh, and the shard
    group alone, over which each group scores its own calibration batches. Made once per process
    (making a mesh creates process groups, a collective)."""
    _, world = rank_and_world()
    if shard_group >= world:
        return None, None
    key = (device.type, shard_group)
    if key not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // shard_group, shard_group), mesh_dim_names=("replicate", "shard"))
        _MESHES[key] = (mesh, mesh["shard"])
    return _MESHES[key]


# -- building and filling a sharded model ---------------------------------------------------------

@contextmanager
def _params_on_meta():
    """Parameters on the meta device, buffers real: the rotary tables and other non-persistent
    buffers are computed by the modules' constructors and are in no checkpoint."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def build_sharded(config, device: torch.device, experts_implementation: str | None = None,
                  activation_checkpointing: bool = False, mesh=None, expert_shard_dim: int | None = None) -> nn.Module:
    """An FSDP2-sharded, uninitialised model of `config` on `device`: weights are filled by
    `load_shards` or a distributed checkpoint. `mesh`: None shards over every rank; a 2-D
    (replicate, shard) mesh is HSDP.

    The fused expert tensors are sharded along a dim other than their expert axis (the first of dims
    1 and 2 the shard group divides: FSDP2 refuses uneven shards off dim 0): FSDP2 pads every rank to
    the first chunk's size, so with more ranks than experts a dim-0 shard would give each rank a whole
    expert (16 experts on 64 ranks: 4x the bytes of an even share) and 48 ranks nothing but padding.
    Only when neither divides does an expert tensor fall back to dim 0. (`expert_shard_dim=0` keeps
    them on the expert axis, for measuring that.)"""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    adapter = get_adapter(model)
    experts = {id(p) for _, block in adapter.moe_blocks(model) for p in block.experts.parameters() if p.dim() >= 2}

    _, world = rank_and_world()
    group = mesh.size(mesh.ndim - 1) if mesh is not None else world

    def placement(param: nn.Parameter):
        if id(param) not in experts or expert_shard_dim == 0:
            return None  # FSDP2's Shard(0)
        dim = next((d for d in (1, 2) if d < param.dim() and param.shape[d] % group == 0), None)
        return Shard(dim) if dim is not None else None

    for layer in adapter.decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, mp_policy=mp, shard_placement_fn=placement)
    model.to_empty(device=device)
    with torch.no_grad():  # to_empty wiped the buffers too
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name].to(device))
    return model


def _tied_names(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or {})


def load_shards(model: nn.Module, model_dir: str | Path) -> int:
    """Fill this rank's shard of every parameter (and every persistent buffer) from the checkpoint,
    reading only its own rows. Returns the largest number of bytes read at once."""
    model_dir = Path(model_dir)
    source = CheckpointTensors(model_dir, get_adapter(model))
    rank, _ = rank_and_world()
    state_names = set(model.state_dict().keys()) - _tied_names(model)
    missing = sorted(n for n in state_names if not source.has(n))
    if missing:
        raise ValueError(
            f"{model_dir} does not store {len(missing)} tensor(s) the model needs (first: {missing[0]}), neither "
            "under the model's names nor as transformers 5 saves them; is config.json the one these weights were "
            "saved with?")
    peak = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = local_tensor(param)
            span = shard_span(param)
            if span is not None:
                dim, start, end = span
                if end - start != local.shape[dim]:
                    raise RuntimeError(f"{name}: FSDP holds {local.shape[dim]} rows along dim {dim} on rank {rank}, "
                                       f"expected {end - start}")
                if end == start:
                    continue
                piece = source.block(name, dim, start, end)
            else:
                piece = source.full(name)
            if tuple(piece.shape) != tuple(local.shape):
                raise ValueError(f"{name}: the checkpoint's rows have shape {tuple(piece.shape)}, the model's "
                                 f"shard {tuple(local.shape)}; config.json does not describe these weights")
            peak = max(peak, piece.numel() * piece.element_size())
            local.copy_(piece)
            del piece
        params = {n for n, _ in model.named_parameters()}
        for name, buf in model.named_buffers():
            if name in state_names and name not in params:
                buf.copy_(source.full(name))
    return peak


# -- sharded Taylor scores ------------------------------------------------------------------------

def _expert_fold(adapter: MoEAdapter, role: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """[experts slab, ...] values -> [experts slab, I] neuron sums, for one fused expert tensor."""
    if role == "gate_up_proj":
        return adapter.per_neuron_gate_up
    if role == "down_proj":
        return adapter.per_neuron_down

    def bias(b: torch.Tensor) -> torch.Tensor:
        if adapter.interleaved_gate_up:
            return b[:, 0::2] + b[:, 1::2]
        half = b.shape[1] // 2
        return b[:, :half] + b[:, half:]

    return bias


def _expert_rule(target: torch.Tensor, adapter: MoEAdapter, role: str):
    """How a shard of one fused expert tensor adds to the [E, I] neuron scores, whichever dim is sharded:
    the expert axis (whole neurons of some experts), the neuron axis (some neurons of every expert:
    gate and up rows of one neuron may sit on different ranks) or another axis (a partial sum of every
    neuron)."""
    fold = _expert_fold(adapter, role)
    neuron_axis = {"gate_up_proj": adapter.gate_up_axis(), "down_proj": adapter.down_axis(), "gate_up_proj_bias": 1}[role]
    fused = role != "down_proj"
    inter = target.shape[1]

    def apply(values: torch.Tensor, dim: int, start: int) -> None:
        if dim == 0:
            target[start:start + values.shape[0]] += fold(values)
        elif dim != neuron_axis:
            target.add_(fold(values))
        else:
            rest = [d for d in range(1, values.dim()) if d != dim]
            sums = values.sum(dim=rest) if rest else values  # [E, rows]
            rows = torch.arange(start, start + values.shape[dim], device=values.device)
            neurons = (rows // 2 if adapter.interleaved_gate_up else rows % inter) if fused else rows
            target.index_add_(1, neurons, sums)
    return apply


class _Folder:
    """Where each sharded parameter's |w*g| goes: which score vector, and how its rows map onto it."""

    def __init__(self, model: nn.Module, with_heads: bool):
        self.adapter = adapter = get_adapter(model)
        cfg = model.config
        self.scores = Scores(method="taylor")
        # name -> apply(|w*g| of the local shard, its sharded dim, where it starts along that dim)
        self.rules: dict[str, Callable[[torch.Tensor, int, int], None]] = {}
        names = {id(m): n + "." if n else "" for n, m in model.named_modules()}
        device = next(model.parameters()).device
        for idx, block in adapter.moe_blocks(model):
            experts = block.experts
            inter = experts.down_proj.shape[adapter.down_axis()]
            self.scores.experts[idx] = torch.zeros(adapter.num_experts(cfg), inter, dtype=torch.float32, device=device)
            for role in ("gate_up_proj", "down_proj", "gate_up_proj_bias"):
                if getattr(experts, role, None) is not None:
                    self.rules[names[id(experts)] + role] = _expert_rule(self.scores.experts[idx], adapter, role)
            shared = adapter.shared_expert(block)
            if shared is not None:
                size = shared.gate_proj.weight.shape[0]
                target = self.scores.shared[idx] = torch.zeros(size, dtype=torch.float32, device=device)
                prefix = names[id(shared)]
                for role in ("gate_proj", "up_proj"):
                    self.rules[f"{prefix}{role}.weight"] = self._rows_rule(target, lambda v: v.sum(1))
                self.rules[f"{prefix}down_proj.weight"] = self._columns_rule(target, lambda v: v)
        if with_heads and adapter.head_pruning:
            n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, adapter.head_dim(cfg)
            group = n_h // n_kv
            for idx, layer in enumerate(adapter.decoder_layers(model)):
                target = self.scores.kv_groups[idx] = torch.zeros(n_kv, dtype=torch.float32, device=device)
                attn = adapter.attention(layer)
                prefix = names[id(attn)]
                for proj, rows_per_group in (("q_proj", group * hd), ("k_proj", hd), ("v_proj", hd)):
                    self.rules[f"{prefix}{proj}.weight"] = self._group_rule(target, rows_per_group, lambda v: v.sum(1))
                    if getattr(getattr(attn, proj), "bias", None) is not None:
                        self.rules[f"{prefix}{proj}.bias"] = self._group_rule(target, rows_per_group, lambda v: v)
                self.rules[f"{prefix}o_proj.weight"] = self._columns_rule(
                    target, lambda v, n_kv=n_kv: v.view(n_kv, -1).sum(1))

    @staticmethod
    def _rows_rule(target: torch.Tensor, fold):
        """dim 0 of the parameter (the sharded one) is dim 0 of the score (shared-expert neurons)."""
        def apply(values: torch.Tensor, dim: int, start: int) -> None:
            target[start:start + values.shape[0]] += fold(values)
        return apply

    @staticmethod
    def _columns_rule(target: torch.Tensor, fold):
        """dim 0 is the hidden size; the scored structures run along dim 1, all present in every shard."""
        def apply(values: torch.Tensor, dim: int, start: int) -> None:
            target.add_(fold(values.sum(0)))
        return apply

    @staticmethod
    def _group_rule(target: torch.Tensor, rows_per_group: int, fold):
        """dim 0 runs over heads x head_dim; row j belongs to KV group j // rows_per_group."""
        def apply(values: torch.Tensor, dim: int, start: int) -> None:
            rows = torch.arange(start, start + values.shape[0], device=values.device)
            target.index_add_(0, rows // rows_per_group, fold(values))
        return apply


def sharded_taylor_scores(model: nn.Module, batches: Iterable, loss_fn, with_heads: bool = True,
                          replicas: int = 1, expert_score: str | None = None) -> Scores:
    """Taylor scores of an FSDP2 model, identical to `scores.taylor_scores` on the unsharded model over
    the batches of every rank. Every rank of a shard group must pass the same batches in the same order;
    with `replicas` groups (HSDP scoring: the model sharded over its group alone), each group passes
    its own ranks' batches and the sums of all groups are added. With `expert_score`, whole experts are
    ranked from the same pass, as `taylor_scores` ranks them."""
    _, world = rank_and_world()
    folder = _Folder(model, with_heads)
    stats = TrimStats()
    handles = []

    def hook_for(name: str):
        rule = folder.rules.get(name)

        def hook(param: torch.Tensor) -> None:
            if rule is not None and param.grad is not None:
                w, g = local_tensor(param.detach()), local_tensor(param.grad)
                dim, start, _ = shard_span(param) or (0, 0, 0)
                if w.numel():
                    with torch.no_grad():
                        rule((w.float() * g.float()).abs(), dim, start)
            param.grad = None  # the gradient is folded: never let a full set of them accumulate
        return hook

    for name, param in model.named_parameters():
        handles.append(param.register_post_accumulate_grad_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        with routing_watch(model, expert_score, stats):
            for batch in batches:
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"calibration loss is {float(loss)} on batch {folder.scores.batches}")
                loss.backward()
                folder.scores.batches += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if folder.scores.batches == 0:
        raise ValueError("calibration data is empty: taylor scores need at least one batch")
    scores = folder.scores
    if expert_score is not None:
        scores.expert_importance = expert_importance(expert_score, scores, stats)
        if expert_score != "taylor":
            # Every rank of a group routed the same batches (the forward is whole on each), where the
            # Taylor sums below are of each rank's own slices: count a group's routing once.
            for layer, v in scores.expert_importance.items():
                scores.expert_importance[layer] = v / (world // replicas)
    # Each rank holds the sums of its own slices over its group's batches; the world's sum adds the
    # slices and, under HSDP, the groups' batches. Every rank needs all of them.
    if world > 1:
        flat = scores.flat().double()
        dist.all_reduce(flat)
        scores.load_flat(flat.float())
    scores.batches *= replicas
    return scores


def every_rank_batches(cache, micro_batch: int, world: int, count: int, seed: int,
                       ranks: Iterable[int] | None = None) -> Iterable:
    """The calibration batches of `ranks` (default: all ranks), in rank order: what a ddp stage of
    `world` ranks scores across those ranks."""
    for r in (range(world) if ranks is None else ranks):
        batches = cache.iter_batches(micro_batch, rank=r, world_size=world, shuffle=True, seed=seed)
        for _, b in zip(range(count), batches):
            yield b


def save_sharded_model(model: nn.Module, out_dir: str | Path, config_from: str | Path, dtype: torch.dtype | None = None,
                       tokenizer_from: str | Path | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                       overwrite: bool = False) -> Path | None:
    """Gather the FSDP2 model one tensor at a time and write, on rank 0, a Hugging Face directory: the
    config files of `config_from` and the weights under the names, shapes and values transformers 5
    `save_pretrained` writes (`core.safetensors_files.hub_tensors`; tied weights left out), as
    `write_sharded` writes them. Every rank must call it (the gathers are collective, one per tensor
    in state-dict order); rank 0 holds one gathered tensor at a time."""
    rank, _ = rank_and_world()
    out_dir = Path(out_dir)
    tied = _tied_names(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tensors = {n: params[n] if n in params else buffers[n] for n in model.state_dict().keys() if n not in tied}

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    if rank != 0:
        for t in tensors.values():
            full(t)  # only rank 0 writes: the others take part in the collective and drop its result
        return None

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    adapter = get_adapter(model)
    specs: list[TensorSpec] = []
    cut_from = {}  # on-disk name -> (model name, where it lies in that tensor)
    for name, t in tensors.items():
        for hub in hub_tensors(name, t.shape, adapter):  # a DTensor's shape is global
            specs.append(spec_of(hub.name, hub.shape, out_dtype(t)))
            cut_from[hub.name] = (name, hub)
    # Lazy, in state-dict order: rank 0 issues the same gathers as the other ranks, in step with the
    # writer, which asks for the tensors of one model tensor one after another.
    gathers = ((name, full(t).detach().to("cpu", out_dtype(t))) for name, t in tensors.items())
    current: list = [None, None]  # [model name, its gathered tensor]

    def pieces(spec: TensorSpec) -> Iterable[torch.Tensor]:
        name, hub = cut_from[spec.name]
        while current[0] != name:  # a model tensor with no on-disk tensor is gathered and dropped
            current[:] = [None, None]  # the previous tensor is freed before the next is gathered
            current[:] = next(gathers)
        yield hub.cut(current[1])

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_sharded(tmp, specs, pieces, max_shard_bytes)
        current[:] = [None, None]
        for _ in gathers:  # the trailing tensors that have no on-disk tensor: the others gather them too
            pass
        for name in CONFIG_FILES:
            src = Path(config_from) / name
            if src.exists():
                (tmp / name).write_bytes(src.read_bytes())
        use_hub_architecture(tmp)
        copy_tokenizer_files(tokenizer_from, tmp)
    return out_dir


def sharded_model_from(model_dir: str | Path, device: torch.device, experts_implementation: str | None = None,
                       activation_checkpointing: bool = False, trust_remote_code: bool = False,
                       mesh=None, expert_shard_dim: int | None = None) -> nn.Module:
    """Build, shard and fill a model from a Hugging Face directory: no rank holds more than its shard."""
    config = load_config(model_dir, trust_remote_code)
    model = build_sharded(config, device, experts_implementation, activation_checkpointing, mesh=mesh,
                          expert_shard_dim=expert_shard_dim)
    load_shards(model, model_dir)
    return model
