"""`slimmoe search`: the shape of a stage's cut for a parameter budget, measured on the workflow's own data.

The plan of a search (`plan_search`) needs only the workflow: the stage's input config (the teacher's
config.json, cut by the stages before), the shapes within the targets (`tasks/slimming/search.py`),
and what scoring them costs. `search_workflow` then runs the DAG's nodes up to the stage's input and
logit cache, scores the input once, and cuts, measures and frees one candidate at a time in this
process, so it holds the input model and one candidate: no more than the stage's own cut does. The
chosen shape goes into a copy of the workflow, validated by `build_dag` before it is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from slimmoe.tasks.planning import flops as F
from slimmoe.tasks.slimming.config import ModelSizes
from slimmoe.tasks.slimming.search import SearchConfig, Shape


class SearchRefused(ValueError):
    """No shape meets the targets, or the search cannot run as asked; the message names the option and the fix."""


@dataclass
class SearchPlan:
    """What a search will cut and what it costs, before anything runs."""

    stage: str
    stage_index: int
    input_node: str
    sizes: ModelSizes
    input_counts: tuple[int, int]
    candidates: list[Shape]
    within: int  # shapes within the targets, before `candidates` keeps the closest
    calibration_tokens: int
    heldout_tokens: int  # per candidate
    distill_tokens: int  # per distilled candidate
    flops: float
    seconds: Optional[float]

    def format(self) -> str:
        lines = [f"search: {self.stage} cuts {self.input_node} ({self.sizes.expert_intermediate_size} wide, "
                 f"{self.sizes.num_experts} experts, {self.sizes.num_key_value_heads} KV)",
                 f"  candidates      {len(self.candidates)} of {self.within} shapes within the targets",
                 f"  forward tokens  {self.calibration_tokens:,} calibration (forward + backward, once), "
                 f"{self.heldout_tokens:,} held-out per candidate"
                 + (f", {self.distill_tokens:,} distilled per top candidate" if self.distill_tokens else ""),
                 f"  compute         {self.flops:.3g} FLOPs; time "
                 + (f"~{self.seconds:,.0f} s" if self.seconds is not None else "not estimated (--gpu a100|h100|h200)")]
        return "\n".join(lines)


def _stage_index(loaded, name: Optional[str]) -> int:
    names = loaded.config.stage_names()
    if name is None:
        return 0
    if name not in names:
        raise SearchRefused(f"--stage {name}: the workflow has no such stage; choose one of {', '.join(names)}")
    return names.index(name)


def input_config(loaded, dag, index: int):
    """The config of stage `index`'s input model as the plan derives it: the teacher's, cut by each stage before."""
    from slimmoe.tasks.slimming.surgery import slimmed_config

    from .plan import teacher_model_config

    config = teacher_model_config(loaded, dag.nodes.get("teacher"))
    for stage in loaded.config.stages[:index]:
        if not stage.distill_only:
            config = slimmed_config(config, stage.targets)
    return config


def plan_search(dag, opts: SearchConfig) -> SearchPlan:
    """The candidates and the costs, or SearchRefused with the nearest targets some shape meets."""
    from slimmoe.tasks.core.params import format_count
    from slimmoe.tasks.slimming.search import count_function, enumerate_shapes, nearest_feasible

    loaded = dag.workflow
    index = _stage_index(loaded, opts.stage)
    name = loaded.config.stage_names()[index]
    node = dag.nodes[name]
    cfg = node.task_config
    config = input_config(loaded, dag, index)
    sizes = ModelSizes.of(config, node.inputs["model"])
    counts = count_function(config, sizes)
    dtype, tp, fp8 = cfg.train_dtype(), opts.serve_tp, loaded.config.serve.block_fp8
    budget = opts.budget
    shapes = enumerate_shapes(sizes, counts, dtype, budget, tp, fp8)
    if not shapes:
        near = nearest_feasible(sizes, counts, dtype, budget, tp, fp8)
        asked = " ".join(f"--{flag} {format_count(v)}" for flag, v in (("target-params", budget.total),
                                                                       ("target-active-params", budget.active)) if v)
        if near is None:
            raise SearchRefused(f"{asked}: no cut of {sizes.source} is valid" + (f" at --serve-tp {','.join(map(str, tp))}"
                                                                                  "; serve at fewer GPUs" if tp else ""))
        fix = " ".join(f"--{flag} {value}" for flag, value, given in
                       (("target-params", near.total, budget.total), ("target-active-params", near.active, budget.active))
                       if given)
        raise SearchRefused(f"{asked}: no shape of {sizes.source} is that small; the nearest feasible targets are "
                            f"{fix} ({near.label()})")
    candidates = shapes[:opts.candidates]
    seq = loaded.config.data.seq_len
    calibration = cfg.calibration_batches * cfg.micro_batch * seq
    heldout = cfg.early_stop_rows * seq
    distill = opts.distill_steps * cfg.tokens_per_step(seq)
    distilled = candidates[:opts.top] if opts.distill_steps else []
    total_in, active_in = counts(sizes.expert_intermediate_size, sizes.num_experts, sizes.num_key_value_heads)
    flops = (F.train_flops(active_in, calibration) + sum(F.forward_flops(s.active, heldout) for s in candidates)
             + sum(F.train_flops(s.active, distill) + F.forward_flops(s.active, heldout) for s in distilled))
    peak = F.peak_tflops(opts.gpu)
    seconds = F.seconds_for(flops, 1, peak) if peak else None
    return SearchPlan(name, index, node.inputs["model"], sizes, (total_in, active_in), candidates, len(shapes),
                      calibration, heldout, distill, flops, seconds)


# -- running it ---------------------------------------------------------------------------------------------

@dataclass
class Measured:
    shape: Shape
    kl_cut: float
    seconds: float
    kl_distilled: Optional[float] = None
    distill_seconds: Optional[float] = None

    @property
    def kl(self) -> float:
        """What the final ranking goes by: the KL after the short distillation where there was one."""
        return self.kl_distilled if self.kl_distilled is not None else self.kl_cut

    def as_dict(self) -> dict:
        return {**asdict(self.shape), "kl_cut": self.kl_cut, "kl_distilled": self.kl_distilled,
                "seconds": round(self.seconds, 3),
                "distill_seconds": None if self.distill_seconds is None else round(self.distill_seconds, 3)}


@dataclass
class SearchResult:
    plan: SearchPlan
    measured: list[Measured]  # best first
    out: Path
    stage_targets: list[dict] = field(default_factory=list)  # what the written workflow's stages ask, in order

    @property
    def best(self) -> Measured:
        return self.measured[0]

    def as_dict(self) -> dict:
        p = self.plan
        return {"stage": p.stage, "input": p.input_node, "input_params": {"total": p.input_counts[0],
                                                                          "active": p.input_counts[1]},
                "shapes_within_targets": p.within, "candidates": [m.as_dict() for m in self.measured],
                "best": self.best.as_dict(), "workflow": str(self.out), "stage_targets": self.stage_targets,
                "flops": p.flops, "estimated_seconds": p.seconds}

    def table(self) -> str:
        from slimmoe.tasks.core.params import format_count

        def kl(v):
            return "-" if v is None else f"{v:.5f}"

        rows = [["width", "experts", "KV", "total", "active", "KL cut", "KL distilled", "time"]]
        rows += [[str(m.shape.expert_intermediate_size), str(m.shape.num_experts), str(m.shape.num_key_value_heads),
                  format_count(m.shape.total), format_count(m.shape.active), kl(m.kl_cut), kl(m.kl_distilled),
                  f"{m.seconds + (m.distill_seconds or 0):.1f}s"] for m in self.measured]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def search_workflow(config, opts: SearchConfig, out: Optional[Path] = None, log: Callable[[str], None] = print,
                    address: Optional[str] = None) -> SearchResult:
    """Plan, run the nodes the stage's input and cache come from, measure every candidate, write the workflow."""
    from slimmoe.tasks.core.runtime import ensure_ray

    from .dag import build_dag
    from .driver import Driver, run_workflow

    dag = build_dag(config)
    plan = plan_search(dag, opts)
    out = Path(out) if out is not None else _default_out(dag.workflow)
    log(plan.format())
    needed = set(dag.ancestors(plan.stage))
    run_workflow(config, address=address, log=log, targets=needed)
    driver = Driver(dag, log=log, address=address, command="run")
    model_dir = Path(driver.local_input(plan.input_node))
    logits_dir = Path(driver.local_input("teacher_logits"))
    measured, scores = _measure(dag, plan, model_dir, logits_dir, log)
    if opts.distill_steps:
        ensure_ray(address)
        _distill_top(dag, plan, opts, measured, scores, model_dir, logits_dir, driver.teacher_fingerprint(), log)
    measured.sort(key=lambda m: (m.kl_distilled is None, m.kl))
    targets = write_searched_workflow(dag.workflow, plan, measured[0].shape, out)
    return SearchResult(plan, measured, out, targets)


def _default_out(loaded) -> Path:
    base = loaded.path or Path.cwd() / f"{loaded.config.name}.yaml"
    return base.with_name(f"{base.stem}.searched.yaml")


def _device(cfg):
    import torch

    return torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")


def _caches(logits_dir: Path):
    from slimmoe.tasks.data.readers import open_logit_cache, split_dir
    from slimmoe.tasks.nodes.stage import HELDOUT_SPLIT, SPLIT

    return (open_logit_cache(split_dir(logits_dir, SPLIT, "logit_cache")),
            open_logit_cache(split_dir(logits_dir, HELDOUT_SPLIT, "logit_cache")))


def _measure(dag, plan: SearchPlan, model_dir: Path, logits_dir: Path, log):
    """Score the input once, then cut, measure and free one candidate at a time. Returns the
    measurements (best first) and the scores, which the short distillation cuts with again."""
    import gc

    from slimmoe.tasks.core.checkpoint import load_model
    from slimmoe.tasks.slimming.search import cut, heldout_kl, score_once

    cfg = dag.nodes[plan.stage].task_config
    device = _device(cfg)
    train, validation = _caches(logits_dir)
    model = load_model(model_dir, device=device, trust_remote_code=cfg.trust_remote_code,
                       experts_implementation=cfg.experts_kernel_on(device))
    started = time.time()
    scores = score_once(model, cfg, train, cuts_the_teacher=plan.input_node == "teacher")
    log(f"scored {plan.input_node} once on {scores.batches} calibration batches ({time.time() - started:.1f}s)")
    measured = []
    for shape in plan.candidates:
        started = time.time()
        student = cut(model, scores, shape.targets(plan.sizes))
        kl = heldout_kl(student, validation, cfg.early_stop_rows, cfg.micro_batch, device)
        del student
        gc.collect()
        measured.append(Measured(shape, kl, time.time() - started))
        log(f"  {shape.label()}: KL {kl:.5f}")
    measured.sort(key=lambda m: m.kl_cut)
    return measured, scores


def _distill_top(dag, plan: SearchPlan, opts: SearchConfig, measured: list[Measured], scores, model_dir: Path,
                 logits_dir: Path, teacher_fp: Optional[str], log) -> None:
    """The best `top` cuts, each distilled `distill_steps` steps by the stage machinery (a distill-only
    stage on the saved cut, the stage's own settings otherwise), then measured again."""
    from slimmoe.tasks.core.checkpoint import load_model, save_model_dir
    from slimmoe.tasks.nodes.stage import run_stage
    from slimmoe.tasks.slimming.search import cut, heldout_kl

    cfg = dag.nodes[plan.stage].task_config
    seq = dag.workflow.config.data.seq_len
    short = cfg.with_changes(
        distill_only=True, expert_intermediate_size=None, num_key_value_heads=None, num_experts=None,
        shared_expert_intermediate_size=None, token_budget=opts.distill_steps * cfg.tokens_per_step(seq),
        cut_steps=1, carry_optimizer=False, keep_optimizer_state=False, early_stop_min_improvement=None,
        early_stop_window_tokens=None, early_stop_min_tokens=None, checkpoint_interval=opts.distill_steps + 1)
    device = _device(cfg)
    _, validation = _caches(logits_dir)
    root = Path(tempfile.mkdtemp(prefix="slimmoe-search-"))
    try:
        model = load_model(model_dir, device=device, trust_remote_code=cfg.trust_remote_code,
                           experts_implementation=cfg.experts_kernel_on(device))
        for i, m in enumerate(measured[:opts.top]):
            cut_dir = root / f"cut_{i}"
            save_model_dir(cut(model, scores, m.shape.targets(plan.sizes)), cut_dir, tokenizer_from=model_dir)
        del model
        for i, m in enumerate(measured[:opts.top]):
            started = time.time()
            out = root / f"distilled_{i}"
            run_stage(short, root / f"cut_{i}", logits_dir, out, root / f"work_{i}", teacher_fingerprint=teacher_fp,
                      name=f"search_{i}")
            student = load_model(out, device=device, experts_implementation=cfg.experts_kernel_on(device))
            m.kl_distilled = heldout_kl(student, validation, cfg.early_stop_rows, cfg.micro_batch, device)
            m.distill_seconds = time.time() - started
            del student
            shutil.rmtree(root / f"work_{i}", ignore_errors=True)
            log(f"  {m.shape.label()}: KL {m.kl_cut:.5f} -> {m.kl_distilled:.5f} after {opts.distill_steps} steps")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the workflow it writes ---------------------------------------------------------------------------------

SIZE_FIELDS = ("expert_intermediate_size", "num_key_value_heads", "num_experts")


def searched_raw(loaded, plan: SearchPlan, shape: Shape) -> tuple[dict, list[dict]]:
    """The input workflow (its paths absolute, so it runs from anywhere) with the stages from the searched
    one on at evenly spaced sizes from its input to `shape`; and those stages' targets."""
    from slimmoe.tasks.slimming.search import spread_targets

    from .config import _resolve_paths

    raw = _resolve_paths(loaded.raw, loaded.base_dir)
    stages = raw["stages"]
    cfg = loaded.config.stages[plan.stage_index]
    try:
        spread = spread_targets(plan.sizes, shape.targets(plan.sizes), len(stages) - plan.stage_index,
                                cfg.train_dtype())
    except ValueError as err:
        raise SearchRefused(f"the best shape ({shape.label()}) cannot be reached in {len(stages) - plan.stage_index} "
                            f"stages of shrinking width: {err}") from None
    written = []
    for stage, targets in zip(stages[plan.stage_index:], spread):
        for name in SIZE_FIELDS:
            value = getattr(targets, name)
            if value is None:
                stage.pop(name, None)
            else:
                stage[name] = value
        written.append({name: getattr(targets, name) for name in SIZE_FIELDS})
    return raw, written


def write_searched_workflow(loaded, plan: SearchPlan, shape: Shape, out: Path) -> list[dict]:
    """Write the searched workflow to `out` once `build_dag` accepts it (a temporary name, then a rename)."""
    import yaml

    from .dag import build_dag

    raw, written = searched_raw(loaded, plan, shape)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    header = (f"# written by `slimmoe search` from {loaded.source}: {plan.stage} cut to {shape.label()} "
              f"({shape.total:,} parameters, {shape.active:,} active)\n")
    tmp.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    try:
        build_dag(str(tmp), check_storage=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return written
