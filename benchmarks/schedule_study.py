"""When does multi-stage beat one-stage? A grid of schedules run through the real demo workflow.

Each variant of the grid (`benchmarks/schedule_grid.yaml` by default) is a set of overrides deep-
merged into the demo workflow (`workflows/configs/demo.yaml`; lists such as `stages` are replaced
whole). Every variant keeps the demo's one-stage baseline (the last stage's targets from the teacher
with the stages' summed budget) and may add baselines of its own (a gradual cut, say). A variant
runs once per seed; the seed is set on every stage and one-stage baseline, so it changes the
calibration batches, the data order and the RNG, not the teacher, the data or the logit cache.

All runs share one storage, so the DAG cache computes each teacher, tokenization and logit cache
once, and any stage or evaluation two cells share (the same config and inputs) once. A cell that has
run is read back from the cache: the study resumes where it stopped.

    python benchmarks/schedule_study.py [--grid FILE] [--only NAME ...] [--seeds N ...] [--storage DIR]
                                        [--json-out FILE] [--markdown-out FILE]

Prints JSON (per cell and seed: validation perplexity and KL to the teacher of the multi-stage
result, of the one-stage baseline and of the variant's other baselines; per cell the means, the
spread over seeds, the gap and the win count) and then the Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from slimmoe.workflows.demo import demo_config_path
from slimmoe.workflows.driver import run_workflow

DEFAULT_GRID = Path(__file__).with_name("schedule_grid.yaml")
DEFAULT_STORAGE = Path("~/.cache/slimmoe/schedule_study").expanduser()


def load_grid(path: Path) -> dict[str, dict]:
    grid = yaml.safe_load(path.read_text())
    variants = grid.get("variants") if isinstance(grid, dict) else None
    if not isinstance(variants, dict) or not variants:
        raise SystemExit(f"{path}: expected a mapping `variants:` of name -> {{overrides, seeds, ...}}")
    for name, v in variants.items():
        if not isinstance(v, dict) or not isinstance(v.get("overrides", {}), dict):
            raise SystemExit(f"{path}: variant {name!r} needs `overrides:` as a mapping")
    return variants


def cell_overrides(base: dict, variant: dict, seed: int, storage: Path) -> dict:
    """The variant's overrides with every stage and one-stage baseline seeded, as one override dict."""
    over = copy.deepcopy(variant.get("overrides") or {})
    stages = over.get("stages", base["stages"])
    baselines = over.get("baselines", base.get("baselines", []))
    over["stages"] = [dict(s, seed=seed) for s in stages]
    over["baselines"] = [dict(b, seed=seed) if b.get("kind") == "one_stage" else b for b in baselines]
    over["storage"] = str(storage)
    return over


def _report(results: dict, model: str) -> dict:
    r = json.loads((Path(results[f"evaluate_{model}"].path) / "report.json").read_text())
    return {"perplexity": r["perplexity"], "kl_to_teacher": r.get("kl_to_teacher"),
            "total_params": r["parameters"]["total"]}


def _stage_facts(results: dict, name: str) -> dict:
    m = json.loads((Path(results[name].path) / "metrics.json").read_text())
    facts = {"tokens": m["tokens_seen"], "steps": m["steps_done"]}
    if m.get("early_stop"):
        facts["stopped_at_step"] = m["early_stop"]["stopped_at_step"]
        facts["unspent_tokens"] = m.get("unspent_tokens", 0)
    if m.get("steps", {}).get("inherited_tokens"):
        facts["inherited_tokens"] = m["steps"]["inherited_tokens"]
    if len(m.get("cuts") or []) > 1:
        facts["cuts"] = [(c["step"], c["expert_intermediate_size"]) for c in m["cuts"]]
    if m.get("carried_optimizer"):
        facts["carried_from_step"] = m["carried_optimizer"]["max_step"]
    return facts


def run_cell(config: Path, base: dict, name: str, variant: dict, seed: int, storage: Path) -> dict:
    started = time.time()
    results = run_workflow(config, overrides=cell_overrides(base, variant, seed, storage),
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    stages = [n for n in results if n.startswith("stage_") and results[n].path and
              (Path(results[n].path) / "metrics.json").exists()]
    stages.sort(key=lambda n: int(n.split("_")[1]))
    baselines = [b["name"] for b in cell_overrides(base, variant, seed, storage)["baselines"] if b.get("kind") == "one_stage"]
    multi, one = _report(results, stages[-1]), _report(results, "one_stage")
    if multi["total_params"] != one["total_params"]:
        raise RuntimeError(f"{name} seed {seed}: multi-stage and one-stage sizes differ "
                           f"({multi['total_params']} vs {one['total_params']})")
    return {
        "variant": name, "seed": seed, "teacher_perplexity": _report(results, "teacher")["perplexity"],
        "multi_stage": multi, "one_stage": one,
        "other_baselines": {b: _report(results, b) for b in baselines if b != "one_stage"},
        "stages": {n: _stage_facts(results, n) for n in stages + baselines},
        "seconds": round(time.time() - started, 1),
    }


def _spread(values: list[float]) -> float:
    return round(statistics.stdev(values), 5) if len(values) > 1 else 0.0


def summarize(name: str, variant: dict, runs: list[dict]) -> dict:
    multi = [r["multi_stage"]["perplexity"] for r in runs]
    one = [r["one_stage"]["perplexity"] for r in runs]
    m, o = statistics.fmean(multi), statistics.fmean(one)
    kl_m = statistics.fmean(r["multi_stage"]["kl_to_teacher"] for r in runs)
    kl_o = statistics.fmean(r["one_stage"]["kl_to_teacher"] for r in runs)
    out = {
        "variant": name, "description": variant.get("description", ""), "seeds": [r["seed"] for r in runs],
        "multi_stage_ppl": round(m, 3), "multi_stage_ppl_sd": _spread(multi),
        "one_stage_ppl": round(o, 3), "one_stage_ppl_sd": _spread(one),
        "multi_stage_kl": round(kl_m, 4), "one_stage_kl": round(kl_o, 4),
        "multi_stage_kl_sd": round(_spread([r["multi_stage"]["kl_to_teacher"] for r in runs]), 4),
        "one_stage_kl_sd": round(_spread([r["one_stage"]["kl_to_teacher"] for r in runs]), 4),
        # Positive: multi-stage's perplexity is that much lower (better) than one-stage's.
        "multi_stage_gain_pct": round(100 * (o - m) / o, 2),
        "multi_stage_wins": sum(a < b for a, b in zip(multi, one)),
        # The same on the KL to the teacher, which the next-token term can rank differently: a student
        # trained on text its teacher never saw can beat the teacher's perplexity while moving away from it.
        "multi_stage_kl_gain_pct": round(100 * (kl_o - kl_m) / kl_o, 2),
        "multi_stage_kl_wins": sum(a["multi_stage"]["kl_to_teacher"] < a["one_stage"]["kl_to_teacher"] for a in runs),
        "teacher_ppl": round(statistics.fmean(r["teacher_perplexity"] for r in runs), 3),
    }
    others = sorted({b for r in runs for b in r["other_baselines"]})
    for b in others:
        vals = [r["other_baselines"][b]["perplexity"] for r in runs if b in r["other_baselines"]]
        out[f"{b}_ppl"] = round(statistics.fmean(vals), 3)
    return out


def to_markdown(cells: list[dict]) -> str:
    lines = ["| variant | seeds | multi-stage ppl | one-stage ppl | multi-stage gain | multi wins | KL multi / one | "
             "KL gain | KL wins | other ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cells:
        other = ", ".join(f"{k[:-4]} {v:.2f}" for k, v in c.items() if k.endswith("_ppl") and k[:-4] not in
                          ("multi_stage", "one_stage", "teacher"))
        sd = lambda k: f" ± {c[k]:.2f}" if len(c["seeds"]) > 1 else ""  # noqa: E731
        lines.append(f"| {c['variant']} | {len(c['seeds'])} | {c['multi_stage_ppl']:.2f}{sd('multi_stage_ppl_sd')} | "
                     f"{c['one_stage_ppl']:.2f}{sd('one_stage_ppl_sd')} | {c['multi_stage_gain_pct']:+.2f}% | "
                     f"{c['multi_stage_wins']}/{len(c['seeds'])} | {c['multi_stage_kl']:.4f} / {c['one_stage_kl']:.4f} | "
                     f"{c['multi_stage_kl_gain_pct']:+.2f}% | {c['multi_stage_kl_wins']}/{len(c['seeds'])} | {other or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=DEFAULT_GRID)
    ap.add_argument("--only", nargs="+", help="run only these variants (in the grid's order)")
    ap.add_argument("--seeds", type=int, nargs="+", help="these seeds for every chosen variant instead of the grid's")
    ap.add_argument("--storage", type=Path, default=DEFAULT_STORAGE)
    ap.add_argument("--config", type=Path, default=None, help="the base workflow (default: the demo's)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown-out", type=Path)
    args = ap.parse_args(argv)
    config = (args.config or demo_config_path()).resolve()
    base = yaml.safe_load(config.read_text())
    variants = load_grid(args.grid)
    unknown = sorted(set(args.only or []) - set(variants))
    if unknown:
        raise SystemExit(f"unknown variants {', '.join(unknown)}; the grid has {', '.join(variants)}")
    chosen = [n for n in variants if not args.only or n in args.only]
    runs, cells, failures = [], [], []
    for name in chosen:
        v = variants[name]
        cell_runs = []
        for seed in args.seeds or v.get("seeds", [0]):
            try:
                cell_runs.append(run_cell(config, base, name, v, seed, args.storage.expanduser()))
            except Exception as err:  # one failed cell must not lose the others' results
                failures.append({"variant": name, "seed": seed, "error": f"{type(err).__name__}: {err}"})
                print(json.dumps(failures[-1]), file=sys.stderr, flush=True)
        runs += cell_runs
        if cell_runs:
            cells.append(summarize(name, v, cell_runs))
            print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
    report = {"benchmark": "schedule_study", "config": str(config), "grid": str(args.grid), "cells": cells,
              "failures": failures, "runs": runs}
    markdown = to_markdown(cells)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown_out:
        args.markdown_out.write_text(markdown + "\n")
    print(json.dumps(report, indent=1))
    print(markdown)
    return report


if __name__ == "__main__":
    main()
