"""Memory per worker for each node kind and execution strategy, in bytes, from a model config alone.

Parameter counts come from the model built on the meta device (`count_parameters`), so a 42B
teacher is counted in about a second without a byte of weights. Everything else is arithmetic on
the config's shapes, written to follow what the code does:

- ddp: every worker holds the float32 model, float32 gradients and two float32 AdamW moments
  (16 bytes per parameter), plus DDP's gradient buckets when there is more than one worker; bf16
  autocast on GPU (activations in bf16, the residual stream in float32). Gradients appear as the
  backward frees activations, so the peak is the larger of the backward's start (all activations
  and the loss's logit work, the head's gradient) and its end (all gradients, one layer's
  activations), unless gradient accumulation keeps the gradients of the last micro-batch.
- deepspeed (ZeRO-1/2): the whole model on every rank (bf16 on GPU, float32 on CPU), the float32
  master copy, the gradients and the AdamW moments partitioned over the ranks.
- fsdp (FSDP2, one `fully_shard` per decoder layer and the root): float32 parameters, gradients and
  moments all sharded over the shard group (16 bytes per parameter / N, N the group: the world under
  full sharding, fewer ranks under HSDP, whose groups each hold a whole copy; the fused expert
  tensors are sharded along their non-expert dimension, so N may exceed the experts with no
  padding), plus the unsharded parameters of about two
  decoder layers (the one computing and the one prefetched) and their unsharded gradients before
  the reduce-scatter, plus the root group (embeddings, head, final norm) while it computes; the
  gathered copies are bf16 on GPU, float32 on CPU.
- scoring (a stage's first phase, Taylor |w * dL/dw| on calibration batches of `micro_batch`
  rows): under ddp/deepspeed the float32 model and its full float32 gradients on every worker, no
  autocast; under fsdp the float32 shard plus one gathered layer's parameters and gradients (the
  gradient is folded into per-neuron scores as it arrives and freed), sharded over the group too.
  Slimming then holds the
  model before and after the cut at once.

Activations are an estimate of what autograd keeps per token and decoder layer (attention
projections, the top-k experts' gate/up/act/down tensors, router logits), with attention by a
fused kernel (no seq x seq scores). The logits are micro_batch x seq x vocab in float32, several
times over: the loss's float copies, log-softmax, the scatter for the rest bucket, the gradient.
The `overhead` term is the runtime (the CUDA context and library workspaces on GPU; the python +
torch + transformers process on CPU; a benchmark passes what it measured) plus the allocator's
slack on what comes and goes. On CPU a model loaded from safetensors keeps its file mapped, and the
mapped pages count in the process's memory: CPU estimates add the checkpoint's bytes to `weights`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from slimmoe.tasks.core.dtypes import DTYPE_BYTES, compute_dtype
from slimmoe.tasks.core.dtypes import dtype_bytes as _dtype_bytes

GB = 10**9
# A GPU loses this much to the CUDA context and the cuBLAS / NCCL workspaces.
GPU_RUNTIME_BYTES = int(2.5 * GB)
# A CPU worker's python + torch + transformers + Ray Train imports before any model (0.39 GB measured
# here, plus Ray's own worker threads); benchmarks/plan_accuracy.py measures it beside each run.
CPU_RUNTIME_BYTES = int(0.45 * GB)
# Allocators keep freed blocks for reuse, so a process peaks above its live tensors: on CPU glibc's
# arenas (measured 13-25% of the tensors that come and go, benchmarks/plan_accuracy.py), on GPU the
# caching allocator's fragmentation (an allowance, not measured here).
CPU_ALLOCATOR_SLACK = 0.15
GPU_ALLOCATOR_SLACK = 0.10
# Gradient elements DeepSpeed ZeRO-1/2 reduces at once (its reduce_bucket_size default), and the
# buffers it keeps for them (reduce and all-gather buckets).
ZERO_BUCKET_ELEMENTS = 500_000_000
# FSDP2 keeps the layer computing and the next one, prefetched.
FSDP_GATHERED_LAYERS = 2


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs from a model config; parameters counted on the meta device."""

    model_type: str
    total: int
    active: int
    embedding: int
    root: int  # parameters outside the decoder layers: embeddings, head, final norm
    layer: int  # the largest decoder layer
    num_layers: int
    hidden: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    expert_size: int
    num_experts: int
    top_k: int
    shared_expert_size: int
    checkpoint_dtype_bytes: int = 4  # the config's dtype (float32 when it names none): what the files store

    @property
    def checkpoint_bytes(self) -> int:
        return self.total * self.checkpoint_dtype_bytes

    def as_dict(self) -> dict:
        return asdict(self)


def as_model_config(config: Any):
    """A transformers config from a config object or a config.json's contents (a dict)."""
    if isinstance(config, dict):
        from transformers import AutoConfig

        values = dict(config)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise ValueError("the model config has no model_type; it is not a Hugging Face config.json")
        for key in ("architectures", "transformers_version", "auto_map", "_name_or_path"):
            values.pop(key, None)
        return AutoConfig.for_model(model_type, **values)
    return config


def model_shape(config: Any) -> ModelShape:
    """The shape and parameter counts of a model config (a transformers config or a config.json dict)."""
    config = as_model_config(config)
    return _shape_of_json(config.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=64)
def _shape_of_json(text: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimmoe.tasks.core.adapters import get_adapter
    from slimmoe.tasks.core.params import count_parameters

    values = json.loads(text)
    config = AutoConfig.for_model(values["model_type"], **{k: v for k, v in values.items()
                                                            if k not in ("model_type", "architectures", "transformers_version")})
    adapter = get_adapter(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = count_parameters(model)
    layers = adapter.decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    shared = adapter.shared_expert_size(config) or 0
    return ModelShape(
        model_type=config.model_type, total=counts["total"], active=counts["active"], embedding=counts["embedding"],
        root=counts["total"] - sum(per_layer), layer=max(per_layer), num_layers=len(per_layer),
        hidden=int(config.hidden_size), vocab=int(config.vocab_size), num_heads=int(config.num_attention_heads),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        head_dim=adapter.head_dim(config), expert_size=adapter.expert_size(config),
        num_experts=adapter.num_experts(config), top_k=adapter.top_k(config), shared_expert_size=int(shared),
        checkpoint_dtype_bytes=DTYPE_BYTES.get(str(values.get("dtype") or values.get("torch_dtype") or "float32"), 4))


# ---------------------------------------------------------------------------------------------
# Breakdowns


@dataclass
class Memory:
    """Bytes one worker (a GPU, or a CPU worker process) holds at its peak, by what holds them."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    logits: int = 0  # logits and their loss / top-k work buffers, cached top-k tensors
    overhead: int = 0  # the runtime: CUDA context and workspaces, or the python + torch process
    phase: str = ""  # which phase of the node is the peak (a stage: score or train)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def as_dict(self) -> dict:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits, "overhead": self.overhead,
                "total": self.total, "phase": self.phase, "notes": list(self.notes)}


def runtime_overhead(on_gpu: bool) -> int:
    return GPU_RUNTIME_BYTES if on_gpu else CPU_RUNTIME_BYTES


def _settle(mem: Memory, on_gpu: bool, runtime: int | None, mapped: int = 0) -> Memory:
    """Add what every estimate carries: the runtime, the allocator's slack on the memory that comes and
    goes, and on CPU the checkpoint file, which stays mapped (page cache counted in RSS) while the
    loaded model's tensors live."""
    slack = (GPU_ALLOCATOR_SLACK if on_gpu else CPU_ALLOCATOR_SLACK) * (mem.gradients + mem.activations + mem.logits)
    mem.overhead = int((runtime_overhead(on_gpu) if runtime is None else runtime) + slack)
    if mapped and not on_gpu:
        mem.weights += int(mapped)
        mem.notes = list(mem.notes) + ["+ the checkpoint file, mapped while the model lives"]
    return mem


def _ints(**values: float) -> dict:
    return {k: int(v) for k, v in values.items()}


# ---------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(shape: ModelShape, elem: int, resid: int) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward: `elem` bytes per element of
    the compute dtype, `resid` per element of the residual stream (float32 under autocast)."""
    h, q = shape.hidden, shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    i, k, s = shape.expert_size, shape.top_k, shape.shared_expert_size
    attention = 2 * resid * h + elem * (h + q + 2 * kv + q + kv + q)  # norm in/out, q/k/v, rotary q/k, attention out
    router = 2 * 4 * shape.num_experts  # router logits and their float32 softmax
    # Per routed copy: the gathered input, gate/up, the activation's inputs and product, the output.
    experts = k * elem * (h + 2 * i + 2 * i + h)
    shared_expert = elem * (4 * s + h) if s else 0
    return attention + elem * h + router + experts + shared_expert


def layer_forward_bytes(shape: ModelShape, elem: int) -> int:
    """Bytes per token live at the peak of one decoder layer in a forward without autograd."""
    h, q = shape.hidden, shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    i, k, s = shape.expert_size, shape.top_k, shape.shared_expert_size
    attention = elem * (h + 2 * q + 2 * kv + q)
    experts = elem * (h + k * (h + 2 * i + i + h)) + (elem * (3 * s + h) if s else 0)
    return elem * 2 * h + max(attention, experts)  # the residual stream and its norm, plus the larger sublayer


def train_activation_bytes(shape: ModelShape, tokens: int, elem: int, resid: int, checkpointing: bool) -> int:
    per_layer = layer_activation_bytes(shape, elem, resid)
    if checkpointing:  # each layer's input is kept; one layer's activations exist again during its backward
        kept = shape.num_layers * resid * shape.hidden + per_layer
    else:
        kept = shape.num_layers * per_layer
    return tokens * (kept + 2 * elem * shape.hidden)  # + the embedding output and the final norm


# The training loss runs in chunks of positions (`slimming.losses.auto_chunk_tokens`: one float32
# copy of a chunk is LOSS_CHUNK_BYTES) and recomputes each chunk in backward: beyond the model's logits
# it holds their gradient in the logits' dtype and one chunk's float32 work (measured on CPU at vocab
# 32k and 152k, seq 4096: under one chunk copy beyond the gradient; two are counted).
LOSS_CHUNK_BYTES = 2**25 * 4
LOSS_CHUNK_COPIES = 2
# Scoring's loss (`slimming.scores`) is computed in one piece: float32 [tokens, vocab] tensors at the
# start of its backward beyond the model's logits: the next-token loss's reshaped copy, its
# log-softmax and the logits' gradient.
SCORE_LOGIT_FLOAT_COPIES = 3
# Evaluation: log-softmax for perplexity and KL, and one temporary.
EVAL_LOGIT_FLOAT_COPIES = 2


def train_logit_bytes(shape: ModelShape, tokens: int, out_elem: int, k: int = 0) -> int:
    """The logits of a training micro-batch, their gradient and the chunked loss's float32 work, plus the
    cached top-k tensors the distillation loss reads (int64 ids once gathered, float16 and float32
    log-probs)."""
    chunk = min(tokens * shape.vocab * 4, LOSS_CHUNK_BYTES)
    return 2 * tokens * shape.vocab * out_elem + LOSS_CHUNK_COPIES * chunk + tokens * (k * (8 + 2 + 4) + 8)


def score_logit_bytes(shape: ModelShape, tokens: int, out_elem: int) -> int:
    """The logits of a scoring micro-batch and the one-piece loss's float32 work on them."""
    copies = SCORE_LOGIT_FLOAT_COPIES + (1 if out_elem != 4 else 0)  # `.float()` of bf16 logits is one more
    return tokens * shape.vocab * (out_elem + 4 * copies)


def teacher_logit_bytes(shape: ModelShape, tokens: int, elem: int, k: int) -> int:
    """The teacher pass's logits: the model's output, its float32 copy (unless already float32), one
    float32 scratch buffer for exp(), and the top-k values and ids."""
    return tokens * shape.vocab * (elem + (4 if elem != 4 else 0) + 4) + tokens * k * (4 + 8 + 2 + 4)


# ---------------------------------------------------------------------------------------------
# Node kinds


def _larger(*candidates: Memory) -> Memory:
    return max(candidates, key=lambda m: m.total)


def _backward_peak(static: Memory, full_grads: int, head_grads: int, activations: int, layer_activations: int,
                   logits: int, grads_persist: bool, on_gpu: bool, runtime: int | None, mapped: int) -> Memory:
    """The larger of the two moments of a backward whose gradients appear as its activations go:
    its start (every activation and the loss's logit work held, only the head's gradient made) and
    its end (every gradient made, the first layer's activations left). Gradients that persist from
    an earlier micro-batch (gradient accumulation) are there at the start too."""
    start = replace(static, gradients=static.gradients + (full_grads if grads_persist else head_grads),
                    activations=activations, logits=logits, notes=list(static.notes) + ["peak: start of backward"])
    end = replace(static, gradients=static.gradients + full_grads, activations=layer_activations,
                  notes=list(static.notes) + ["peak: end of backward (every gradient made)"])
    return _larger(_settle(start, on_gpu, runtime, mapped), _settle(end, on_gpu, runtime, mapped))


def _group(shard_group: int | None, workers: int) -> int:
    return max(1, min(shard_group, workers)) if shard_group else workers


def _shard_words(group: int, workers: int) -> str:
    workers = max(1, workers)
    return f"{group} workers" if group >= workers else f"a group of {group} workers (HSDP, {workers // group} replicas)"


def stage_train_memory(shape: ModelShape, strategy: str, num_workers: int, micro_batch: int, seq_len: int,
                       on_gpu: bool, activation_checkpointing: bool = False, k: int = 0,
                       overhead: int | None = None, grad_accum: int = 1, mapped_bytes: int = 0,
                       shard_group: int | None = None) -> Memory:
    """One worker's peak while distilling a model of `shape` (the stage's student). `overhead` replaces
    the runtime term (e.g. by a measured one); `mapped_bytes` is the checkpoint file a CPU worker
    loaded the model from (it stays mapped); `shard_group` the ranks fsdp shards one copy over
    (default: all `num_workers`)."""
    p, n, tokens = shape.total, max(1, num_workers), micro_batch * seq_len
    wide = _dtype_bytes(compute_dtype(on_gpu))
    checkpointing = activation_checkpointing and strategy == "fsdp"
    batch_note = (f"activations for micro_batch x seq_len = {micro_batch} x {seq_len}"
                  + (" with activation checkpointing" if checkpointing else ""))
    logits = train_logit_bytes(shape, tokens, wide, k)
    if strategy == "ddp":
        # float32 weights; the residual stream stays float32 under autocast.
        buckets = 4 * p if n > 1 else 0  # DDP's gradient buckets are copies of the gradients
        static = Memory(**_ints(weights=4 * p, gradients=buckets, optimizer=8 * p), phase="train",
                        notes=["ddp: float32 weights, gradients" + (" (+ DDP buckets)" if buckets else "")
                               + " and AdamW moments on every worker", batch_note])
        acts = train_activation_bytes(shape, tokens, wide, 4, False)
        return _backward_peak(static, 4 * p, 4 * shape.root, acts, tokens * layer_activation_bytes(shape, wide, 4),
                              logits, grad_accum > 1, on_gpu, overhead, mapped_bytes)
    if strategy == "deepspeed":
        buckets = 2 * min(p, ZERO_BUCKET_ELEMENTS) * wide if n > 1 else 0
        mem = Memory(**_ints(weights=wide * p + 4 * p / n, gradients=4 * p / n + buckets, optimizer=8 * p / n))
        note = (f"deepspeed ZeRO-2: {'bf16' if on_gpu else 'float32'} model on every rank, float32 master "
                f"copy, gradients and moments over {n} ranks")
    elif strategy == "fsdp":
        n = _group(shard_group, n)
        gathered = FSDP_GATHERED_LAYERS * shape.layer * wide + shape.root * wide
        # On GPU the unsharded bf16 gradient of the layer being reduced is cast to float32 for the
        # reduce-scatter (reduce_dtype float32): one more layer's worth at 4 bytes.
        reducing = shape.layer * 4 if on_gpu else 0
        mem = Memory(**_ints(weights=4 * p / n + gathered, gradients=4 * p / n + gathered + reducing,
                             optimizer=8 * p / n))
        note = (f"fsdp: 16 B/param over {_shard_words(n, num_workers)} + {FSDP_GATHERED_LAYERS} gathered layers and the root "
                f"({'bf16' if on_gpu else 'float32'}) with their unsharded gradients")
        mapped_bytes = 0  # each rank reads its own rows; nothing stays mapped whole
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose ddp, deepspeed or fsdp")
    # Sharded gradients are small beside the activations: all held at once (an upper bound).
    mem.activations = train_activation_bytes(shape, tokens, wide, wide, checkpointing)
    mem.logits = logits
    mem.phase = "train"
    mem.notes = [note, batch_note]
    return _settle(mem, on_gpu, overhead, mapped_bytes)


def stage_score_memory(shape: ModelShape, strategy: str, num_workers: int, micro_batch: int, seq_len: int,
                       on_gpu: bool, shape_after: ModelShape | None = None, overhead: int | None = None,
                       mapped_bytes: int = 0, shard_group: int | None = None) -> Memory:
    """One worker's peak while scoring (and then slimming) the model a stage cuts; `shard_group` as in
    `stage_train_memory` (HSDP scores on a model sharded over the group alone)."""
    p, n, tokens = shape.total, max(1, num_workers), micro_batch * seq_len
    if strategy == "fsdp":
        n = _group(shard_group, n)
        wide = _dtype_bytes(compute_dtype(on_gpu))
        gathered = shape.layer * wide + shape.root * wide
        mem = Memory(**_ints(weights=4 * p / n + gathered, gradients=shape.layer * (wide + (4 if on_gpu else 0))))
        mem.activations = train_activation_bytes(shape, tokens, wide, wide, checkpointing=False)
        mem.logits = score_logit_bytes(shape, tokens, wide)
        mem.phase = "score"
        mem.notes = [f"fsdp scoring: float32 shard over {_shard_words(n, num_workers)} + one gathered layer's "
                     "parameters and gradients"]
        return _settle(mem, on_gpu, overhead)
    # No autocast in scoring: a float32 forward and backward whose gradients all exist by its end (and
    # are cleared after each batch); the slim step then holds the cut model beside the whole one.
    static = Memory(weights=4 * p, phase="score",
                    notes=[f"{strategy} scoring: the float32 model and its full float32 gradients on every worker"])
    backward = _backward_peak(static, 4 * p, 4 * shape.root, train_activation_bytes(shape, tokens, 4, 4, False),
                              tokens * layer_activation_bytes(shape, 4, 4),
                              score_logit_bytes(shape, tokens, 4),
                              False, on_gpu, overhead, mapped_bytes)
    after = shape_after.total if shape_after is not None else 0
    slim = replace(static, weights=4 * p + 4 * after, notes=list(static.notes) + ["peak: the cut model built beside it"])
    return _larger(backward, _settle(slim, on_gpu, overhead, mapped_bytes))


def teacher_pass_memory(shape: ModelShape, batch_size: int, seq_len: int, k: int, on_gpu: bool, gpus: int = 1,
                        dtype_bytes: int | None = None, overhead: int | None = None, pipeline_depth: int = 1) -> Memory:
    """The busiest device of one teacher actor: its share of the weights (split evenly over `gpus`)
    plus the forward's activations and the logits' work buffers, which sit on one of them. On CPU,
    `pipeline_depth` batches' logits can be alive at once (the next forward runs while the last
    batch's top-k does)."""
    elem = dtype_bytes or _dtype_bytes(compute_dtype(on_gpu))
    gpus = max(1, gpus if on_gpu else 1)
    tokens = batch_size * seq_len
    mem = Memory(weights=-(-shape.total * elem // gpus), phase="forward")
    mem.activations = tokens * layer_forward_bytes(shape, elem)
    mem.logits = teacher_logit_bytes(shape, tokens, elem, k)
    pipeline_depth = pipeline_depth or 1  # unset: on CPU the node runs one batch at a time unless it has a spare core
    if not on_gpu and pipeline_depth > 1:
        mem.logits += (pipeline_depth - 1) * tokens * shape.vocab * 4
    dtype = {2: "bf16", 4: "float32"}.get(elem, f"{elem}-byte")
    mem.notes = [f"{dtype} weights" + (f" split over {gpus} GPUs" if gpus > 1 else "")
                 + f"; forward of batch_size x seq_len = {batch_size} x {seq_len}, float32 logits and one scratch buffer"]
    return _settle(mem, on_gpu, overhead, shape.checkpoint_bytes)


def evaluate_memory(shape: ModelShape, batch_size: int, seq_len: int, on_gpu: bool, dtype_bytes: int | None = None,
                    overhead: int | None = None) -> Memory:
    """The evaluate node (in the driver's process, one device): weights, a forward, the logits' log-softmax."""
    elem = dtype_bytes or _dtype_bytes(compute_dtype(on_gpu))
    tokens = batch_size * seq_len
    mem = Memory(weights=shape.total * elem, phase="forward")
    mem.activations = tokens * layer_forward_bytes(shape, elem)
    mem.logits = tokens * shape.vocab * (elem + 4 * EVAL_LOGIT_FLOAT_COPIES + (4 if elem != 4 else 0))
    mem.notes = [f"{'bf16' if elem == 2 else 'float32' if elem == 4 else f'{elem}-byte'} weights on one device; "
                 f"batch_size x seq_len = {batch_size} x {seq_len}"]
    return _settle(mem, on_gpu, overhead, shape.checkpoint_bytes)


def teacher_actor_gpus(config, batch_size: int, seq_len: int, k: int, gpu_memory_bytes: int, dtype_bytes: int = 2,
                       max_gpus: int = 8) -> int:
    """The fewest GPUs of one node whose memory holds a teacher pass: the weights split evenly over
    them plus the activations and logit buffers on one of them (and each GPU's runtime overhead).
    Raises ValueError with the numbers when even `max_gpus` do not."""
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu_memory_bytes must be positive, got {gpu_memory_bytes}")
    shape = model_shape(config)
    for gpus in range(1, max(1, max_gpus) + 1):
        mem = teacher_pass_memory(shape, batch_size, seq_len, k, on_gpu=True, gpus=gpus, dtype_bytes=dtype_bytes)
        if mem.total <= gpu_memory_bytes:
            return gpus
    weights = shape.total * dtype_bytes
    raise ValueError(
        f"the teacher pass does not fit {max_gpus} GPUs of {gpu_memory_bytes / GB:.1f} GB: the teacher's "
        f"{shape.total / 1e9:.2f}B parameters are {weights / GB:.1f} GB at {dtype_bytes} bytes each "
        f"({weights / max_gpus / GB:.1f} GB per GPU over {max_gpus}), and the busiest GPU also holds "
        f"{(mem.activations + mem.logits) / GB:.1f} GB of activations and logits for batch_size={batch_size} x "
        f"seq_len={seq_len} (vocabulary {shape.vocab}) plus {mem.overhead / GB:.1f} GB of runtime: "
        f"{mem.total / GB:.1f} GB in all; lower logits.batch_size or use GPUs with more memory")


__all__ = ["GB", "Memory", "ModelShape", "as_model_config", "evaluate_memory", "model_shape", "stage_score_memory",
           "stage_train_memory", "teacher_actor_gpus", "teacher_pass_memory"]
