"""`slimmoe plan`: what every node of a workflow needs (memory per device, FLOPs, communication, time,
GPU-hours, the logit cache on disk) and whether it fits, from the workflow and the teacher's
config.json only.

Time is compute at a kernel efficiency (`--mfu`: the share of the peak the kernels reach) plus the
communication the compute does not hide (`tasks/planning/comm.py`); the effective MFU is what is left
of the peak after both. A node whose exposed communication exceeds its compute is named as bound by
communication, with the setting that helps.

The arithmetic is `slimmoe.tasks.planning`; this module walks a DAG's nodes, derives each model's
config from the one before it (the slimmed config of a stage, the trimmed config of a trim), picks
each node's device, dtype and memory, and says what to change for a node that does not fit.
`slimmoe run` and `slimmoe submit` call `plan_problems` while validating, before any node starts.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import ValidationError

from slimmoe.tasks.core.dtypes import dtype_bytes
from slimmoe.tasks.core.kernels import GPU_CAPABILITY
from slimmoe.tasks.data.config import PassFacts
from slimmoe.tasks.planning import comm as C
from slimmoe.tasks.planning import flops as F
from slimmoe.tasks.planning.cache import cache_bytes, cache_bytes_per_token
from slimmoe.tasks.planning.disk import stage_disk
from slimmoe.tasks.planning.memory import (GB, Memory, ModelShape, as_model_config, evaluate_memory, model_shape,
                                           stage_score_memory, stage_train_memory, teacher_actor_gpus,
                                           teacher_pass_memory)

from .config import LoadedWorkflow, Problem

# GPUs of one node a teacher actor may be split over (the p4d / DGX shape).
GPUS_PER_NODE = 8
# CPU estimates carry about +-30% (the python heap, glibc arenas, page cache of mapped files): a CPU
# node is refused only when it needs clearly more than the machine has.
CPU_REFUSE_FACTOR = 1.25
# A GPU node past this share of its memory fits, with a warning.
TIGHT = 0.95


class PlanError(ValueError):
    """A workflow that cannot be planned as given (no GPU memory for a GPU workflow, no teacher config)."""


@dataclass
class PlanOptions:
    gpu_memory_gb: Optional[float] = None  # overrides resources.gpu_memory_gb
    gpu: Optional[str] = None  # a100 | h100 | h200, for the peak
    peak_tflops: Optional[float] = None
    mfu: float = F.DEFAULT_MFU  # the kernels' share of the peak; communication comes on top
    intra_node_gb_per_s: Optional[float] = None  # NCCL bus bandwidth per GPU inside a node (default: --gpu's)
    inter_node_gb_per_s: Optional[float] = None  # one node's network adapters together (default: --gpu's)
    cpu_memory_gb: Optional[float] = None  # default: this machine's RAM, for CPU workflows
    data_tokens: Optional[int] = None  # tokens the data holds; default: what the largest budget needs
    require_gpu_memory: bool = True  # `slimmoe plan` needs it; run / submit check what they can


@dataclass
class NodePlan:
    name: str
    kind: str
    device: str  # gpu | cpu | "" (not modelled)
    devices: float = 0  # GPUs (or CPU worker processes) the node occupies
    params_before: Optional[dict] = None
    params_after: Optional[dict] = None
    memory: Optional[Memory] = None  # the peak per device
    phases: dict = field(default_factory=dict)  # phase -> Memory
    capacity: Optional[int] = None  # bytes per device it is checked against
    fits: Optional[bool] = None  # None: not checked (unknown capacity, or not modelled)
    tokens: int = 0
    flops: float = 0.0  # what the devices compute, recomputation included
    model_flops: float = 0.0  # the model's own (no activation recomputation): what MFU counts
    seconds: Optional[float] = None
    device_hours: Optional[float] = None
    cache_bytes: Optional[int] = None
    disk_bytes: Optional[int] = None  # a stage's checkpoints, work-dir models and output (planning/disk.py)
    fix: Optional[str] = None
    problem_loc: tuple = ()
    notes: list = field(default_factory=list)
    # The settings the node derives from its config and the device (the same config methods decide
    # them in the node): device, dtype, strategy, GPUs per actor, ...
    settings: dict = field(default_factory=dict)
    # phase -> comm.PhaseTime: the units each rank runs, their compute, bytes and exposed communication
    comm: dict = field(default_factory=dict)
    peak_tflops: Optional[float] = None  # of its devices, for the effective MFU (GPU nodes with a time)
    comm_fix: Optional[str] = None  # the setting that helps a node bound by communication
    # The tensor-parallel sizes (of 1, 2, 4, 8, 16) vLLM and SGLang can serve the node's output model at.
    serves_at_tp: Optional[list] = None

    @property
    def effective_mfu(self) -> Optional[float]:
        """The model's FLOPs over what the devices the node holds could do at their peak in its time."""
        if not self.peak_tflops or not self.device_hours:
            return None
        return self.model_flops / (self.device_hours * 3600 * self.peak_tflops * 1e12)

    def _phase_sum(self, attr: str) -> Optional[float]:
        if not self.comm or self.seconds is None:
            return None
        return sum(p.units * getattr(p, attr) for p in self.comm.values())

    @property
    def comm_seconds(self) -> Optional[float]:
        """Seconds the links are busy over the node (hidden or not)."""
        return self._phase_sum("comm_s")

    @property
    def exposed_comm_seconds(self) -> Optional[float]:
        return self._phase_sum("exposed_s")

    @property
    def compute_seconds(self) -> Optional[float]:
        return self._phase_sum("compute_s")

    @property
    def bound_by_communication(self) -> bool:
        exposed, compute = self.exposed_comm_seconds, self.compute_seconds
        return exposed is not None and exposed > compute

    def headline_comm(self):
        """The phase whose bytes stand for the node: a stage's training (per optimizer step), a teacher
        pass's forward (per actor and batch)."""
        for name, phase in self.comm.items():
            if name.startswith("train"):  # a gradual cut's first (largest) student
                return phase
        return self.comm.get("forward") or next(iter(self.comm.values()), None)

    def as_dict(self) -> dict:
        head = self.headline_comm()
        return {"name": self.name, "kind": self.kind, "device": self.device, "devices": self.devices,
                "settings": dict(self.settings),
                "params_before": self.params_before, "params_after": self.params_after,
                "memory": self.memory.as_dict() if self.memory else None,
                "phases": {k: v.as_dict() for k, v in self.phases.items()},
                "capacity_bytes": self.capacity, "fits": self.fits, "tokens": self.tokens, "flops": self.flops,
                "model_flops": self.model_flops, "seconds": self.seconds, "device_hours": self.device_hours,
                "cache_bytes": self.cache_bytes, "disk_bytes": self.disk_bytes,
                "fix": self.fix, "notes": list(self.notes),
                "comm_bytes_intra": head.intra_bytes if head else None,
                "comm_bytes_inter": head.inter_bytes if head else None,
                "comm_bytes_per": f"rank and {head.unit}" if head else None,
                "comm_seconds": self.comm_seconds, "exposed_comm_seconds": self.exposed_comm_seconds,
                "compute_seconds": self.compute_seconds, "effective_mfu": self.effective_mfu,
                "bound_by_communication": self.bound_by_communication, "comm_fix": self.comm_fix,
                "comm": {k: v.as_dict() for k, v in self.comm.items()}, "serves_at_tensor_parallel": self.serves_at_tp}


@dataclass
class Plan:
    workflow: str
    use_gpu: bool
    gpu_memory_bytes: Optional[int]
    cpu_memory_bytes: Optional[int]
    peak_tflops: Optional[float]
    mfu: float
    cluster_gpus: float
    data_tokens: int
    data_tokens_basis: str
    nodes: list
    problems: list = field(default_factory=list)  # (loc, message) of what does not fit
    notes: list = field(default_factory=list)
    links: Optional[C.Links] = None

    @property
    def feasible(self) -> bool:
        return not self.problems

    def totals(self) -> dict:
        timed = [n.seconds for n in self.nodes if n.seconds is not None]
        gpu = [n for n in self.nodes if n.device_hours is not None and n.device == "gpu"]
        hours = sum(n.device_hours for n in gpu)
        exposed = [n.exposed_comm_seconds for n in self.nodes if n.exposed_comm_seconds is not None]
        return {"flops": sum(n.flops for n in self.nodes),
                "seconds": sum(timed) if timed else None,
                "gpu_hours": hours if gpu else None,
                # The GPU nodes' model FLOPs over what their GPU-hours could do at the peak.
                "effective_mfu": (sum(n.model_flops for n in gpu) / (hours * 3600 * self.peak_tflops * 1e12)
                                  if gpu and hours and self.peak_tflops else None),
                "exposed_comm_seconds": sum(exposed) if exposed else None,
                "nodes_bound_by_communication": [n.name for n in self.nodes if n.bound_by_communication],
                "cache_bytes": sum(n.cache_bytes or 0 for n in self.nodes),
                "peak_bytes_per_gpu": max((n.memory.total for n in self.nodes if n.memory and n.device == "gpu"),
                                          default=None),
                "nodes": len(self.nodes),
                "nodes_not_fitting": [n.name for n in self.nodes if n.fits is False]}

    def as_dict(self) -> dict:
        return {"workflow": self.workflow, "use_gpu": self.use_gpu, "gpu_memory_bytes": self.gpu_memory_bytes,
                "cpu_memory_bytes": self.cpu_memory_bytes, "peak_tflops": self.peak_tflops, "mfu": self.mfu,
                "links": ({"intra_node_gb_per_s": self.links.intra_gb_s, "inter_node_gb_per_s": self.links.inter_gb_s}
                          if self.links else None),
                "cluster_gpus": self.cluster_gpus, "data_tokens": self.data_tokens,
                "data_tokens_basis": self.data_tokens_basis, "feasible": self.feasible,
                "verdict": self.verdict(), "totals": self.totals(), "nodes": [n.as_dict() for n in self.nodes],
                "problems": [m for _, m in self.problems], "notes": list(self.notes)}

    def verdict(self) -> str:
        if self.feasible:
            unchecked = [n.name for n in self.nodes if n.memory is not None and n.fits is None]
            return ("feasible: every node fits" if not unchecked else
                    f"feasible: every checked node fits (not checked: {', '.join(unchecked)})")
        bad = [n.name for n in self.nodes if n.fits is False]
        return f"infeasible: {', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not fit"

    def format(self) -> str:
        return format_plan(self)


# ---------------------------------------------------------------------------------------------
# Machines


def local_gpu_memory_bytes() -> Optional[int]:
    """This machine's first GPU's memory, if it has one."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # a broken driver: as good as no GPU for planning
        return None
    return None


def machine_memory_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Model configs along the DAG


def teacher_model_config(loaded: LoadedWorkflow, teacher=None):
    """The teacher's transformers config: its config.json (nothing else is read), or the demo teacher's.
    `teacher` is the DAG's teacher node, whose Hub id `build_dag` may have resolved already."""
    cfg = loaded.config
    if cfg.teacher is not None:
        path = Path(_teacher_dir(loaded, teacher)) / "config.json"
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"teacher.path: {path} does not exist; the plan reads the teacher's config.json (no "
                            "weights): copy it there, or plan on a machine that has the teacher") from None
        except ValueError as err:
            raise PlanError(f"teacher.path: {path} is not valid JSON: {err}") from None
        try:
            return as_model_config(values)
        except (ValueError, KeyError) as err:
            raise PlanError(f"teacher.path: {path}: {err}") from None
    import transformers

    pt = cfg.pretrain_teacher
    return transformers.PhimoeConfig(
        vocab_size=pt.vocab_size, hidden_size=pt.hidden_size, intermediate_size=pt.expert_intermediate_size,
        num_hidden_layers=pt.num_layers, num_attention_heads=pt.num_attention_heads,
        num_key_value_heads=pt.num_key_value_heads, num_local_experts=pt.num_experts,
        num_experts_per_tok=pt.experts_per_token, max_position_embeddings=pt.max_position_embeddings,
        tie_word_embeddings=False)


def _teacher_dir(loaded: LoadedWorkflow, teacher) -> str:
    """The external teacher's directory: the snapshot `build_dag` resolved and downloaded, else (a plan
    built without the environment) the Hub id's config.json alone is fetched, never its weights."""
    if teacher is not None and teacher.hub is not None:
        return teacher.external_path
    from slimmoe.tasks.core.hub import HubModelError, resolve_model

    section = loaded.config.teacher
    try:
        # The default Hub cache, not the workflow's cache_dir: the plan runs where the cluster's mounts may not.
        return resolve_model(section.path, section.revision, weights=False).path
    except HubModelError as err:
        raise PlanError(str(loaded.problem(("teacher", err.field), str(err)))) from None


def _trimmed_config(config, trim):
    """The config a trim node produces (which experts or layers go does not change the sizes)."""
    from slimmoe.tasks.core.adapters import get_adapter
    from slimmoe.tasks.trimming.surgery import block_dropped_config, moe_layer_indices

    if trim.scores_only or trim.n == 0:
        return config
    adapter = get_adapter(config)
    if trim.method == "expert-drop":
        new = copy.deepcopy(config)
        setattr(new, adapter.num_experts_key, adapter.num_experts(config) - trim.n)
        return new
    if trim.method == "block-drop":
        return block_dropped_config(config, list(range(trim.n)))
    new = copy.deepcopy(config)  # layer-drop: the first n MoE layers lose their block (same sizes as any n)
    new.intermediate_size = 0
    new.mlp_only_layers = sorted(set(getattr(config, "mlp_only_layers", None) or [])
                                 | set(moe_layer_indices(config)[:trim.n]))
    return new


def _params(shape: ModelShape) -> dict:
    return {"total": shape.total, "active": shape.active}


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class _Context:
    loaded: LoadedWorkflow
    options: PlanOptions
    gpu_bytes: Optional[int]
    cpu_bytes: Optional[int]
    peak: Optional[float]
    cluster_gpus: float
    seq_len: int
    k: int
    data_tokens: int
    configs: dict = field(default_factory=dict)  # node name -> the model config it outputs
    problems: list = field(default_factory=list)
    links: Optional[C.Links] = None
    # Rows of the train logit cache, where known (a finished teacher_logits output, or --data-tokens):
    # a fix the stage would refuse for them is no fix.
    cache_rows: Optional[int] = None

    def capacity(self, on_gpu: bool, share: float = 1.0) -> Optional[int]:
        total = self.gpu_bytes if on_gpu else self.cpu_bytes
        return None if total is None else int(total * share)

    def judge(self, plan: NodePlan) -> None:
        if plan.memory is not None and plan.capacity is None:
            flag = "--cpu-memory-gb" if plan.device == "cpu" else "resources.gpu_memory_gb"
            plan.notes.append(f"needs {_gb(plan.memory.total)} GB per {'GPU' if plan.device == 'gpu' else 'process'}; "
                              f"not checked (set {flag})")
        if plan.memory is None or plan.capacity is None:
            return
        need = plan.memory.total
        limit = plan.capacity * (1 if plan.device == "gpu" else CPU_REFUSE_FACTOR)
        plan.fits = need <= limit
        if plan.device == "cpu" and plan.capacity < need <= limit:
            plan.notes.append(f"tight: needs {_gb(need)} of {_gb(plan.capacity)} GB per process")
        elif plan.device == "gpu" and TIGHT * plan.capacity < need <= plan.capacity:
            plan.notes.append(f"tight: {_gb(need)} of {_gb(plan.capacity)} GB per GPU (the estimate is not exact)")

    def timing(self, plan: NodePlan, flops: float, devices: float, parallel_devices: Optional[float] = None) -> None:
        """Seconds on `parallel_devices` (default `devices`) working at once; device-hours on `devices`."""
        plan.flops += flops
        plan.model_flops += flops
        if self.peak is None or plan.device != "gpu":
            return
        seconds = F.seconds_for(flops, parallel_devices or devices, self.peak, self.options.mfu)
        self._add_time(plan, seconds, devices)

    def _add_time(self, plan: NodePlan, seconds: float, devices: float) -> None:
        plan.peak_tflops = self.peak
        plan.seconds = (plan.seconds or 0.0) + seconds
        plan.device_hours = (plan.device_hours or 0.0) + F.device_hours(seconds, devices)

    @property
    def timed(self) -> bool:
        return self.peak is not None

    def compute_seconds(self, flops: float) -> float:
        """One device's seconds for `flops` at the kernels' efficiency (0 when no peak is known)."""
        return F.seconds_for(flops, 1, self.peak, self.options.mfu) if self.peak else 0.0

    def phase_timing(self, plan: NodePlan, flops: float, phase: C.PhaseTime, devices: float) -> None:
        """A phase whose time (compute and exposed communication) `phase` holds, on `devices` devices."""
        plan.flops += flops
        plan.model_flops += flops * phase.useful
        plan.comm[phase.phase] = phase
        if self.peak is None or plan.device != "gpu":
            return
        self._add_time(plan, phase.seconds, devices)


def _gb(n: float) -> str:
    return f"{n / GB:,.1f}"


def _name_of(gpu_bytes: int) -> str:
    return f"{gpu_bytes / GB:g} GB GPU"


# Bytes of text a token, for the data's size read off its listing: BPE vocabularies of 32k-150k tokens
# average 3.5-4.5 bytes of English text a token (more for code and other languages: fewer tokens).
TEXT_BYTES_PER_TOKEN = 4.0


@dataclass
class _ListedData:
    tokens: Optional[int] = None  # None: not listed (`why` says why)
    why: str = ""
    problem: Optional[tuple] = None  # (loc, message) of a source that is not there


def _listed_data(loaded: LoadedWorkflow, tokenize) -> _ListedData:
    """The tokens the data holds, estimated from its listing: each source's text bytes over
    TEXT_BYTES_PER_TOKEN; a blend holds min over its sources of tokens / share (tasks/data/blend.py).
    Uses the listing validation made (`Node.data`), else lists the sources itself (no record is read)."""
    from slimmoe.tasks.data.sources import DataAccessError, DataSourceError, detect_source, is_remote

    data = loaded.config.data
    parts = data.blend()
    sources = tokenize.data if tokenize is not None and tokenize.data is not None else None
    if sources is None:
        sources = []
        for i, part in enumerate(parts):
            try:
                sources.append(detect_source(part.path))
            except (DataSourceError, OSError, ValueError) as err:
                # A local path may be a mount of the cluster's that this machine lacks, and a URI may need
                # credentials it lacks; a bucket that answers without the data is the same everywhere.
                if isinstance(err, DataAccessError) or not is_remote(part.path):
                    return _ListedData(why=f"data not listed here ({err})")
                return _ListedData(why="data not found", problem=(data.source_loc(i), str(err)))
    if any(s is None for s in sources):
        return _ListedData(why="data not listed (see the problems above)")
    sizes = [s.text_bytes(data.text_field) for s in sources]
    if any(b is None for b in sizes):
        return _ListedData(why="a saved dataset's size is not listed")
    total_weight = sum(part.weight for part in parts)
    tokens = min(b / TEXT_BYTES_PER_TOKEN / (part.weight / total_weight) for b, part in zip(sizes, parts))
    files = sum(len(s.files) for s in sources)
    why = (f"estimated from the data's listing ({files} files, {sum(sizes) / GB:,.2f} GB of text at "
           f"{TEXT_BYTES_PER_TOKEN:g} bytes a token{', the blend limited by its smallest source for its weight' if len(parts) > 1 else ''}); "
           "--data-tokens for an exact count")
    return _ListedData(int(tokens), why)


def plan_dag(loaded: LoadedWorkflow, nodes: dict, options: PlanOptions | None = None,
             cache_rows: Optional[int] = None) -> Plan:
    """The plan of a workflow whose DAG `nodes` (name -> Node, in order) was built from `loaded`;
    `cache_rows`: the rows of its finished train logit cache, if any."""
    options = options or PlanOptions()
    cfg = loaded.config
    res = cfg.resources
    use_gpu = bool(res.use_gpu)
    gpu_gb = options.gpu_memory_gb or res.gpu_memory_gb
    gpu_bytes = int(gpu_gb * GB) if gpu_gb else (local_gpu_memory_bytes() if use_gpu else None)
    notes: list[str] = []
    if use_gpu and gpu_bytes is None:
        if options.require_gpu_memory:
            raise PlanError("resources.gpu_memory_gb is not set and this machine has no GPU to ask: set it in the "
                            "workflow (80 for an A100-80GB) or pass --gpu-memory-gb")
        notes.append("GPU memory unknown (resources.gpu_memory_gb unset, no GPU here): GPU nodes were not checked")
    elif use_gpu and not gpu_gb:
        notes.append(f"GPU memory {_gb(gpu_bytes)} GB from this machine's GPU (set resources.gpu_memory_gb for the "
                     "cluster's)")
    cpu_bytes = int(options.cpu_memory_gb * GB) if options.cpu_memory_gb else (
        machine_memory_bytes() if not use_gpu else None)
    peak = F.peak_tflops(options.gpu, options.peak_tflops)
    if use_gpu and peak is None:
        notes.append("no GPU type given (--gpu a100|h100|h200 or --peak-tflops): times and GPU-hours not estimated")
    links = C.links_for(options.gpu, options.intra_node_gb_per_s, options.inter_node_gb_per_s) if use_gpu else None
    if use_gpu and peak is not None and links is None:
        notes.append("link bandwidths unknown (--gpu a100|h100|h200, or --intra-node-gb-per-s and "
                     "--inter-node-gb-per-s): communication counted in bytes, not in the times")

    seq_len = cfg.data.seq_len
    teacher_config = teacher_model_config(loaded, nodes.get("teacher"))
    budgets = [n.task_config.token_budget for n in nodes.values()
               if n.kind == "stage" and n.task_config is not None]
    listed = _ListedData() if options.data_tokens else _listed_data(loaded, nodes.get("tokenize"))
    if options.data_tokens:
        data_tokens, basis = int(options.data_tokens), "given (--data-tokens)"
    elif listed.tokens is not None:
        data_tokens, basis = listed.tokens, listed.why
    else:
        # Every stage reads the same cache from its start: it holds the largest budget (plus the
        # validation split) for no stage to wrap around.
        train_share = 1 - cfg.data.validation_fraction
        data_tokens = math.ceil(max(budgets, default=0) / train_share)
        basis = (f"the largest token budget of a stage, plus the validation split (no stage wraps around the "
                 f"cache); {listed.why + '; ' if listed.why else ''}pass --data-tokens for the data's real size")
    ctx = _Context(loaded, options, gpu_bytes, cpu_bytes, peak, res.num_workers * res.gpus_per_worker if use_gpu else 0,
                   seq_len, cfg.logits.k, data_tokens, links=links)
    if cache_rows is None and options.data_tokens:
        cache_rows = int(options.data_tokens * (1 - cfg.data.validation_fraction)) // seq_len
    ctx.cache_rows = cache_rows
    ctx.configs["teacher"] = teacher_config
    if listed.problem is not None:
        ctx.problems.append(listed.problem)

    planned: list[NodePlan] = []
    for name, node in nodes.items():
        if node.is_external:
            continue
        builder = _BUILDERS.get(node.kind)
        if builder is None or node.task_config is None:
            continue
        plan = builder(ctx, node)
        if plan is None:
            continue
        if node.kind in SERVED_KINDS and node.name in ctx.configs:
            plan.serves_at_tp = _servable_tp(ctx.configs[node.name], loaded.config.serve.block_fp8)
            plan.notes.append(f"serves at tensor_parallel {', '.join(map(str, plan.serves_at_tp)) or 'none'} "
                              "(vLLM, SGLang)" + ("" if _llama_cpp_loads(ctx.configs[node.name]) else
                                                  "; llama.cpp would not load it (fewer query heads)"))
        if plan.fits is False and plan.fix is None:
            plan.fix = "use devices with more memory"
        if plan.fits is False:
            ctx.problems.append((plan.problem_loc or node.section, f"{name}: {plan.fix}"))
        planned.append(plan)
    return Plan(cfg.name, use_gpu, gpu_bytes, cpu_bytes, peak, options.mfu, ctx.cluster_gpus, data_tokens, basis,
                planned, ctx.problems, notes, links)


# The node kinds whose output is a model someone serves.
SERVED_KINDS = ("stage", "trim")


def _servable_tp(config, block_fp8: bool) -> list[int]:
    from slimmoe.tasks.core.adapters import get_adapter
    from slimmoe.tasks.core.serving import ServeShape, servable_tp

    adapter = get_adapter(config)
    shared = adapter.shared_expert_size(config) if adapter.shared_expert_size_key else None
    shape = ServeShape(int(config.num_attention_heads), int(config.num_key_value_heads), adapter.expert_size(config),
                       shared)
    return servable_tp(shape, block_fp8=block_fp8)


def _llama_cpp_loads(config) -> bool:
    from slimmoe.tasks.core.adapters import get_adapter

    adapter = get_adapter(config)
    width = int(config.num_attention_heads) * adapter.head_dim(config)
    return not adapter.llama_cpp_fixed_attention or width == int(config.hidden_size)


def _input_config(ctx: _Context, node) -> Any:
    return ctx.configs.get(node.inputs.get("model", "teacher"))


def _plan_pretrain(ctx: _Context, node) -> NodePlan:
    pt = node.task_config
    device = pt.run_device(ctx.loaded.config.resources.use_gpu)
    on_gpu = device.startswith("cuda")
    shape = model_shape(ctx.configs["teacher"])
    plan = NodePlan(node.name, node.kind, "gpu" if on_gpu else "cpu", 1, params_after=_params(shape),
                    settings={"device": device})
    mem = stage_train_memory(shape, "ddp", 1, pt.batch_size, pt.seq_len, on_gpu)
    plan.memory, plan.phases = mem, {"train": mem}
    plan.capacity = ctx.capacity(on_gpu)
    plan.tokens = pt.max_steps * pt.batch_size * pt.seq_len
    ctx.timing(plan, F.train_flops(shape.active, plan.tokens), 1)
    ctx.judge(plan)
    return plan


def _plan_tokenize(ctx: _Context, node) -> NodePlan:
    plan = NodePlan(node.name, node.kind, "cpu", node.task_config.tokenize_workers, tokens=ctx.data_tokens)
    plan.notes.append("streams documents through tokenizer actors; memory not modelled")
    return plan


def _plan_teacher_logits(ctx: _Context, node) -> NodePlan:
    lc = node.task_config
    shape = model_shape(ctx.configs["teacher"])
    facts = PassFacts(cluster_has_gpus=ctx.loaded.config.resources.use_gpu, gpu_memory_bytes=ctx.gpu_bytes,
                      gpus_per_node=GPUS_PER_NODE, gpu_capability=GPU_CAPABILITY.get(ctx.options.gpu or ""))
    loc = ("logits", "gpus_per_actor")
    plan = NodePlan(node.name, node.kind, "cpu", lc.actor_pool_size, params_before=_params(shape),
                    tokens=ctx.data_tokens)
    try:
        resolved = lc.resolve_pass(facts, ctx.configs["teacher"], ctx.seq_len)
    except ValueError as err:  # auto: even a whole node's GPUs do not hold the pass
        resolved = lc.with_changes(gpus_per_actor=GPUS_PER_NODE).resolve_pass(facts)
        plan.fix = str(err)
    on_gpu = resolved.device == "cuda"
    plan.device, plan.settings = ("gpu" if on_gpu else "cpu"), asdict(resolved)
    elem = dtype_bytes(resolved.dtype)
    dtype = "bf16" if elem == 2 else resolved.dtype
    gpus = max(1, resolved.gpus_per_actor)
    if on_gpu and lc.gpus_per_actor == "auto" and plan.fix is None:
        plan.notes.append(f"gpus_per_actor auto resolves to {gpus}" if ctx.gpu_bytes is not None else
                          "gpus_per_actor auto: GPU memory unknown, planned as 1")
    mem = teacher_pass_memory(shape, lc.batch_size, ctx.seq_len, lc.k, on_gpu, gpus=gpus, dtype_bytes=elem,
                              pipeline_depth=resolved.pipeline_depth)
    plan.memory, plan.phases = mem, {"forward": mem}
    if on_gpu:
        plan.devices = lc.actor_pool_size * int(gpus)
        plan.capacity = ctx.capacity(True)
    else:
        plan.capacity = ctx.capacity(False, 1 / lc.actor_pool_size)
        if lc.actor_pool_size > 1:
            plan.notes.append(f"{lc.actor_pool_size} actors share this machine's memory")
    plan.cache_bytes = cache_bytes(ctx.data_tokens, lc.k, shape.vocab, ctx.seq_len)
    plan.notes.append(f"cache: {cache_bytes_per_token(lc.k, shape.vocab, ctx.seq_len):.1f} bytes/token (top-{lc.k} "
                      "ids and float16 log-probs, float32 rest, int32 token id; Parquet/zstd not counted)")
    # A teacher split over several GPUs runs its layers on one of them at a time: the pass computes at
    # the rate of one GPU per actor, holds all of them, and hands each batch's hidden states from GPU to
    # GPU in between.
    batch_tokens = lc.batch_size * ctx.seq_len
    batch_flops = F.forward_flops(shape.active, batch_tokens)
    handover = C.split_teacher_batch(batch_tokens, shape.hidden, int(gpus) if on_gpu else 1, elem)
    phase = C.teacher_batch_time(ctx.data_tokens / batch_tokens / lc.actor_pool_size, ctx.compute_seconds(batch_flops),
                                 handover, ctx.links, int(gpus) if on_gpu else 1, ctx.options.mfu)
    ctx.phase_timing(plan, F.forward_flops(shape.active, ctx.data_tokens), phase, plan.devices or 1)
    if on_gpu and int(gpus) > 1:
        plan.notes.append(f"{gpus} GPUs per actor compute one at a time (layers split in sequence): time at "
                          f"{lc.actor_pool_size} GPUs' rate, GPU-hours on {plan.devices:g}")
    ctx.judge(plan)
    if plan.fits is False and plan.fix is None:
        plan.problem_loc = loc
        weights = shape.total * elem
        try:
            need = teacher_actor_gpus(ctx.configs["teacher"], lc.batch_size, ctx.seq_len, lc.k, ctx.gpu_bytes, elem,
                                      GPUS_PER_NODE) if on_gpu else None
        except ValueError as err:
            need, plan.fix = None, str(err)
        if on_gpu and need is not None:
            plan.fix = (f"the teacher needs {_gb(weights)} GB in {dtype} plus {_gb(mem.activations + mem.logits)} GB of "
                        f"activations and logits for a batch of {lc.batch_size} x {ctx.seq_len}; one "
                        f"{_name_of(ctx.gpu_bytes)} holds {_gb(ctx.gpu_bytes)}"
                        + (f" and {gpus} hold {_gb(ctx.gpu_bytes * int(gpus))}" if int(gpus) > 1 else "")
                        + f": set logits.gpus_per_actor: {need} (or auto)")
            if ctx.cluster_gpus and lc.actor_pool_size * need > ctx.cluster_gpus:
                plan.fix += (f" and resources.actor_pool_size: {max(1, int(ctx.cluster_gpus // need))} "
                             f"({need} GPUs per actor, {ctx.cluster_gpus:g} GPUs)")
            smaller = lc.batch_size // 2
            while smaller >= 1:
                trial = teacher_pass_memory(shape, smaller, ctx.seq_len, lc.k, True, gpus=int(gpus), dtype_bytes=elem)
                if trial.total <= ctx.gpu_bytes:
                    plan.fix += (f"; or keep {gpus} GPU{'s' if int(gpus) > 1 else ''} per actor with "
                                 f"logits.batch_size: {smaller} ({_gb(trial.total)} GB)")
                    break
                smaller //= 2
        elif not on_gpu:
            plan.fix = (f"{lc.actor_pool_size} teacher actor(s) of {_gb(mem.total)} GB each (float32 weights "
                        f"{_gb(weights)} GB) do not fit this machine's {_gb(ctx.cpu_bytes)} GB: lower "
                        "resources.actor_pool_size or logits.batch_size")
    elif on_gpu and ctx.cluster_gpus and plan.devices > ctx.cluster_gpus:
        plan.fits = False
        per = int(gpus)
        plan.problem_loc = ("resources", "actor_pool_size")
        plan.fix = (f"{lc.actor_pool_size} actors x {per} GPUs = {plan.devices:g} GPUs, the cluster has "
                    f"{ctx.cluster_gpus:g} (resources.num_workers x gpus_per_worker): set resources.actor_pool_size: "
                    f"{max(1, int(ctx.cluster_gpus // per))}")
    return plan


def workers_per_node(cfg) -> int:
    """A stage's workers on one node: the GPUs of a node over the GPUs each takes (on CPU: all of them,
    one machine)."""
    if not cfg.use_gpu:
        return cfg.world()
    return max(1, int(GPUS_PER_NODE // min(cfg.gpus_per_worker, GPUS_PER_NODE)))


def _stage_memory(shape_in, shape_out, cfg, seq_len: int, k: int, on_gpu: bool,
                  per_node: int = GPUS_PER_NODE) -> dict:
    phases = {}
    mapped = shape_in.checkpoint_bytes  # a CPU worker's loaded checkpoint stays mapped (the student shares it)
    group = cfg.shard_group(per_node if on_gpu else cfg.world())
    if not cfg.distill_only:
        phases["score"] = stage_score_memory(shape_in, cfg.resolved_strategy(), cfg.world(), cfg.micro_batch, seq_len,
                                             on_gpu, shape_after=shape_out, mapped_bytes=mapped, shard_group=group)
    phases["train"] = stage_train_memory(shape_out, cfg.resolved_strategy(), cfg.world(), cfg.micro_batch, seq_len, on_gpu,
                                         cfg.activation_checkpointing, k, grad_accum=cfg.grad_accum,
                                         mapped_bytes=mapped, shard_group=group)
    return phases


def _peak(phases: dict) -> Memory:
    return max(phases.values(), key=lambda m: m.total)


def _wider_groups(cfg, per_node: int) -> list[int]:
    """Shard groups of whole nodes larger than the stage's (its default's, if it is not fsdp yet),
    dividing its world."""
    now = cfg.shard_group(per_node) if cfg.resolved_strategy() == "fsdp" else math.gcd(cfg.world(), per_node)
    return [g for g in range(per_node, cfg.world() + 1, per_node) if g > now and cfg.world() % g == 0]


def _group_words(group: int, per_node: int, world: int) -> str:
    if group >= world:
        return "full sharding"
    if group == per_node:
        return "HSDP within each node"
    if group < per_node:
        return f"HSDP, {per_node // group} copies per node"
    return f"HSDP, each copy over {group // per_node} nodes"


def _accepted(cfg, changes: dict, seq_len: int, cache_rows: Optional[int]):
    """`cfg` with `changes`, or None where the stage's rules or the rows of its cache refuse it: the
    checks `run` makes of a stage, so a fix the plan proposes is one the run accepts."""
    from slimmoe.tasks.slimming.config import cache_rows_problem

    try:
        trial = cfg.with_changes(**changes)
    except ValidationError:
        return None
    if cache_rows is not None and cache_rows_problem(trial, seq_len, cache_rows) is not None:
        return None
    return trial


def _stage_fix(shape_in, shape_out, cfg, seq_len: int, k: int, on_gpu: bool, capacity: int,
               per_node: int = GPUS_PER_NODE, cache_rows: Optional[int] = None) -> Optional[str]:
    """The smallest change that makes the stage fit: fsdp, activation checkpointing, a smaller micro-batch
    (grad_accum raised to keep the tokens per step), a copy sharded over more nodes, or a combination.
    Only changes the stage's rules accept are proposed (fsdp is no fix for a stage that hands its
    optimizer moments on)."""
    def fits(**changes) -> bool:
        trial = _accepted(cfg, changes, seq_len, cache_rows)
        if trial is None:
            return False
        return _peak(_stage_memory(shape_in, shape_out, trial, seq_len, k, on_gpu, per_node)).total <= capacity

    # Cheapest first: fsdp costs nothing, a smaller micro-batch a little efficiency, activation
    # checkpointing a third more compute, a copy sharded across nodes the network every micro-batch.
    options: list[tuple[str, dict]] = []
    # Where `auto` would shard (a GPU stage of several workers), fsdp is a fix to try.
    shardable = cfg.strategy_for("auto", on_gpu, cfg.world()) == "fsdp"
    if shardable and cfg.strategy != "fsdp":
        options.append(("strategy: fsdp", {"strategy": "fsdp"}))
    mb = cfg.micro_batch // 2
    while mb >= 1:
        ga = cfg.grad_accum * cfg.micro_batch // mb
        options.append((f"micro_batch: {mb} and grad_accum: {ga} (the same tokens per step)",
                        {"micro_batch": mb, "grad_accum": ga}))
        mb //= 2
    if (cfg.strategy == "fsdp" or shardable) and not cfg.activation_checkpointing:
        options.append(("activation_checkpointing: true" + ("" if cfg.strategy == "fsdp" else " with strategy: fsdp"),
                        {"activation_checkpointing": True, "strategy": "fsdp"}))
    if on_gpu and cfg.resolved_strategy() == "fsdp":
        for group in _wider_groups(cfg, per_node):
            options.append((f"shard_group_size: {group} ({_group_words(group, per_node, cfg.world())}: more "
                            "communication between nodes)", {"shard_group_size": group}))
    for text, changes in options:
        if fits(**changes):
            return text
    combined = {"micro_batch": 1, "grad_accum": cfg.grad_accum * cfg.micro_batch}
    if shardable:
        combined.update(strategy="fsdp", activation_checkpointing=True)
    if fits(**combined):
        return ", ".join(f"{key}: {str(v).lower() if isinstance(v, bool) else v}" for key, v in combined.items())
    if shardable and on_gpu and cfg.shard_group_size is None:
        for group in _wider_groups(cfg, per_node):
            if fits(**combined, shard_group_size=group):
                return ", ".join(f"{key}: {str(v).lower() if isinstance(v, bool) else v}"
                                 for key, v in {**combined, "shard_group_size": group}.items())
    if cfg.strategy == "fsdp" or shardable:
        for workers in (2, 4, 8, 16, 32, 64, 128, 256, 512):
            if workers > cfg.num_workers and fits(**combined, num_workers=workers, shard_group_size=None):
                return (f"not with {cfg.num_workers} workers: with fsdp, activation checkpointing and micro_batch 1 "
                        f"it needs num_workers >= {workers}")
    return None


def _stage_phases(ctx: _Context, cfg, shape_in: ModelShape, trained: list, total_steps: int) -> dict:
    """The stage's phases on the clock (`comm.PhaseTime`): scoring (every rank's calibration batches of
    its shard group, one at a time) and training (its optimizer steps), each with its communication.
    Also returns each phase's FLOPs (over every rank) as `{name: (phase, flops)}`."""
    on_gpu = bool(cfg.use_gpu)
    strategy, world = cfg.resolved_strategy(), cfg.world()
    per_node = workers_per_node(cfg)
    group = cfg.shard_group(per_node)
    links = ctx.links if on_gpu else None
    eff = ctx.options.mfu
    out = {}
    if not cfg.distill_only:
        # Under fsdp every rank runs every calibration batch of its shard group (the scores stay exact).
        batches = cfg.calibration_batches * (group if strategy == "fsdp" else 1)
        batch_tokens = cfg.micro_batch * ctx.seq_len
        batch_flops = F.train_flops(shape_in.active, batch_tokens)
        traffic = C.StepTraffic(each=C.score_batch_traffic(strategy, shape_in.total, group, per_node, on_gpu))
        phase = C.step_time("score", "calibration batch", batches, 1, ctx.compute_seconds(batch_flops), traffic,
                            links, per_node, eff)
        out["score"] = (phase, batch_flops * batches * world)
    # Equal shares of the steps go to each student a gradual cut trains.
    recompute = 8 / 6 if cfg.activation_checkpointing else 1.0  # each layer's forward runs again in backward
    for j, student in enumerate(trained):
        name = "train" if len(trained) == 1 else f"train (cut {j + 1} of {len(trained)})"
        micro_flops = F.train_flops(student.active, cfg.micro_batch * ctx.seq_len) * recompute
        traffic = C.stage_step_traffic(strategy, student.total, world, group, per_node, on_gpu, cfg.zero_stage)
        steps = total_steps / len(trained)
        phase = C.step_time(name, "optimizer step", steps, cfg.grad_accum, ctx.compute_seconds(micro_flops), traffic,
                            links, per_node, eff, useful=1 / recompute)
        out[name] = (phase, micro_flops * cfg.grad_accum * world * steps)
    return out


def _stage_seconds(phases: dict) -> float:
    return sum(p.seconds for p, _ in phases.values())


def _bound(phases: dict) -> bool:
    return sum(p.units * p.exposed_s for p, _ in phases.values()) > sum(p.units * p.compute_s for p, _ in phases.values())


def _comm_fix(ctx: _Context, cfg, shape_in: ModelShape, trained: list, total_steps: int, capacity: Optional[int],
              seq_len: int) -> str:
    """For a stage bound by communication: of the changes its rules accept and its memory holds, the
    one after which the stage takes the least time (and whether it is still bound then)."""
    on_gpu, per_node = bool(cfg.use_gpu), workers_per_node(cfg)
    fsdp = cfg.resolved_strategy() == "fsdp"
    checkpointing = fsdp and not cfg.activation_checkpointing
    options: list[tuple[str, dict]] = []

    def add(words: str, changes: dict) -> None:
        options.append((words, changes))
        if checkpointing:  # to hold what the change adds (a whole shard per node, a bigger micro-batch)
            options.append((words + " with activation_checkpointing: true", {**changes, "activation_checkpointing": True}))

    if fsdp and C.nodes_spanned(cfg.shard_group(per_node), per_node) > 1:
        for g in range(per_node, cfg.shard_group(per_node), per_node):
            if cfg.world() % g == 0:
                add(f"shard_group_size: {g} ({_group_words(g, per_node, cfg.world())})", {"shard_group_size": g})
    # Per micro-batch communication is fixed by the model; compute grows with the micro-batch.
    for factor in (2, 4):
        mb = cfg.micro_batch * factor
        changes = {"micro_batch": mb}
        words = f"micro_batch: {mb}"
        if cfg.grad_accum % factor == 0:
            changes["grad_accum"] = cfg.grad_accum // factor
            words += f" and grad_accum: {cfg.grad_accum // factor} (the same tokens per step)"
        if not cfg.distill_only and cfg.calibration_batches % factor == 0:
            changes["calibration_batches"] = cfg.calibration_batches // factor
            words += f", calibration_batches: {cfg.calibration_batches // factor} (the same calibration tokens)"
        add(words, changes)
    # A step's own collectives (HSDP's and ddp's all-reduce) are paid once per optimizer step.
    for factor in (2, 4):
        options.append((f"grad_accum: {cfg.grad_accum * factor} ({factor}x the tokens per optimizer step: fewer "
                        "all-reduces between nodes)", {"grad_accum": cfg.grad_accum * factor}))
    now = _stage_seconds(_stage_phases(ctx, cfg, shape_in, trained, total_steps))
    best: Optional[tuple[float, str, bool]] = None
    for words, changes in options:
        trial = _accepted(cfg, changes, seq_len, ctx.cache_rows)
        if trial is None:
            continue
        if capacity is not None:
            memory = _peak(_stage_memory(shape_in, trained[0], trial, seq_len, ctx.k, on_gpu, per_node))
            if memory.total > capacity:
                continue
        steps = max(1, math.ceil(trial.token_budget / trial.tokens_per_step(seq_len)))
        phases = _stage_phases(ctx, trial, shape_in, trained, steps)
        seconds = _stage_seconds(phases)
        if seconds < now and (best is None or seconds < best[0]):
            best = (seconds, words, _bound(phases))
    if best is None:
        return "no setting of the stage helps: faster links between nodes do (measure them: --inter-node-gb-per-s)"
    seconds, words, still = best
    return f"set {words}: {_duration(now)} -> {_duration(seconds)}" + (" (still bound by communication)" if still else "")


def _plan_stage(ctx: _Context, node) -> NodePlan:
    from slimmoe.tasks.slimming.config import stage_steps
    from slimmoe.tasks.slimming.surgery import slimmed_config

    cfg = node.task_config
    on_gpu = bool(cfg.use_gpu)
    dtype = cfg.train_dtype()
    config_in = _input_config(ctx, node)
    if config_in is None:
        return None
    if not cfg.distill_only:
        from slimmoe.tasks.slimming.config import validate_targets

        serve = ctx.loaded.config.serve
        try:  # `slimmoe plan` builds the DAG without the teacher: its cuts are checked here
            validate_targets(config_in, cfg.targets, dtype=dtype, tensor_parallel=serve.tensor_parallel,
                             block_fp8=serve.block_fp8, llama_cpp=serve.llama_cpp)
        except ValueError as err:
            raise PlanError(f"{node.name}: {err}") from None
    config_out = config_in if cfg.distill_only else slimmed_config(config_in, cfg.targets)
    ctx.configs[node.name] = config_out
    shape_in, shape_out = model_shape(config_in), model_shape(config_out)
    trained = [shape_out]  # the students this stage trains, in order
    if cfg.cut_steps > 1 and not cfg.distill_only:
        from slimmoe.tasks.slimming.config import ModelSizes, gradual_cuts

        cuts = gradual_cuts(cfg, ModelSizes.of(config_in), cfg.cut_steps, dtype)
        trained = [model_shape(slimmed_config(config_in, c.targets)) for c in cuts]
    per_node = workers_per_node(cfg)
    group, replicas = cfg.shard_group(per_node), cfg.replica_groups(per_node)
    plan = NodePlan(node.name, node.kind, "gpu" if on_gpu else "cpu", cfg.world(),
                    params_before=_params(shape_in), params_after=_params(shape_out),
                    settings={"strategy": cfg.resolved_strategy(), "dtype": dtype, "world": cfg.world(),
                              "shard_group": group,
                              "experts_kernel": cfg.experts_kernel(on_gpu, GPU_CAPABILITY.get(ctx.options.gpu or ""))})
    # A gradual cut trains its first (largest) student first: that is the training peak.
    plan.phases = _stage_memory(shape_in, trained[0], cfg, ctx.seq_len, ctx.k, on_gpu, per_node)
    plan.memory = _peak(plan.phases)
    if on_gpu:
        plan.devices = cfg.num_workers * cfg.gpus_per_worker
        plan.capacity = ctx.capacity(True, min(1.0, cfg.gpus_per_worker))
    else:
        plan.capacity = ctx.capacity(False, 1 / cfg.num_workers)
    steps = stage_steps(cfg, ctx.seq_len, batches_per_epoch=2**62)
    plan.tokens = steps.planned_tokens
    phases = _stage_phases(ctx, cfg, shape_in, trained, steps.total_steps)
    for phase, flops in phases.values():
        ctx.phase_timing(plan, flops, phase, plan.devices or 1)
    if "score" in phases:
        per_rank = int(phases["score"][0].units) * cfg.micro_batch * ctx.seq_len
        plan.notes.append(f"scoring: {per_rank:,} calibration tokens per worker")
    layout = cfg.resolved_strategy()
    if layout == "fsdp" and cfg.world() > 1:
        layout += (f", sharded over all {cfg.world()} ranks" if replicas == 1 else
                   f", {_group_words(group, per_node, cfg.world())}: {replicas} copies of {group} ranks")
    plan.notes.append(f"{steps.total_steps:,} steps of {steps.tokens_per_step:,} tokens ({layout})")
    disk = stage_disk(max(s.total for s in trained), shape_out.checkpoint_bytes, shape_out.total, steps.total_steps,
                      cfg.checkpoint_interval, cfg.keep_optimizer_state)
    plan.disk_bytes = disk.work_bytes + disk.output_bytes
    plan.notes.append(f"disk: {_bytes(disk.checkpoint_bytes)} of checkpoints and {_bytes(disk.work_model_bytes)} "
                      f"of models in the work dir, {_bytes(disk.output_bytes)} of output (checked before the stage starts)")
    ctx.judge(plan)
    if plan.bound_by_communication:
        plan.comm_fix = _comm_fix(ctx, cfg, shape_in, trained, steps.total_steps, plan.capacity, ctx.seq_len)
    if plan.fits is False:
        plan.problem_loc = node.section
        what = plan.memory
        fix = _stage_fix(shape_in, trained[0], cfg, ctx.seq_len, ctx.k, on_gpu, plan.capacity, per_node,
                         ctx.cache_rows)
        plan.fix = (f"the {what.phase} phase needs {_gb(what.total)} GB per {'GPU' if on_gpu else 'worker'} "
                    f"(weights {_gb(what.weights)}, gradients {_gb(what.gradients)}, optimizer {_gb(what.optimizer)}, "
                    f"activations {_gb(what.activations)}, logits {_gb(what.logits)}), "
                    f"{_gb(plan.capacity)} GB available: " + (f"set {fix}" if fix and not fix.startswith("not ")
                                                             else (fix or "use devices with more memory")))
    return plan


def _plan_evaluate(ctx: _Context, node) -> NodePlan:
    ec = node.task_config
    model = node.inputs["model"]
    config = ctx.configs.get(model)
    if config is None:
        return None
    device = ec.run_device(ctx.loaded.config.resources.use_gpu)
    on_gpu = device.startswith("cuda")
    elem = dtype_bytes(ec.weights_dtype(device))
    shape = model_shape(config)
    plan = NodePlan(node.name, node.kind, "gpu" if on_gpu else "cpu", 1, params_before=_params(shape),
                    settings={"device": device, "dtype": ec.weights_dtype(device)})
    mem = evaluate_memory(shape, ec.batch_size, ctx.seq_len, on_gpu, elem)
    plan.memory, plan.phases = mem, {"forward": mem}
    plan.capacity = ctx.capacity(on_gpu)
    rows = ec.max_rows or math.ceil(ctx.data_tokens * ctx.loaded.config.data.validation_fraction / ctx.seq_len)
    plan.tokens = rows * ctx.seq_len
    ctx.timing(plan, F.forward_flops(shape.active, plan.tokens), 1)
    plan.notes.append("runs in the driver's process on one device" + (" (slimmoe submit --entrypoint-num-gpus 1)"
                                                                      if on_gpu else ""))
    if ec.lm_eval_tasks:
        plan.notes.append("lm-eval tasks not counted in FLOPs")
    ctx.judge(plan)
    if plan.fits is False:
        plan.problem_loc = ("evaluate",)
        rest = mem.total - mem.weights
        unit = "GPU" if on_gpu else "process"
        if mem.weights + mem.overhead < plan.capacity:
            b = ec.batch_size
            while b > 1 and evaluate_memory(shape, b, ctx.seq_len, on_gpu, elem).total > plan.capacity:
                b //= 2
            if evaluate_memory(shape, b, ctx.seq_len, on_gpu, elem).total <= plan.capacity:
                plan.fix = (f"{model} needs {_gb(mem.total)} GB on one {unit} ({_gb(mem.weights)} GB of weights, "
                            f"{_gb(rest)} GB for a batch of {ec.batch_size} x {ctx.seq_len}): set evaluate.batch_size: {b}")
        if plan.fix is None:
            plan.fix = (f"{model}'s weights alone are {_gb(mem.weights)} GB ({'bf16' if elem == 2 else 'float32'}), "
                        f"more than one {_gb(plan.capacity)} GB {unit} holds with a batch: remove {model} from "
                        "evaluate.models (evaluate it by hand with `slimmoe evaluate` on a bigger GPU)")
    return plan


def _driver_pass(ctx: _Context, node, shape_in: ModelShape, shape_out: ModelShape, device: str, dtype: str,
                 batch_size: int, seq_len: int, batches: int, phase: str) -> tuple[NodePlan, Memory]:
    """A node that runs calibration forwards over a whole model in the driver's process, on one device."""
    on_gpu, elem = device.startswith("cuda"), dtype_bytes(dtype)
    plan = NodePlan(node.name, node.kind, "gpu" if on_gpu else "cpu", 1, params_before=_params(shape_in),
                    params_after=_params(shape_out), settings={"device": device, "dtype": dtype})
    mem = evaluate_memory(shape_in, batch_size, seq_len, on_gpu, elem)
    plan.memory, plan.phases = mem, {phase: mem}
    plan.capacity = ctx.capacity(on_gpu)
    plan.tokens = batches * batch_size * seq_len
    ctx.timing(plan, F.forward_flops(shape_in.active, plan.tokens), 1)
    return plan, mem


def _plan_trim(ctx: _Context, node) -> NodePlan:
    tc = node.task_config
    config_in = _input_config(ctx, node)
    if config_in is None:
        return None
    config_out = _trimmed_config(config_in, tc)
    ctx.configs[node.name] = config_out
    device = tc.run_device(ctx.loaded.config.resources.use_gpu)
    plan, mem = _driver_pass(ctx, node, model_shape(config_in), model_shape(config_out), device, tc.dtype,
                             tc.batch_size, tc.seq_len, tc.calibration_batches, "trim")
    mem.weights += 0 if tc.scores_only else model_shape(config_out).total * dtype_bytes(tc.dtype)  # the trimmed copy
    mem.notes.append("scoring forward, then the trimmed model built beside the whole one")
    plan.notes.append("runs in the driver's process")
    ctx.judge(plan)
    if plan.fits is False:
        plan.problem_loc = node.section
        plan.fix = (f"trimming holds {_gb(mem.total)} GB on one {'GPU' if plan.device == 'gpu' else 'process'}: "
                    + ("set device: cpu (the driver host's RAM)" if plan.device == "gpu" else "set dtype: bfloat16"))
    return plan


def _plan_quantize(ctx: _Context, node) -> NodePlan:
    qc = node.task_config
    config_in = _input_config(ctx, node)
    if config_in is None:
        return None
    ctx.configs[node.name] = config_in  # the same architecture, packed (evaluated at 16 bits: an upper bound)
    shape = model_shape(config_in)
    device = qc.run_device(ctx.loaded.config.resources.use_gpu)
    plan, mem = _driver_pass(ctx, node, shape, shape, device, qc.compute_dtype, qc.batch_size, qc.seq_len,
                             qc.calibration_batches, "calibrate")
    mem.notes.append("calibration forward; GPTQ's per-layer Hessians not counted")
    plan.notes.append("runs in the driver's process; GPTQ's own work not counted in FLOPs")
    ctx.judge(plan)
    if plan.fits is False:
        plan.problem_loc = node.section
        plan.fix = f"quantization holds {_gb(mem.total)} GB on one device: set compute_dtype: bfloat16 or device: cpu"
    return plan


_BUILDERS: dict[str, Callable] = {"pretrain_teacher": _plan_pretrain, "tokenize": _plan_tokenize,
                                  "teacher_logits": _plan_teacher_logits, "stage": _plan_stage,
                                  "evaluate": _plan_evaluate, "trim": _plan_trim, "quantize": _plan_quantize}


# ---------------------------------------------------------------------------------------------
# For run / submit


def problems_of(loaded: LoadedWorkflow, plan: Plan) -> list[Problem]:
    """The plan's nodes that do not fit, each at its YAML line with the fix."""
    return [loaded.problem(loc, f"{message} (see `slimmoe plan`; --allow-infeasible runs it anyway)")
            for loc, message in plan.problems]


def plan_problems(loaded: LoadedWorkflow, nodes: dict, cache_rows: Optional[int] = None) -> list[Problem]:
    """What `slimmoe run` refuses before any node starts: the nodes the plan says do not fit. A
    workflow that cannot be planned (no teacher config.json here) is not refused: only what is known
    not to fit is; GPU nodes are checked only when the GPU memory is known."""
    try:
        plan = plan_dag(loaded, nodes, PlanOptions(require_gpu_memory=False), cache_rows)
    except ValueError:  # PlanError, or a teacher config the planner cannot model
        return []
    return problems_of(loaded, plan)


# ---------------------------------------------------------------------------------------------
# Text


def _count(n: Optional[int]) -> str:
    if n is None:
        return ""
    from slimmoe.tasks.core.params import format_count

    return format_count(n)


def _flops(x: float) -> str:
    return f"{x:.2e}" if x else ""


def _duration(s: Optional[float]) -> str:
    if s is None:
        return ""
    if s < 120:
        return f"{s:.0f}s"
    if s < 2 * 3600:
        return f"{s / 60:.0f}m"
    if s < 3 * 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def _bytes(n: Optional[float]) -> str:
    if n is None:
        return ""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def format_plan(plan: Plan) -> str:
    unit = "GPU" if plan.use_gpu else "worker"
    head = [f"plan for {plan.workflow}: " + (f"GPUs of {_bytes(plan.gpu_memory_bytes)}" if plan.use_gpu and plan.gpu_memory_bytes
                                             else "GPU memory unknown" if plan.use_gpu else
                                             f"CPU, {_bytes(plan.cpu_memory_bytes)} of RAM")
            + (f", peak {plan.peak_tflops:g} TFLOP/s, kernels at {plan.mfu:g} of it" if plan.peak_tflops else "")
            + (f", {plan.cluster_gpus:g} GPUs" if plan.use_gpu else "")
            + (f"; links {plan.links.intra_gb_s:g} GB/s per GPU in a node, {plan.links.inter_gb_s:g} GB/s per node "
               "between nodes" if plan.links else ""), ""]
    rows = []
    for n in plan.nodes:
        params = ""
        if n.params_before and n.params_after and n.params_before != n.params_after:
            params = f"{_count(n.params_before['total'])} -> {_count(n.params_after['total'])}"
        elif n.params_before or n.params_after:
            params = _count((n.params_after or n.params_before)["total"])
        mem = _bytes(n.memory.total) if n.memory else ""
        cap = f"/ {_bytes(n.capacity)}" if n.capacity and n.memory else ""
        fits = {True: "yes", False: "NO", None: "-"}[n.fits]
        rows.append([n.name, n.device + (f" x{n.devices:g}" if n.devices else ""), params, f"{mem} {cap}".strip(), fits,
                     _count(n.tokens) if n.tokens else "", _flops(n.flops), _duration(n.seconds),
                     f"{n.device_hours:,.0f}" if n.device_hours is not None else "",
                     f"{n.effective_mfu:.2f}" if n.effective_mfu is not None and n.device == "gpu" else "",
                     _bytes(n.cache_bytes) if n.cache_bytes else ""])
    head += _table(["node", "devices", "params", f"peak per {unit}", "fits", "tokens", "FLOPs", "time",
                    "GPU-h", "MFU", "cache"], rows, {2, 3, 5, 6, 7, 8, 9, 10})
    big = max((n.memory.total for n in plan.nodes if n.memory), default=0) >= 10 * GB
    scale, scale_name = (GB, "GB") if big else (1e6, "MB")
    head += ["", f"memory per {unit} at the peak phase ({scale_name})"]
    mrows = []
    for n in plan.nodes:
        if n.memory is None:
            continue
        m = n.memory
        mrows.append([n.name, m.phase] + [f"{v / scale:,.1f}" for v in (m.weights, m.gradients, m.optimizer,
                                                                          m.activations, m.logits, m.overhead, m.total)])
    head += _table(["node", "phase", "weights", "grads", "optimizer", "activations", "logits", "runtime+slack", "total"],
                   mrows, set(range(2, 9)))
    head += _comm_table(plan)
    t = plan.totals()
    head += ["", "totals: " + ", ".join(filter(None, [
        f"{t['flops']:.2e} FLOPs",
        (f"{t['gpu_hours']:,.0f} GPU-hours at effective MFU {t['effective_mfu']:.2f} (kernels at {plan.mfu:g})"
         if t["effective_mfu"] is not None else f"{t['gpu_hours']:,.0f} GPU-hours at MFU {plan.mfu:g}")
        if t["gpu_hours"] is not None else "",
        f"{_duration(t['seconds'])} of wall-clock (nodes in sequence)" if t["seconds"] is not None else "",
        f"logit cache {_bytes(t['cache_bytes'])} for {_count(plan.data_tokens)} tokens" if t["cache_bytes"] else ""]))]
    head.append(f"  data tokens: {plan.data_tokens_basis}")
    for note in plan.notes:
        head.append(f"  note: {note}")
    by_note: dict[str, list[str]] = {}  # the same note for several nodes is printed once
    for n in plan.nodes:
        for note in n.notes:
            by_note.setdefault(note, []).append(n.name)
    for note, names in by_note.items():
        head.append(f"  {', '.join(names)}: {note}")
    head += ["", plan.verdict()]
    for n in plan.nodes:
        if n.fits is False:
            head.append(f"  {n.name}: {n.fix}")
    bound = [n for n in plan.nodes if n.bound_by_communication]
    if bound:
        head += ["", "bound by communication (exposed communication exceeds compute):"]
        for n in bound:
            head.append(f"  {n.name}: {_duration(n.exposed_comm_seconds)} of exposed communication against "
                        f"{_duration(n.compute_seconds)} of compute" + (f": {n.comm_fix}" if n.comm_fix else ""))
    return "\n".join(head)


def _seconds(s: float) -> str:
    if s == 0:
        return "0"
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.0f}ms"
    return f"{s:.1f}s" if s < 120 else _duration(s)


def _comm_table(plan: Plan) -> list[str]:
    """Per phase: the bytes one rank moves per unit (NVLink, its share of the network, and what one
    node's adapters carry), and per unit its compute, its communication and the part not hidden."""
    rows = []
    for n in plan.nodes:
        for p in n.comm.values():
            if not (p.intra_bytes or p.inter_bytes):
                continue
            timed = n.seconds is not None and plan.links is not None
            rows.append([n.name, p.phase, f"{p.unit} x{p.units:,.0f}", _bytes(p.intra_bytes) if p.intra_bytes else "0",
                         _bytes(p.inter_bytes) if p.inter_bytes else "0",
                         _bytes(p.node_inter_bytes) if p.node_inter_bytes else "0",
                         _seconds(p.compute_s) if timed else "", _seconds(p.comm_s) if timed else "",
                         _seconds(p.exposed_s) if timed else "",
                         (f"{p.effective_mfu:.2f}" + ("*" if p.bound_by_communication else " ")) if timed else ""])
    if not rows:
        return []
    return ["", "communication: bytes per rank and unit inside its node, its share of what leaves the node, and what one "
                "node's", "adapters carry; per unit the compute, the communication, the part compute does not hide, "
                "and the effective MFU (* bound by communication)"] + \
        _table(["node", "phase", "per", "in node", "between", "node NIC", "compute", "comm", "exposed", "MFU"], rows,
               set(range(3, 10)))


__all__ = ["NodePlan", "Plan", "PlanError", "PlanOptions", "format_plan", "plan_dag", "plan_problems", "problems_of",
           "teacher_model_config"]
