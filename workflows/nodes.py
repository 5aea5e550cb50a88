"""The registry of node kinds: what a DAG node of each kind runs, and how its config is checked.

The SlimMoE kinds call the task entry points in `slimmoe.tasks.*`, imported when a node runs or is
validated (never at import time, so the driver loads fast and a missing task is reported per node).
Plugins (a module or a .py file named under `plugins:` in a workflow config, or in the environment
variable SLIMMOE_PLUGINS) may register more kinds with `register_node_kind`; a config's `kinds:`
section maps a role (stage, tokenize, ...) to any registered kind.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel


@dataclass
class NodeContext:
    """What a node's run function gets."""

    name: str
    kind: str
    config: Any  # the task config object (a pydantic model), or a dict for kinds without a config class
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
    # Bump when the kind's output changes meaning: every node of the kind (and all after) recomputes.
    version: int
    run: Callable[[NodeContext], Optional[dict]]
    # The task's pydantic config class, or a zero-argument function importing it lazily; None: a dict.
    config_class: Any = None
    uses_ray: bool = True  # the driver connects to Ray before running it
    uses_work_dir: bool = False
    # Config fields that do not change the output (placement, logging): left out of the node key.
    key_ignore: frozenset = field(default_factory=frozenset)
    headline: tuple = ()  # metric names, the first present is the headline shown per node
    description: str = ""
    # Workflow-YAML names for task config fields ({"source": "data"}: `data: {source: ...}` in the YAML
    # fills TokenizeConfig.data), applied when the task config declares the target and not the alias;
    # also to workflow-wide values (resources.actor_pool_size -> TeacherLogitsConfig.num_actors).
    field_aliases: dict = field(default_factory=dict)

    def resolve_config_class(self) -> Optional[type[BaseModel]]:
        """The config class; raises ImportError if the task module cannot be imported."""
        c = self.config_class
        if c is None or isinstance(c, type):
            return c
        return c()


_REGISTRY: dict[str, NodeKind] = {}


def register_node_kind(kind: NodeKind, replace: bool = False) -> NodeKind:
    if kind.name in _REGISTRY and not replace and _REGISTRY[kind.name] is not kind:
        raise ValueError(f"node kind {kind.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[kind.name] = kind
    return kind


def unregister_node_kind(name: str) -> None:
    _REGISTRY.pop(name, None)


def known_kinds() -> dict[str, NodeKind]:
    return dict(_REGISTRY)


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
# The SlimMoE kinds. Each imports its task module when called.


def _lazy(module: str, attr: str) -> Callable[[], type]:
    def load():
        return getattr(importlib.import_module(module), attr)

    load.__qualname__ = f"lazy({module}.{attr})"
    return load


def _task(module: str, fn: str):
    return getattr(importlib.import_module(module), fn)


def _run_pretrain_teacher(ctx: NodeContext):
    return _task("slimmoe.tasks.pretrain_teacher", "run_pretrain_teacher")(ctx.config, ctx.out_dir)


def _run_tokenize(ctx: NodeContext):
    return _task("slimmoe.tasks.tokenize_data", "run_tokenize")(ctx.config, ctx.inputs["tokenizer"], ctx.out_dir)


def _run_teacher_logits(ctx: NodeContext):
    return _task("slimmoe.tasks.teacher_logits", "run_teacher_logits")(
        ctx.config, ctx.inputs["teacher"], ctx.inputs["tokens"], ctx.out_dir)


def _run_stage(ctx: NodeContext):
    fn = _task("slimmoe.tasks.stage", "run_stage")
    extra = {"name": ctx.name} if "name" in inspect.signature(fn).parameters else {}  # for its log lines
    return fn(ctx.config, ctx.inputs["model"], ctx.inputs["logits"], ctx.out_dir, ctx.work_dir,
              teacher_fingerprint=ctx.teacher_fingerprint, **extra)


def _run_evaluate(ctx: NodeContext):
    return _task("slimmoe.tasks.evaluate", "run_evaluate")(
        ctx.config, ctx.inputs["model"], ctx.inputs["tokens"], ctx.inputs.get("logits"), ctx.out_dir)


def _run_trim(ctx: NodeContext):
    return _task("slimmoe.tasks.trim", "run_trim")(ctx.config, ctx.inputs["model"], ctx.inputs["data"], ctx.out_dir)


def _run_quantize(ctx: NodeContext):
    return _task("slimmoe.tasks.quantize", "run_quantize")(ctx.config, ctx.inputs["model"], ctx.inputs["data"], ctx.out_dir)


_PLACEMENT = frozenset({"actor_pool_size", "num_actors", "log_every", "progress"})

for _k in (
    NodeKind("pretrain_teacher", 1, _run_pretrain_teacher, _lazy("slimmoe.tasks.pretrain_teacher", "PretrainTeacherConfig"),
             uses_ray=False, key_ignore=frozenset({"log_every", "eval_every"}),
             headline=("validation_perplexity",), description="train the demo teacher"),
    NodeKind("tokenize", 1, _run_tokenize, _lazy("slimmoe.tasks.tokenize_data", "TokenizeConfig"),
             key_ignore=_PLACEMENT | {"num_workers", "cpus_per_worker", "tokenize_workers", "docs_per_batch",
                                      "rows_per_file"},
             headline=("train_tokens", "tokens"), field_aliases={"source": "data"},
             description="text -> token shards"),
    NodeKind("teacher_logits", 1, _run_teacher_logits, _lazy("slimmoe.tasks.teacher_logits", "TeacherLogitsConfig"),
             key_ignore=_PLACEMENT | {"cpus_per_actor", "torch_threads", "memory_per_actor_gb", "rows_per_file",
                                      "wait_for_actors_s", "batch_size"},
             headline=("tokens", "rows"), field_aliases={"actor_pool_size": "num_actors"},
             description="the teacher's top-k log-probs per token"),
    NodeKind("stage", 1, _run_stage, _lazy("slimmoe.tasks.stage", "StageConfig"), uses_work_dir=True,
             key_ignore=frozenset({"checkpoint_interval", "log_interval", "log_every", "num_to_keep", "max_failures",
                                   "cpus_per_worker", "gpus_per_worker"}),
             headline=("final_kl", "final_loss", "validation_perplexity", "perplexity"),
             description="score, slim, distill (Ray Train)"),
    NodeKind("evaluate", 1, _run_evaluate, _lazy("slimmoe.tasks.evaluate", "EvaluateConfig"),
             key_ignore=frozenset({"throughput_warmup", "throughput_repeats"}),
             headline=("perplexity", "kl_to_teacher"), description="perplexity, KL, parameters, speed"),
    NodeKind("trim", 1, _run_trim, _lazy("slimmoe.tasks.trim", "TrimConfig"),
             headline=("perplexity", "total_params"), description="expert / layer / block drop"),
    NodeKind("quantize", 1, _run_quantize, _lazy("slimmoe.tasks.quantize", "QuantizeConfig"),
             headline=("avg_bits_experts", "perplexity"), description="MC-MoE mixed-precision quantization"),
):
    register_node_kind(_k)
