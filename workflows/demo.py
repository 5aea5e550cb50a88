"""`slimmoe demo`: the embedded workflow, then the table users want.

Runs `workflows/configs/demo.yaml` (teacher pretraining, tokenize, teacher logits, two SlimMoE
stages, the one-stage baseline, evaluation) and prints one row per model: the teacher, each stage
right after slimming and after distillation, and the one-stage baseline. The table is written as
Markdown and JSON next to the outputs, with a PNG of the distillation curves (KL vs tokens).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable

from slimmoe.tasks.core.storage import write_json_atomic

DEMO_CONFIG = "demo.yaml"
DEFAULT_STORAGE = Path("~/.cache/slimmoe/runs").expanduser()


def demo_config_path() -> Path:
    return Path(str(resources.files("slimmoe.workflows.configs") / DEMO_CONFIG))


def _pruned_eval(stage_path: Path, results, out_root: Path, log) -> dict:
    """Evaluate a stage's not-yet-distilled checkpoint (cached beside the demo's table)."""
    from slimmoe.tasks.evaluation.config import EvaluateConfig
    from slimmoe.tasks.nodes.evaluate import run_evaluate

    out = out_root / "pruned_eval" / stage_path.name
    report = out / "report.json"
    if not report.exists():
        log(f"evaluating {stage_path / 'pruned'} (right after slimming)")
        run_evaluate(EvaluateConfig(max_rows=256, batch_size=16), stage_path / "pruned",
                     results["tokenize"].path, results["teacher_logits"].path, out)
    return json.loads(report.read_text())


def _row(model: str, when: str, report: dict) -> dict:
    params = report.get("parameters", {})
    return {
        "model": model, "when": when, "total_params": params.get("total"), "active_params": params.get("active"),
        "perplexity": report.get("perplexity"), "kl_to_teacher": report.get("kl_to_teacher"),
        "tokens_per_s": (report.get("throughput") or {}).get("tokens_per_s"),
    }


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | when | total params | active params | val ppl | KL to teacher | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['when']} | {_fmt(r['total_params'], ',')} | {_fmt(r['active_params'], ',')} | "
                     f"{_fmt(r['perplexity'], '.2f')} | {_fmt(r['kl_to_teacher'], '.4f')} | {_fmt(r['tokens_per_s'], '.0f')} |")
    return "\n".join(lines)


def verdict_line(rows: list[dict], last_stage: str | None, baseline: str | None) -> str | None:
    """One sentence on what this run shows: the multi-stage result against the one-stage baseline, on
    validation perplexity and on KL to the teacher. The two can disagree (the next-token term lets a
    student beat its teacher's perplexity while drifting from it), and then the sentence says "mixed"
    rather than let one measure speak for both."""
    def final(model):
        return next((r for r in rows if r["model"] == model and r["when"] == "after distillation"), None)

    multi, one = (final(last_stage), final(baseline)) if last_stage and baseline else (None, None)
    if not multi or not one or multi["perplexity"] is None or one["perplexity"] is None:
        return None
    m, o = multi["perplexity"], one["perplexity"]
    measures = [("validation perplexity", m, o, ".2f")]
    if multi.get("kl_to_teacher") is not None and one.get("kl_to_teacher") is not None:
        measures.append(("KL to the teacher", multi["kl_to_teacher"], one["kl_to_teacher"], ".4f"))
    leaders = {"multi-stage" if a < b else "one-stage" if b < a else "neither" for _, a, b, _ in measures}
    facts = "; ".join(f"{name}: multi-stage {a:{f}} ({last_stage}), one-stage {b:{f}} ({baseline})"
                      for name, a, b, f in measures)
    if len(leaders) == 1 and leaders != {"neither"}:
        (winner,) = leaders
        both = "both measures" if len(measures) == 2 else "validation perplexity"
        return f"This run: {winner} wins on {both} at the same size and token budget; {facts}."
    return f"This run: mixed at the same size and token budget (the measures disagree); {facts}."


def _curves(results, stage_names: list[str], baseline: str | None) -> dict[str, list[tuple[int, float]]]:
    """KL vs tokens seen: the multi-stage run's stages back to back, and the one-stage baseline."""
    curves: dict[str, list[tuple[int, float]]] = {"multi-stage": []}
    offset = 0
    for name in stage_names:
        m = json.loads((Path(results[name].path) / "metrics.json").read_text())
        curves["multi-stage"] += [(offset + h["tokens"], h["kl"]) for h in m["history"]]
        offset += m["tokens_seen"]
    if baseline:
        m = json.loads((Path(results[baseline].path) / "metrics.json").read_text())
        curves["one-stage"] = [(h["tokens"], h["kl"]) for h in m["history"]]
    return curves


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("KL(teacher || student), training batches")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SlimMoE demo: multi-stage vs one-stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(storage: Path | None = None, config: Path | None = None, log: Callable[[str], None] = print,
             overrides: dict | None = None) -> dict:
    """Run the demo workflow and build its table. `overrides` are deep-merged into the config
    (benchmarks/quality.py uses them to vary the stages' seeds)."""
    from .driver import run_workflow

    config = config or demo_config_path()
    overrides = dict(overrides or {})
    if storage:
        overrides["storage"] = str(storage)
    results = run_workflow(config, overrides=overrides or None, log=log)
    stage_names = sorted(n for n in results if n.startswith("stage_"))
    baseline = "one_stage" if "one_stage" in results else None
    out_root = Path(results["tokenize"].path).parents[1] / "_demo"
    out_root.mkdir(parents=True, exist_ok=True)

    def evaluated(model: str) -> dict:
        return json.loads((Path(results[f"evaluate_{model}"].path) / "report.json").read_text())

    rows = [_row("teacher", "-", evaluated("teacher"))]
    for name in stage_names + ([baseline] if baseline else []):
        rows.append(_row(name, "after slimming", _pruned_eval(Path(results[name].path), results, out_root, log)))
        rows.append(_row(name, "after distillation", evaluated(name)))
    table = to_markdown(rows)
    verdict = verdict_line(rows, stage_names[-1] if stage_names else None, baseline)
    if verdict:
        table += "\n\n" + verdict
    (out_root / "results.md").write_text(table + "\n")
    write_json_atomic(out_root / "results.json", {"rows": rows})
    curves = _curves(results, stage_names, baseline)
    _plot(curves, out_root / "distillation_curves.png")
    return {"rows": rows, "markdown": table, "verdict": verdict, "dir": str(out_root)}
