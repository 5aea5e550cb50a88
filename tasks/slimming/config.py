"""A SlimMoE stage's settings, and the one rule for what a cut may ask of the model it cuts.

`StageConfig` is parsed once from the workflow YAML (or built by hand) and travels as it is: to the
stage node, then serialised to every Ray Train worker. `check_targets` is the only place that
decides whether a cut is valid; the workflow calls it for every stage against the sizes that stage
inherits from the one before, so a bad later stage is refused before the first one trains. It imports no torch, so parsing a workflow stays fast.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Optional, Sequence

from pydantic import Field, model_validator

from slimmoe.tasks.core.dtypes import DTYPE_BYTES, compute_dtype
from slimmoe.tasks.core.settings import TaskConfig
from slimmoe.tasks.core.tracking import TrackingConfig

if TYPE_CHECKING:
    from slimmoe.tasks.core.adapters import MoEAdapter

# The fused experts kernel (`torch._grouped_mm`, transformers' default on recent versions) needs
# every expert row to start on a 16-byte boundary: a float32 expert size of 18 saves fine and then
# fails at the first forward. Sizes must be multiples of this many elements per dtype.
ROW_ALIGN_BYTES = 16


class SlimTargetError(ValueError):
    """A slimming target that cannot be built (not smaller, zero, misaligned, or more KV heads than there are).
    `field` names the target at fault."""

    def __init__(self, message: str, field: str = "expert_intermediate_size"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SlimTargets:
    expert_intermediate_size: int
    num_key_value_heads: int | None = None
    # Qwen2-MoE style shared experts with their own size key; None keeps them as they are.
    shared_expert_intermediate_size: int | None = None
    # Routed experts kept per MoE layer (the same in every layer, so the output is a plain config);
    # None keeps every expert.
    num_experts: int | None = None


@dataclass(frozen=True)
class ModelSizes:
    """The sizes a cut can change, read from a model config (or a config.json as a namespace).

    A workflow checked without its teacher knows only what the previous stage asked for: then
    `adapter` and the head count are None and only the rules that need no more are applied."""

    adapter: Optional["MoEAdapter"]
    expert_intermediate_size: int
    num_attention_heads: Optional[int]
    num_key_value_heads: Optional[int]
    shared_expert_intermediate_size: Optional[int]
    source: str = "the model"  # what these are the sizes of, for messages: "the teacher", "stage_1"
    num_experts: Optional[int] = None
    experts_per_token: Optional[int] = None
    expert_groups: int = 1  # group-limited routing (DeepSeek-V3's n_group); 1 elsewhere
    groups_per_token: int = 1

    @classmethod
    def of(cls, config, source: str = "the model") -> "ModelSizes":
        from slimmoe.tasks.core.adapters import get_adapter  # torch: kept out of the config's import

        adapter = get_adapter(config)
        shared = adapter.shared_expert_size(config) if adapter.shared_expert_size_key else None
        return cls(adapter, adapter.expert_size(config), int(config.num_attention_heads),
                   int(config.num_key_value_heads), shared, source, adapter.num_experts(config),
                   adapter.top_k(config), adapter.expert_groups(config), adapter.groups_per_token(config))

    def after(self, targets: SlimTargets, source: str) -> "ModelSizes":
        """The sizes once `targets` is applied: what the next stage inherits."""
        kv = targets.num_key_value_heads or self.num_key_value_heads
        heads = (self.num_attention_heads // self.num_key_value_heads * kv
                 if self.num_attention_heads and self.num_key_value_heads and kv else self.num_attention_heads)
        return replace(self, expert_intermediate_size=targets.expert_intermediate_size, num_key_value_heads=kv,
                       num_attention_heads=heads, source=source, num_experts=targets.num_experts or self.num_experts,
                       shared_expert_intermediate_size=targets.shared_expert_intermediate_size
                       or self.shared_expert_intermediate_size)


def aligned_sizes_near(size: int, align: int) -> str:
    lower = size // align * align
    options = [s for s in (lower, lower + align) if s > 0]
    return " or ".join(str(s) for s in options)


def check_targets(sizes: ModelSizes, targets: SlimTargets, strict: bool = True, dtype: str | None = None,
                  tensor_parallel: Sequence[int] = (), block_fp8: bool = False, llama_cpp: bool = False) -> None:
    """Raise SlimTargetError naming the field and the fix; nothing is built or trained before this passes.

    `strict` requires the expert size to shrink (a slimming step that keeps everything is a mistake
    in a user's config); the identity surgery in tests passes strict=False. With `dtype`, sizes must
    also give 16-byte expert rows in that dtype. With `tensor_parallel` (a workflow's
    serve.tensor_parallel), the cut model must split at every one of those sizes (`core.serving`); with
    `llama_cpp`, it must be a model llama.cpp loads."""
    adapter, src = sizes.adapter, sizes.source
    size_key = adapter.expert_size_key if adapter else "expert_intermediate_size"
    current = sizes.expert_intermediate_size
    t = targets.expert_intermediate_size
    if t is None or t <= 0:
        raise SlimTargetError(f"expert_intermediate_size must be a positive integer, got {t}")
    if t > current or (strict and t == current):
        raise SlimTargetError(
            f"expert_intermediate_size={t} is not smaller than {src}'s {size_key}={current}; "
            f"choose a size in 1..{current - (1 if strict else 0)}"
        )
    if dtype is not None:
        align = ROW_ALIGN_BYTES // DTYPE_BYTES[dtype]
        for name, value in (("expert_intermediate_size", t),
                            ("shared_expert_intermediate_size", targets.shared_expert_intermediate_size)):
            if value is not None and value % align:
                raise SlimTargetError(
                    f"{name}={value} gives {value * DTYPE_BYTES[dtype]}-byte expert rows in {dtype}; the fused experts "
                    f"kernel (torch._grouped_mm) needs rows of a multiple of {ROW_ALIGN_BYTES} bytes, so sizes must be "
                    f"multiples of {align} in {dtype}: choose {aligned_sizes_near(value, align)}", name)
    if targets.shared_expert_intermediate_size is not None and adapter is not None:
        if adapter.shared_expert_size_key is None:
            raise SlimTargetError(
                f"shared_expert_intermediate_size is not settable for {adapter.model_type}"
                + (" (its shared experts shrink with the routed experts)" if adapter.shared_expert_multiplier_key else
                   " (it has no shared expert)"), "shared_expert_intermediate_size")
        cur_s = sizes.shared_expert_intermediate_size
        s = targets.shared_expert_intermediate_size
        if s <= 0 or s > cur_s:
            raise SlimTargetError(
                f"shared_expert_intermediate_size={s} must be in 1..{cur_s} ({src}'s {adapter.shared_expert_size_key})",
                "shared_expert_intermediate_size")
    _check_num_experts(sizes, targets)
    kv = targets.num_key_value_heads
    if kv is not None:
        if adapter is not None:
            adapter.require_head_pruning()
        n_kv, n_h = sizes.num_key_value_heads, sizes.num_attention_heads
        if kv <= 0:
            raise SlimTargetError(f"num_key_value_heads must be a positive integer, got {kv}", "num_key_value_heads")
        if n_kv is not None and kv > n_kv:
            raise SlimTargetError(
                f"num_key_value_heads={kv} is larger than {src}'s num_key_value_heads={n_kv}; "
                f"choose a value in 1..{n_kv} (or leave it unset to keep attention as it is)", "num_key_value_heads")
        if n_h is not None and n_kv and n_h % n_kv:
            raise SlimTargetError(f"{src}'s num_attention_heads={n_h} is not a multiple of num_key_value_heads={n_kv}",
                                  "num_key_value_heads")
    if tensor_parallel:
        _check_serving(sizes, targets, tensor_parallel, block_fp8, dtype)
    if llama_cpp and kv is not None and adapter is not None and adapter.llama_cpp_fixed_attention \
            and kv != sizes.num_key_value_heads:
        raise SlimTargetError(
            f"serve.llama_cpp: llama.cpp builds {adapter.model_type}'s attention at hidden_size x hidden_size, so a "
            f"model with fewer query heads converts to GGUF but does not load; remove num_key_value_heads (keep the "
            "heads), or serve this model with vLLM or SGLang only", "num_key_value_heads")


def _check_num_experts(sizes: ModelSizes, targets: SlimTargets) -> None:
    """The routed experts a cut keeps: no more than there are, at least top-k (top-k is kept), and under
    group-limited routing (DeepSeek-V3) the same count in every group, enough for the router's choice."""
    n, src, adapter = targets.num_experts, sizes.source, sizes.adapter
    if n is None:
        return
    key = adapter.num_experts_key if adapter else "num_experts"
    if n <= 0:
        raise SlimTargetError(f"num_experts must be a positive integer, got {n}", "num_experts")
    total, top_k = sizes.num_experts, sizes.experts_per_token
    if total is not None and n > total:
        raise SlimTargetError(f"num_experts={n} is more than {src}'s {key}={total}; choose a count up to {total} "
                              "(or leave num_experts unset to keep every expert)", "num_experts")
    if top_k is not None and n < top_k:
        raise SlimTargetError(
            f"num_experts={n} keeps fewer experts than the {top_k} every token is routed to ({src}'s "
            f"{adapter.top_k_key if adapter else 'experts per token'}={top_k}, which the cut keeps); choose "
            f"num_experts of at least {top_k}", "num_experts")
    if adapter is None or adapter.expert_groups_key is None:
        return
    groups, per_token = sizes.expert_groups, sizes.groups_per_token
    family = f"{adapter.model_type} routes within {adapter.expert_groups_key}={groups} equal groups of experts"
    if n % groups:
        lower = n // groups * groups
        fits = " or ".join(str(c) for c in (lower, lower + groups) if c > 0 and (total is None or c <= total))
        raise SlimTargetError(f"num_experts={n} does not divide by {src}'s {adapter.expert_groups_key}={groups}: "
                              f"{family}, and the cut keeps the same count in each; choose {fits}", "num_experts")
    per_group = n // groups
    # Its router ranks each group by the sum of the group's two best expert scores.
    if per_group < 2:
        raise SlimTargetError(f"num_experts={n} leaves {per_group} expert per routing group: {family} and ranks each "
                              f"group by its best two experts; choose num_experts of at least {2 * groups}", "num_experts")
    if top_k is not None and top_k > per_token * per_group:
        need = -(-top_k // per_token) * groups
        raise SlimTargetError(
            f"num_experts={n} leaves {per_token} selectable groups ({adapter.groups_per_token_key}) x {per_group} "
            f"experts = {per_token * per_group} candidates per token, fewer than {adapter.top_k_key}={top_k}: "
            f"{family}; choose num_experts of at least {max(need, 2 * groups)}", "num_experts")


def _check_serving(sizes: ModelSizes, targets: SlimTargets, tensor_parallel: Sequence[int], block_fp8: bool,
                   dtype: str | None) -> None:
    from slimmoe.tasks.core.serving import ServeShape, kv_heads_that_serve, sizes_that_serve, tp_problems

    after = sizes.after(targets, sizes.source)
    shape = ServeShape(after.num_attention_heads, after.num_key_value_heads, after.expert_intermediate_size,
                       after.shared_expert_intermediate_size if sizes.adapter is None or
                       sizes.adapter.shared_expert_size_key else None)
    for tp in tensor_parallel:
        for field, rule in tp_problems(shape, tp, block_fp8):
            where = f"serve.tensor_parallel {list(tensor_parallel)}: vLLM and SGLang cannot serve this cut at {tp} GPUs"
            if field == "num_key_value_heads":
                most = sizes.num_key_value_heads or after.num_key_value_heads
                fits = kv_heads_that_serve(shape, tensor_parallel, most)
                fix = f"choose num_key_value_heads from {fits}" if fits else "remove the sizes it cannot reach from serve"
                if targets.num_key_value_heads is None:
                    fix = f"the model's own heads do not split: {fix}, or remove {tp} from serve.tensor_parallel"
            else:
                align = ROW_ALIGN_BYTES // DTYPE_BYTES[dtype] if dtype else 1
                fits = sizes_that_serve(getattr(after, field), tensor_parallel, align, block_fp8,
                                        most=getattr(sizes, field))
                fix = (f"choose {field} {' or '.join(map(str, fits))}" if fits else
                       f"no {field} up to {sizes.source}'s {getattr(sizes, field)} splits that way: serve it at fewer "
                       "GPUs (remove the larger sizes from serve.tensor_parallel)")
            raise SlimTargetError(f"{where} ({rule}); {fix}", field)


def validate_targets(config, targets: SlimTargets, strict: bool = True, dtype: str | None = None,
                     tensor_parallel: Sequence[int] = (), block_fp8: bool = False, llama_cpp: bool = False) -> None:
    """`check_targets` against a model config."""
    check_targets(ModelSizes.of(config), targets, strict=strict, dtype=dtype, tensor_parallel=tensor_parallel,
                  block_fp8=block_fp8, llama_cpp=llama_cpp)


class SlimConfig(TaskConfig):
    """One-shot slimming (`slimmoe slim`): the cut's targets and its calibration data."""

    expert_intermediate_size: int = Field(gt=0, description="the new intermediate size of every routed expert")
    num_key_value_heads: Optional[int] = Field(None, gt=0, description="keep this many KV groups (query heads follow)")
    shared_expert_intermediate_size: Optional[int] = Field(None, gt=0)
    data: Optional[str] = Field(None, description="calibration text or token shards; none: score by |w|")
    scores: Optional[str] = Field(None, description="cut with these scores (a stage's scores.safetensors) "
                                                    "instead of scoring; excludes data")
    calibration_batches: int = Field(8, gt=0)
    batch_size: int = Field(4, gt=0)
    seq_len: int = Field(256, ge=2)
    text_field: str = "text"
    tensor_parallel: list[int] = Field(default_factory=list, description="refuse a cut vLLM/SGLang cannot serve "
                                                                         "at these GPU counts, e.g. 1,2,4,8")
    llama_cpp: bool = Field(False, description="refuse a cut llama.cpp cannot load")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source_of_scores(self):
        check_scores_source(self)
        return self

    @property
    def targets(self) -> SlimTargets:
        return SlimTargets(self.expert_intermediate_size, self.num_key_value_heads, self.shared_expert_intermediate_size)


def check_scores_source(cfg: "SlimConfig") -> None:
    """Scores come from calibration data, from a file, or from the weights (neither): never two."""
    if cfg.scores is not None and cfg.data is not None:
        raise ValueError("scores and data are two sources for the same scores: give --scores (cut with saved "
                         "scores) or --data (score on calibration data), not both")


class StageConfig(TaskConfig):

    # The stage's node name in a workflow (default stage_<i>); names its log lines. Not part of its key.
    name: Optional[str] = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    # Targets of the cut. `distill_only` skips scoring and slimming: the model keeps every size and is
    # only distilled (a trimmed, quantized or otherwise compressed model, given the same budget).
    expert_intermediate_size: Optional[int] = Field(default=None, gt=0)
    distill_only: bool = False
    num_key_value_heads: Optional[int] = Field(default=None, gt=0)
    shared_expert_intermediate_size: Optional[int] = Field(default=None, gt=0)
    # Routed experts kept per MoE layer (None: all); the router's rows go with their experts, top-k stays.
    num_experts: Optional[int] = Field(default=None, gt=0)
    # How the experts a cut drops are ranked, from the calibration pass that gives the Taylor scores:
    # "taylor" sums the expert's neuron scores, "frequency" is the routing weight it received (trimming's
    # frequency score), "reconstruction" the norm of its weighted output (trimming's reconstruction score).
    # "frequency" is the default because it cut best: benchmarks/expert_ranking.py (half the experts of a
    # trained 8-expert PhiMoE, alone and with half the width) gave the lowest held-out KL in every seed.
    expert_score: Literal["taylor", "frequency", "reconstruction"] = "frequency"
    # Scoring. "auto" scores with the next-token loss while the student still is the teacher (there the
    # KD loss and its gradient are exactly zero, so KD scores would be noise and the cut random) and
    # with the KD loss after.
    calibration_batches: int = Field(default=8, gt=0)
    score_loss: Literal["auto", "next_token", "kd"] = "auto"
    # Distillation budget and optimisation.
    token_budget: int = Field(gt=0)
    micro_batch: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0, description="0 turns clipping off")
    temperature: float = Field(default=1.0, gt=0)
    next_token_weight: float = Field(default=0.5, ge=0)
    mask_document_boundaries: bool = True
    budget_overflow: Literal["wrap", "refuse"] = "wrap"
    # Schedule options, each measured by benchmarks/schedule_study.py and off by default.
    # Carry the optimizer across a cut: start from the input stage's AdamW moments, sliced with the
    # weights they belong to, and its step counts, with no second warm-up. The stage before must keep
    # its moments (`keep_optimizer_state`, which a workflow sets on it by itself).
    carry_optimizer: bool = False
    keep_optimizer_state: bool = False
    # Adaptive length: every `early_stop_window_tokens` the held-out KL (the last `early_stop_rows` rows
    # of the validation logit cache) is measured; once `early_stop_min_tokens` have been trained on, a
    # window that lowered it by less than this fraction of the best earlier check ends the stage, and
    # the next stage gets the unspent tokens.
    early_stop_min_improvement: Optional[float] = Field(default=None, gt=0, lt=1)
    early_stop_window_tokens: Optional[int] = Field(default=None, gt=0)
    early_stop_min_tokens: Optional[int] = Field(default=None, gt=0)
    early_stop_rows: int = Field(default=64, gt=0)
    # The validation rows a workflow's evaluate nodes score from the split's start (its evaluate.max_rows,
    # "all" for every row; None: nothing evaluated), which the held-out rows must not reach
    # (`adaptive.heldout_overlap`). Filled by the workflow; not in the node key.
    evaluated_rows: Optional[int | Literal["all"]] = None
    # A gradual cut: reach the targets in this many equal cuts spread evenly over the stage's steps,
    # each re-scored on the model as it is then (1: the single cut at the start).
    cut_steps: int = Field(default=1, ge=1)
    # Bookkeeping.
    checkpoint_interval: int = Field(default=50, gt=0)
    log_interval: int = Field(default=10, gt=0)
    # Where each logging step's metrics go (a workflow's `tracking:` section fills it); not in the node key.
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    seed: int = 0
    # Execution.
    # "auto": fsdp for a GPU stage (see `strategy_for`), ddp on CPU (small models, the demo). Resolved at
    # parse time, so the node's key and the workers see the concrete strategy.
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp"] = "auto"
    zero_stage: Literal[1, 2] = 2
    # fsdp only: recompute each decoder layer's activations in backward instead of keeping them.
    activation_checkpointing: bool = False
    # fsdp only: the ranks one copy of the model is sharded over; the groups replicate each other
    # (HSDP). None: the GPUs of one node on GPUs (reduce-scatter over NVLink every micro-batch, one
    # all-reduce between nodes per step), every rank on CPU. Equal to num_workers: full sharding.
    shard_group_size: Optional[int] = Field(default=None, gt=0)
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float = Field(default=1, gt=0, description="with use_gpu; a fraction packs workers on one GPU")
    cpus_per_worker: float = Field(default=1, gt=0)
    max_failures: int = Field(default=2, ge=0)
    # None: the device's kernel (`experts_kernel_on`).
    experts_implementation: Optional[Literal["eager", "grouped_mm", "batched_mm"]] = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _targets_or_distill_only(self):
        cut = [f for f in ("expert_intermediate_size", "num_key_value_heads", "shared_expert_intermediate_size",
                           "num_experts") if getattr(self, f) is not None]
        if self.distill_only and cut:
            raise ValueError(f"distill_only: true keeps every size; remove {', '.join(cut)} or set distill_only: false")
        if not self.distill_only and self.expert_intermediate_size is None:
            raise ValueError("expert_intermediate_size is required (the stage's target); "
                             "or set distill_only: true to distill without slimming")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_zero3(cls, data):
        # Our loop builds the whole model on every rank before DeepSpeed sees it, so ZeRO-3 would
        # shard nothing that matters; FSDP2 never materialises the full model.
        if isinstance(data, dict) and data.get("zero_stage") == 3:
            raise ValueError("zero_stage: 3 (DeepSpeed ZeRO-3) is not supported: the model would be fully loaded on every rank before "
                             "DeepSpeed partitions it. Use strategy: fsdp (sharded loading, scoring and training), "
                             "or zero_stage: 2")
        return data

    @staticmethod
    def strategy_for(strategy: str, use_gpu: bool, num_workers: int, ddp_only: bool = False) -> str:
        """The concrete strategy of `strategy` on `num_workers` workers with or without GPUs. `auto` is fsdp
        on GPUs: with several workers it is the only strategy that shards a model that does not fit one
        device, and with one it still computes in bf16 over float32 master weights (FSDP2's mixed
        precision), where ddp's autocast over float32 weights cannot use the grouped experts kernel. A
        single GPU worker that asks for a ddp-only option (`ddp_only`) gets ddp. On CPU: ddp."""
        if strategy != "auto":
            return strategy
        if use_gpu and (num_workers > 1 or not ddp_only):
            return "fsdp"
        return "ddp"

    def _ddp_only_options(self) -> list[str]:
        """The options set here that rebuild or hand over the whole model and its optimizer on every rank."""
        return [name for name, on in (("carry_optimizer", self.carry_optimizer),
                                      ("keep_optimizer_state", self.keep_optimizer_state),
                                      ("cut_steps", self.cut_steps > 1)) if on]

    def resolved_strategy(self) -> str:
        return self.strategy_for(self.strategy, self.use_gpu, self.num_workers, bool(self._ddp_only_options()))

    def shard_group(self, workers_per_node: int) -> int:
        """The ranks one copy of the model is sharded over (1 outside fsdp, where nothing is sharded).
        `workers_per_node`: the plan's GPUs per node, or the workers Ray Train put on the worker's node."""
        if self.resolved_strategy() != "fsdp":
            return 1
        if self.shard_group_size is not None:
            return self.shard_group_size
        if not self.use_gpu:
            return self.world()
        return math.gcd(self.world(), max(1, workers_per_node))  # whole nodes, dividing the world

    def replica_groups(self, workers_per_node: int) -> int:
        """The copies of the model the world holds (HSDP's replicate dimension); 1 under full sharding."""
        return self.world() // max(1, self.shard_group(workers_per_node)) if self.resolved_strategy() == "fsdp" else 1

    def experts_weights_16bit(self) -> bool:
        """Whether the expert weights are 16-bit while they compute: on GPU under fsdp (bf16 parameters) and
        deepspeed (a bf16 module); not under ddp (autocast over float32 weights), nor on CPU."""
        return self.use_gpu and self.resolved_strategy() in ("fsdp", "deepspeed")

    def experts_kernel(self, on_gpu: bool, capability: Optional[tuple[int, int]]) -> str:
        """The experts kernel the stage's models run with: the configured one, else the device's
        (`core.kernels.experts_kernel`); "auto" for a GPU whose capability is not known yet (the plan
        without --gpu: each worker decides on its own GPU)."""
        from slimmoe.tasks.core.kernels import experts_kernel

        if on_gpu and capability is None and self.experts_implementation is None:
            return "auto"
        return experts_kernel(self.experts_implementation, on_gpu, capability, self.experts_weights_16bit())

    def experts_kernel_on(self, device) -> str:
        """`experts_kernel` on a worker's torch device."""
        from slimmoe.tasks.core.kernels import device_capability

        return self.experts_kernel(device.type == "cuda", device_capability(device))

    def train_dtype(self) -> str:
        """The dtype the stage computes in and cuts for (expert rows must align in it)."""
        return compute_dtype(self.use_gpu)

    def world(self) -> int:
        """Ranks of the stage's Ray Train job."""
        return self.num_workers

    def batches_per_epoch(self, cache_rows: int) -> int:
        """The micro-batches of every rank one pass over a logit cache of `cache_rows` rows gives."""
        return cache_rows // (self.micro_batch * self.world())

    def tokens_per_step(self, seq_len: int) -> int:
        return self.micro_batch * self.grad_accum * self.world() * seq_len

    def derived_fields(self) -> dict:
        # Resolved at parse time, so the node's key and the workers see the concrete values.
        out = {}
        if self.strategy == "auto":
            out["strategy"] = self.resolved_strategy()
        if self.early_stop_min_improvement is not None:
            window = self.early_stop_window_tokens or max(1, self.token_budget // 8)
            if self.early_stop_window_tokens is None:
                out["early_stop_window_tokens"] = window
            if self.early_stop_min_tokens is None:
                # Past the freshly cut student's warm-up bump: a quarter of the budget, and at least a window.
                out["early_stop_min_tokens"] = max(window, self.token_budget // 4)
        return out

    @model_validator(mode="after")
    def _strategy_rules(self):
        strategy = self.resolved_strategy()
        if self.activation_checkpointing and strategy != "fsdp":
            raise ValueError(f"activation_checkpointing: true needs strategy: fsdp (this stage uses {strategy})")
        if self.shard_group_size is not None:
            if strategy != "fsdp":
                raise ValueError(f"shard_group_size needs strategy: fsdp (this stage uses {strategy}); remove "
                                 "shard_group_size")
            if self.num_workers % self.shard_group_size:
                divisors = [d for d in range(1, self.num_workers + 1) if self.num_workers % d == 0]
                raise ValueError(f"shard_group_size: {self.shard_group_size} does not divide num_workers: "
                                 f"{self.num_workers} (the groups replicate each other, so they must be equal); use "
                                 f"one of {divisors}")
        for name in self._ddp_only_options():
            if strategy != "ddp":
                raise ValueError(f"{name} needs strategy: ddp (this stage uses {strategy}); remove {name}")
        if self.use_gpu and self.experts_implementation == "grouped_mm" and not self.experts_weights_16bit():
            raise ValueError(f"experts_implementation: grouped_mm with strategy: {strategy} on GPU computes the experts "
                             "one at a time in float32 (grouped_mm is not autocast-aware and ddp keeps float32 "
                             "weights); remove experts_implementation (eager is chosen), or use strategy: fsdp")
        return self

    @model_validator(mode="after")
    def _schedule_options(self):
        if self.cut_steps > 1 and self.distill_only:
            raise ValueError("cut_steps > 1 cuts in steps, distill_only: true does not cut; remove one")
        if self.cut_steps > 1 and self.early_stop_min_improvement is not None:
            raise ValueError("early_stop_min_improvement with cut_steps > 1: every inner cut raises the held-out KL "
                             "the early stop compares against; use one of them per stage")
        for name in ("early_stop_window_tokens", "early_stop_min_tokens"):
            if getattr(self, name) is not None and self.early_stop_min_improvement is None:
                raise ValueError(f"{name} is set but early_stop_min_improvement is not; set "
                                 f"early_stop_min_improvement (e.g. 0.02) or remove {name}")
        # A check happens only before a step inside the stage, so a window as long as the budget never gets
        # the second check a decision needs and the stage always runs its full budget. A 1-token budget is
        # a single step: no window fits it, and the default it derives (1) is no one's mistake.
        if self.early_stop_window_tokens is not None and self.early_stop_window_tokens >= self.token_budget > 1:
            raise ValueError(f"early_stop_window_tokens={self.early_stop_window_tokens} is not smaller than token_budget="
                             f"{self.token_budget}, so the early stop can never fire; lower early_stop_window_tokens to "
                             f"a fraction of the budget (e.g. {max(1, self.token_budget // 8)}) or remove it for the "
                             "default of token_budget / 8")
        if self.early_stop_min_tokens is not None and self.early_stop_min_tokens >= self.token_budget > 1:
            raise ValueError(f"early_stop_min_tokens={self.early_stop_min_tokens} is not smaller than token_budget="
                             f"{self.token_budget}, so the early stop can never fire; lower early_stop_min_tokens "
                             f"(e.g. {max(1, self.token_budget // 4)}) or remove it for the default of a quarter of "
                             "the budget")
        return self

    @property
    def targets(self) -> SlimTargets:
        return SlimTargets(self.expert_intermediate_size, self.num_key_value_heads, self.shared_expert_intermediate_size,
                           self.num_experts)

    def scored_experts(self) -> Optional[str]:
        """The expert ranking the calibration pass must collect: `expert_score` when the stage drops
        experts, else None (a cut that keeps every expert scores exactly as before)."""
        return self.expert_score if self.num_experts is not None else None


def check_score_loss(cfg: "StageConfig", cuts_the_teacher: bool) -> None:
    """A stage that cuts the teacher itself must not score with the pure KD loss: there the student
    equals the teacher, so the loss and its gradient are exactly zero and every score is 0 (the cut
    would be arbitrary)."""
    if cuts_the_teacher and cfg.score_loss == "kd" and cfg.next_token_weight == 0 and not cfg.distill_only:
        raise ValueError("score_loss: kd with next_token_weight: 0 scores the teacher's own cut with a loss that is "
                         "exactly zero there (the student is the teacher), so every score would be 0; use score_loss: "
                         "auto (next-token scores while the student is the teacher) or next_token")


@dataclass(frozen=True)
class StageSteps:
    """A stage's optimizer steps for its token budget (recorded in its metrics.json as "steps")."""

    total_steps: int
    tokens_per_step: int
    planned_tokens: int
    batches_per_epoch: int
    epochs: float  # how often the stage reads its logit cache through (above 1: it wraps around)
    seq_len: int
    configured_token_budget: int  # the budget as written, before any inherited tokens
    inherited_tokens: int = 0  # what the stage before left unspent by ending early


def stage_steps(cfg: StageConfig, seq_len: int, batches_per_epoch: int, inherited_tokens: int = 0) -> StageSteps:
    """Optimizer steps for the token budget, and whether the cache must wrap around to supply them.
    `inherited_tokens` is the part of `cfg.token_budget` the stage before left unspent."""
    tokens_per_step = cfg.tokens_per_step(seq_len)
    total_steps = max(1, math.ceil(cfg.token_budget / tokens_per_step))
    micro_batches = total_steps * cfg.grad_accum
    if batches_per_epoch <= 0:
        raise ValueError(
            f"the logit cache holds fewer than micro_batch={cfg.micro_batch} x num_workers={cfg.num_workers} rows; "
            "lower micro_batch or cache more data"
        )
    epochs = micro_batches / batches_per_epoch
    if epochs > 1:
        cache_tokens = batches_per_epoch * cfg.micro_batch * cfg.num_workers * seq_len
        msg = (f"token_budget={cfg.token_budget} is {epochs:.2f}x what the logit cache holds ({cache_tokens} usable tokens)")
        if cfg.budget_overflow == "refuse":
            raise ValueError(msg + "; lower token_budget, cache more data, or set budget_overflow: wrap")
        warnings.warn(msg + "; wrapping around the cache (budget_overflow: wrap)", stacklevel=2)
    return StageSteps(total_steps=total_steps, tokens_per_step=tokens_per_step, planned_tokens=total_steps * tokens_per_step,
                      batches_per_epoch=batches_per_epoch, epochs=round(epochs, 4), seq_len=seq_len,
                      configured_token_budget=cfg.token_budget - inherited_tokens, inherited_tokens=inherited_tokens)


def cache_rows_problem(cfg: StageConfig, seq_len: int, cache_rows: int) -> str | None:
    """What a stage's run refuses of a train logit cache of `cache_rows` rows (`stage_steps`), or None:
    validation asks it of a finished cache, the plan of each fix it proposes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wrapping around the cache is allowed; the stage says so when it runs
        try:
            stage_steps(cfg, seq_len, cfg.batches_per_epoch(cache_rows))
        except ValueError as err:
            return f"the train logit cache holds {cache_rows} rows: {err}"
    return None


@dataclass(frozen=True)
class Cut:
    """One cut of a stage: the targets reached at an optimizer step."""

    step: int
    targets: SlimTargets


def gradual_cuts(cfg: StageConfig, sizes: ModelSizes, total_steps: int, dtype: str = "float32") -> list[Cut]:
    """The cuts of a stage, one at step 0 when `cut_steps` is 1, else `cut_steps`
    cuts spread evenly over the steps, each taking an equal share of the way from the input's sizes to
    the targets (expert sizes kept on the fused kernel's row alignment, KV groups rounded up)."""
    k = cfg.cut_steps
    if k == 1:
        return [Cut(0, cfg.targets)]
    if total_steps < k:
        raise ValueError(f"cut_steps={k} needs at least {k} optimizer steps; this stage plans {total_steps}: "
                         "lower cut_steps or raise token_budget")
    align = ROW_ALIGN_BYTES // DTYPE_BYTES[dtype]

    def widths(start: Optional[int], end: Optional[int], field: str, round_up_to: int) -> list[Optional[int]]:
        if end is None or start is None:
            return [end] * k
        out = []
        for j in range(1, k + 1):
            raw = start - (start - end) * j / k
            out.append(max(end, math.ceil(raw / round_up_to) * round_up_to) if j < k else end)
        if field == "expert_intermediate_size" and any(b >= a for a, b in zip([start, *out], out)):
            raise ValueError(f"cut_steps={k} cannot take {field} from {start} to {end} in strictly smaller steps of "
                             f"multiples of {round_up_to}; choose cut_steps of at most {max(1, (start - end) // round_up_to)}")
        return out

    experts = widths(sizes.expert_intermediate_size, cfg.expert_intermediate_size, "expert_intermediate_size", align)
    kv = widths(sizes.num_key_value_heads, cfg.num_key_value_heads, "num_key_value_heads", 1)
    shared = widths(sizes.shared_expert_intermediate_size, cfg.shared_expert_intermediate_size,
                    "shared_expert_intermediate_size", align)
    # Expert counts stay multiples of the routing groups, so every inner cut keeps each group even.
    counts = widths(sizes.num_experts, cfg.num_experts, "num_experts", sizes.expert_groups)
    return [Cut(round(j * total_steps / k), SlimTargets(experts[j], kv[j], shared[j], counts[j])) for j in range(k)]
