"""The registry of node kinds: what a DAG node of each kind runs, which config class it takes, and
which of its fields leave its key alone.

The SlimMoE kinds call the task entry points in `slimmoe.tasks.nodes.*`, imported when a node runs
(not at import time, so `status` stays fast). Tests replace a kind by registering a stand-in under
the same name with `register_node_kind(..., replace=True)`; nothing in a workflow config can load code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from slimmoe.tasks.data.config import TeacherLogitsConfig, TokenizeConfig
from slimmoe.tasks.evaluation.config import EvaluateConfig
from slimmoe.tasks.mcmoe.config import QuantizeConfig
from slimmoe.tasks.pretraining.config import PretrainTeacherConfig
from slimmoe.tasks.slimming.config import StageConfig
from slimmoe.tasks.trimming.config import TrimConfig


@dataclass
class NodeContext:
    """What a node's run function gets."""

    name: str
    kind: str
    config: Any  # the task config object, exactly as the workflow config parsed it
    inputs: dict[str, str]  # role -> local path
    out_dir: Path  # fresh and empty; the driver marks it complete after `run` returns
    # A local directory, stable across attempts of the same key (resumable state, e.g. Ray Train
    # checkpoints): for kinds with uses_work_dir. A forced rerun gets a fresh one.
    work_dir: Optional[str] = None
    teacher_fingerprint: Optional[str] = None
    resumed: bool = False  # an earlier attempt of this key was interrupted or failed
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class NodeKind:
    name: str
    # Bump when the kind's output changes meaning or its key's representation changes: every node of
    # the kind (and all after it) then recomputes.
    version: int
    run: Callable[[NodeContext], Optional[dict]]
    config_class: type
    uses_ray: bool = True  # the driver connects to Ray before running it
    uses_work_dir: bool = False
    # Config fields that do not change the output (placement, logging): left out of the node key.
    key_ignore: frozenset = field(default_factory=frozenset)
    headline: tuple = ()  # metric names, the first present is the headline shown per node
    description: str = ""


_REGISTRY: dict[str, NodeKind] = {}


def register_node_kind(kind: NodeKind, replace: bool = False) -> NodeKind:
    if kind.name in _REGISTRY and not replace and _REGISTRY[kind.name] is not kind:
        raise ValueError(f"node kind {kind.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[kind.name] = kind
    return kind


def get_node_kind(name: str) -> NodeKind:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown node kind {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def headline_of(kind_name: str, metrics: dict | None) -> str:
    """'name=value' for the kind's headline metric (or the first numeric one)."""
    if not metrics:
        return ""
    kind = _REGISTRY.get(kind_name)
    names = list(kind.headline if kind else ()) + [k for k, v in metrics.items() if isinstance(v, (int, float))
                                                      and not isinstance(v, bool)]
    for n in names:
        v = metrics.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}"
    return ""


# ---------------------------------------------------------------------------------------------
# The SlimMoE kinds. Each imports its node module when it runs.


def _node(module: str, fn: str):
    return getattr(importlib.import_module(f"slimmoe.tasks.nodes.{module}"), fn)


def _run_pretrain_teacher(ctx: NodeContext):
    return _node("pretrain_teacher", "run_pretrain_teacher")(ctx.config, ctx.out_dir)


def _run_tokenize(ctx: NodeContext):
    return _node("tokenize", "run_tokenize")(ctx.config, ctx.inputs["tokenizer"], ctx.out_dir)


def _run_teacher_logits(ctx: NodeContext):
    return _node("teacher_logits", "run_teacher_logits")(ctx.config, ctx.inputs["teacher"], ctx.inputs["tokens"],
                                                         ctx.out_dir)


def _run_stage(ctx: NodeContext):
    return _node("stage", "run_stage")(ctx.config, ctx.inputs["model"], ctx.inputs["logits"], ctx.out_dir,
                                       ctx.work_dir, teacher_fingerprint=ctx.teacher_fingerprint, name=ctx.name)


def _run_evaluate(ctx: NodeContext):
    return _node("evaluate", "run_evaluate")(ctx.config, ctx.inputs["model"], ctx.inputs["tokens"],
                                             ctx.inputs.get("logits"), ctx.out_dir,
                                             teacher_fingerprint=ctx.teacher_fingerprint)


def _run_trim(ctx: NodeContext):
    return _node("trim", "run_trim")(ctx.config, ctx.inputs["model"], ctx.inputs["data"], ctx.out_dir)


def _run_quantize(ctx: NodeContext):
    return _node("quantize", "run_quantize")(ctx.config, ctx.inputs["model"], ctx.inputs["data"], ctx.out_dir)


# Versions: 2 for the kinds whose config fields were renamed (their keys changed).
for _k in (
    NodeKind("pretrain_teacher", 2, _run_pretrain_teacher, PretrainTeacherConfig, uses_ray=False,
             key_ignore=frozenset({"log_every", "eval_every"}),
             headline=("validation_perplexity",), description="train the demo teacher"),
    NodeKind("tokenize", 2, _run_tokenize, TokenizeConfig,
             key_ignore=frozenset({"tokenize_workers", "docs_per_batch", "rows_per_file"}),
             headline=("train_tokens", "tokens"), description="text -> token shards"),
    NodeKind("teacher_logits", 2, _run_teacher_logits, TeacherLogitsConfig,
             key_ignore=frozenset({"actor_pool_size", "cpus_per_actor", "torch_threads", "memory_per_actor_gb",
                                   "rows_per_file", "wait_for_actors_s", "batch_size", "gpus_per_actor",
                                   "gpu_memory_gb", "pipeline_depth"}),
             headline=("tokens", "rows"), description="the teacher's top-k log-probs per token"),
    # 2: metrics.json is a versioned StageMetrics (the step record under "steps"); an fsdp stage's
    # final model that fits one file is model.safetensors.
    NodeKind("stage", 2, _run_stage, StageConfig, uses_work_dir=True,
             key_ignore=frozenset({"checkpoint_interval", "log_interval", "max_failures", "cpus_per_worker",
                                   "gpus_per_worker", "tracking", "evaluated_rows"}),
             headline=("final_kl", "final_loss", "validation_perplexity", "perplexity"),
             description="score, slim, distill (Ray Train)"),
    NodeKind("evaluate", 1, _run_evaluate, EvaluateConfig,
             key_ignore=frozenset({"throughput_warmup", "throughput_repeats"}),
             headline=("perplexity", "kl_to_teacher"), description="perplexity, KL, parameters, speed"),
    NodeKind("trim", 1, _run_trim, TrimConfig,
             headline=("perplexity", "total_params"), description="expert / layer / block drop"),
    NodeKind("quantize", 1, _run_quantize, QuantizeConfig,
             headline=("avg_bits_experts", "perplexity"), description="MC-MoE mixed-precision quantization"),
):
    register_node_kind(_k)
