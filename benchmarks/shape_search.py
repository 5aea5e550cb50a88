"""Does `slimmoe search` find better shapes than the demo's hand-picked one, and is its cheap score a guide?

On the demo teacher (`workflows/configs/demo.yaml`), per seed:
1. at the demo's final size (total and active parameters of its stage_2: 25 % width, KV 1, 8 experts) the
   search's top shape against the hand-picked one, each distilled by the demo's one-stage baseline (the
   same budget): final KL to the teacher and perplexity;
2. at a total-parameter target 30 % below that with the same active parameters: the best measured shape
   that drops experts against the best that keeps all 8;
3. over the candidates of (1): the rank correlation of the one-shot KL, and of the KL after the short
   distillation, with the KL after the full one-stage distillation.

    python benchmarks/shape_search.py [--seeds 0 1 2] [--storage DIR] [--candidates 6] [--distill-steps 8]
                                      [--budget-scale 1.0] [--smoke] [--json-out FILE] [--markdown-out FILE]

`--smoke` shrinks the teacher, data and budgets to minutes on two CPU cores (the numbers then say only
that the study runs). Prints JSON, then the Markdown table. All runs share one storage, so a rerun reads
every finished node back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from slimmoe.tasks.slimming.search import SearchConfig, count_function, rank_correlation
from slimmoe.workflows.dag import build_dag
from slimmoe.workflows.demo import demo_config_path
from slimmoe.workflows.driver import Driver, run_workflow
from slimmoe.workflows.search import input_config, plan_search, search_workflow, write_searched_workflow

DEFAULT_STORAGE = Path("~/.cache/slimmoe/shape_search").expanduser()
SMOKE_TEACHER = dict(max_text_bytes=300_000, vocab_size=512, hidden_size=64, num_layers=2, num_experts=8,
                     experts_per_token=2, expert_intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                     seq_len=64, batch_size=8, max_steps=60, eval_every=0, num_threads=1)


def base_workflow(storage: Path, seed: int, budget_scale: float, smoke: bool) -> dict:
    """The demo workflow, seeded, its budgets scaled; with `smoke` at test size (stage targets follow the width)."""
    cfg = yaml.safe_load(demo_config_path().read_text())
    cfg["storage"] = str(storage)
    if smoke:
        cfg["pretrain_teacher"] = dict(cfg["pretrain_teacher"], **SMOKE_TEACHER)
        cfg["data"] = {"source": "${PYTHON_STDLIB}/[a-c]*.py", "seq_len": 64, "validation_fraction": 0.2}
        cfg["logits"] = {"k": 16, "batch_size": 16}
        cfg["evaluate"] = {"max_rows": 32, "batch_size": 8, "throughput_repeats": 1, "throughput_warmup": 0}
    width = cfg["pretrain_teacher"]["expert_intermediate_size"]
    for i, stage in enumerate(cfg["stages"]):
        stage["seed"] = seed
        stage["expert_intermediate_size"] = width // (2 if i == 0 else 4)
        stage["token_budget"] = max(stage["micro_batch"] * cfg["data"]["seq_len"],
                                    int(stage["token_budget"] * budget_scale))
        if "early_stop_window_tokens" in stage:
            stage["early_stop_window_tokens"] = max(1, int(stage["early_stop_window_tokens"] * budget_scale))
            if stage["early_stop_window_tokens"] >= stage["token_budget"]:
                for key in ("early_stop_window_tokens", "early_stop_min_improvement"):
                    stage.pop(key)
        if smoke:
            stage.update(micro_batch=8, calibration_batches=2, early_stop_rows=16)
    cfg["baselines"] = [dict(b, seed=seed) for b in cfg["baselines"]]
    return cfg


def _evaluated(config: Path, node: str = "one_stage") -> dict:
    """Run the one-stage baseline at the workflow's final shape and its evaluation; its KL and perplexity."""
    dag = build_dag(str(config))
    name = f"evaluate_{node}"
    run_workflow(str(config), log=lambda s: None, targets=set(dag.ancestors(name)) | {name})
    report = json.loads((Path(Driver(dag, log=lambda s: None).local_input(name)) / "report.json").read_text())
    return {"kl": report["kl_to_teacher"], "perplexity": report["perplexity"]}


def run_seed(root: Path, seed: int, args) -> dict:
    storage = args.storage
    raw = base_workflow(storage, seed, args.budget_scale, args.smoke)
    hand = root / f"hand_seed{seed}.yaml"
    hand.write_text(yaml.safe_dump(raw, sort_keys=False))
    dag = build_dag(str(hand))
    # The hand-picked final shape's counts: what stage_2 (and the one-stage baseline) produce.
    sizes = plan_search(dag, SearchConfig(target_params=1e15, candidates=1)).sizes
    last = dag.workflow.config.stages[-1]
    counts = count_function(input_config(dag.workflow, dag, 0), sizes)
    total, active = counts(last.expert_intermediate_size, sizes.num_experts,
                           last.num_key_value_heads or sizes.num_key_value_heads)
    out = {"seed": seed, "hand_picked": {"shape": [last.expert_intermediate_size, sizes.num_experts,
                                                   last.num_key_value_heads], "total": total, "active": active}}
    # 1. the search's best shape at the demo's final size against the hand-picked one, same distillation.
    opts = SearchConfig(target_params=total, target_active_params=active, candidates=args.candidates,
                        top=args.candidates, distill_steps=args.distill_steps)
    found = search_workflow(str(hand), opts, out=root / f"searched_seed{seed}.yaml", log=lambda s: None)
    out["search"] = found.as_dict()
    out["hand_picked"].update(_evaluated(hand))
    out["searched"] = {"shape": found.best.shape.label(), **_evaluated(found.out)}
    # 3. every candidate fully distilled (the one-stage budget): does the cheap score rank them alike?
    full = []
    for i, m in enumerate(found.measured):
        path = root / f"candidate{i}_seed{seed}.yaml"
        write_searched_workflow(dag.workflow, found.plan, m.shape, path)
        full.append(_evaluated(path)["kl"])
    out["rank_correlation"] = {
        "one_shot_vs_full": rank_correlation([m.kl_cut for m in found.measured], full),
        "short_vs_full": rank_correlation([m.kl_distilled for m in found.measured], full)
        if args.distill_steps else None}
    out["full_kl"] = full
    # 2. 30 % fewer total parameters, the same active: dropping experts against keeping them all.
    lean = SearchConfig(target_params=0.7 * total, target_active_params=active, candidates=args.candidates)
    try:
        lean_found = search_workflow(str(hand), lean, out=root / f"lean_seed{seed}.yaml", log=lambda s: None)
        drops = [m for m in lean_found.measured if m.shape.num_experts < sizes.num_experts]
        keeps = [m for m in lean_found.measured if m.shape.num_experts == sizes.num_experts]
        out["lean"] = {"drops_experts": drops[0].as_dict() if drops else None,
                       "keeps_experts": keeps[0].as_dict() if keeps else None}
    except ValueError as err:
        out["lean"] = {"refused": str(err)}
    return out


def _mean_spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def to_markdown(runs: list[dict]) -> str:
    lines = ["| | KL to teacher | perplexity |", "|---|---|---|"]
    for key, label in (("hand_picked", "hand-picked (25 % width, KV 1, all experts)"), ("searched", "search's top shape")):
        lines.append(f"| {label} | {_mean_spread([r[key]['kl'] for r in runs])} | "
                     f"{_mean_spread([r[key]['perplexity'] for r in runs])} |")
    lines += ["", "| rank correlation with the full distillation's KL | mean |", "|---|---|",
              f"| one-shot KL | {_mean_spread([r['rank_correlation']['one_shot_vs_full'] for r in runs])} |",
              f"| KL after the short distillation | {_mean_spread([r['rank_correlation']['short_vs_full'] for r in runs])} |",
              "", "| 30 % fewer total parameters | KL (one-shot) |", "|---|---|"]
    for key in ("drops_experts", "keeps_experts"):
        lines.append(f"| best that {key.replace('_', ' ')} | "
                     f"{_mean_spread([(r['lean'].get(key) or {}).get('kl_cut') for r in runs])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--storage", type=Path, default=DEFAULT_STORAGE)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--distill-steps", type=int, default=8)
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply the demo's token budgets")
    ap.add_argument("--smoke", action="store_true", help="test-size teacher and data: runs in minutes")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown-out", type=Path)
    args = ap.parse_args(argv)
    root = args.storage / "_configs"
    root.mkdir(parents=True, exist_ok=True)
    runs = [run_seed(root, seed, args) for seed in args.seeds]
    result = {"runs": runs, "markdown": to_markdown(runs)}
    print(json.dumps(result, indent=2, default=str))
    print(result["markdown"])
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str))
    if args.markdown_out:
        args.markdown_out.write_text(result["markdown"] + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
