"""SlimMoE's central claim in small: multi-stage beats one-stage at the same final size and budget.

Runs the demo workflow (`workflows/configs/demo.yaml`, the very code path of `slimmoe demo`) once
per seed. The seed changes what the stages draw: the calibration batches the scores are taken on,
the order of the distillation data and the RNG. The teacher, its tokenized data and its logit
cache do not depend on the seed, so the DAG cache computes them once and every seed reuses them;
a seed already run is reused too (point --storage at a fresh folder to measure from scratch).

    python benchmarks/quality.py [--seeds 0 1 2] [--storage DIR] [--config demo.yaml] [--json-out FILE]

Prints JSON: per seed, the validation perplexity and KL to the teacher of the last stage of the
multi-stage run and of the one-stage baseline (same final architecture, same total token budget),
and which one won; then the mean over seeds and the count of wins.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from slimmoe.workflows.demo import DEFAULT_STORAGE, demo_config_path, run_demo


def seeded_overrides(config_path: Path, seed: int) -> dict:
    """The config's `stages` and `baselines` lists with every entry's seed set (lists merge whole)."""
    raw = yaml.safe_load(config_path.read_text())
    stages = [dict(s, seed=seed) for s in raw["stages"]]
    baselines = [dict(b, seed=seed) if b.get("kind") == "one_stage" else b for b in raw.get("baselines", [])]
    return {"stages": stages, "baselines": baselines}


def _after_distillation(rows: list[dict], model: str) -> dict:
    return next(r for r in rows if r["model"] == model and r["when"] == "after distillation")


def measure_seed(config_path: Path, storage: Path, seed: int) -> dict:
    started = time.time()
    result = run_demo(storage=storage, config=config_path, overrides=seeded_overrides(config_path, seed),
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    rows = result["rows"]
    stage_names = sorted({r["model"] for r in rows if r["model"].startswith("stage_")})
    multi = _after_distillation(rows, stage_names[-1])
    one = _after_distillation(rows, "one_stage")
    if multi["total_params"] != one["total_params"]:
        raise RuntimeError(f"seed {seed}: the multi-stage and one-stage models differ in size "
                           f"({multi['total_params']} vs {one['total_params']}); the comparison needs equal sizes")
    teacher = next(r for r in rows if r["model"] == "teacher")
    return {
        "seed": seed,
        "teacher_perplexity": teacher["perplexity"],
        "total_params": multi["total_params"], "active_params": multi["active_params"],
        "multi_stage": {"perplexity": multi["perplexity"], "kl_to_teacher": multi["kl_to_teacher"]},
        "one_stage": {"perplexity": one["perplexity"], "kl_to_teacher": one["kl_to_teacher"]},
        "multi_stage_wins": multi["perplexity"] < one["perplexity"],
        "seconds": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--storage", type=Path, default=DEFAULT_STORAGE,
                    help="workflow storage (default: the demo's, so its finished nodes are reused)")
    ap.add_argument("--config", type=Path, default=None, help="a demo-style workflow config (default: demo.yaml)")
    ap.add_argument("--json-out", type=Path, help="also write the JSON here (stdout carries the Ray workers' logs too)")
    args = ap.parse_args(argv)
    config_path = (args.config or demo_config_path()).resolve()
    per_seed = [measure_seed(config_path, args.storage.expanduser(), s) for s in args.seeds]

    def mean(path: tuple[str, str]) -> float:
        return round(statistics.fmean(r[path[0]][path[1]] for r in per_seed), 3)

    report = {
        "benchmark": "quality", "config": str(config_path), "seeds": args.seeds, "per_seed": per_seed,
        "mean": {"multi_stage_perplexity": mean(("multi_stage", "perplexity")),
                 "one_stage_perplexity": mean(("one_stage", "perplexity")),
                 "multi_stage_kl": mean(("multi_stage", "kl_to_teacher")),
                 "one_stage_kl": mean(("one_stage", "kl_to_teacher"))},
        "multi_stage_wins": sum(r["multi_stage_wins"] for r in per_seed),
    }
    text = json.dumps(report, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
