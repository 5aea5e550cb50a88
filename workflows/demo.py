"""`slimmoe demo`: the embedded workflow, then the table users want.

Runs `workflows/configs/demo.yaml` (teacher pretraining, tokenize, teacher logits, two SlimMoE
stages, the one-stage baseline, evaluation) and prints one row per model: the teacher, each stage
right after slimming and after distillation, and the one-stage baseline. The table is `slimmoe report`'s
(`workflows/report.py`) with the rows right after slimming added, written to `<storage>/demo/_demo/`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable

from .report import AFTER_DISTILLATION, model_row, report_workflow

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


def _with_rows_after_slimming(rows: list[dict], results, out_root: Path, log) -> list[dict]:
    """Before each distilled model's row, the same model right after its cut: the `pruned/` checkpoint its
    stage keeps, which no node evaluates (what distillation bought is the demo's point)."""
    out = []
    for row in rows:
        if row["when"] == AFTER_DISTILLATION:
            report = _pruned_eval(Path(results[row["model"]].path), results, out_root, log)
            out.append(model_row(row["model"], "after slimming", report))
        out.append(row)
    return out


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
    out_root = Path(results["tokenize"].path).parents[1] / "_demo"
    out_root.mkdir(parents=True, exist_ok=True)
    report, where = report_workflow(config, overrides or None, out=str(out_root),
                                    extend_rows=lambda rows: _with_rows_after_slimming(rows, results, out_root, log))
    return {"rows": report.rows, "markdown": report.markdown(), "verdict": report.verdict, "dir": where}
