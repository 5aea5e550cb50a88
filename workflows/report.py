"""`slimmoe report CONFIG`: a workflow's results in one table and one plot, from the nodes that completed.

One row per evaluated model (total and active parameters, validation perplexity, KL to the teacher,
lm-eval scores where the evaluate node ran lm-eval tasks, tokens/s) from each complete evaluate node's
`report.json`; the distillation curves (KL vs tokens) from the stages' `metrics.json` histories: the
stages back to back, and each distilling baseline on its own. Where the workflow has a one_stage
baseline, a verdict line compares it with the last stage. Nodes that are not complete are listed, not
an error: the report of a half-finished run is useful.

Written as `report.md`, `report.json` and `curves.png` to `<storage>/<workflow>/_report/` (or any other
local directory or URI). `slimmoe demo` builds its table here too, adding its rows right after slimming.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from slimmoe.tasks.core.storage import write_bytes_atomic, write_json_atomic
from slimmoe.tasks.data.formats import STAGE_METRICS

from .dag import Dag, build_dag
from .driver import Driver, _storage_reads
from .storage import Store

REPORT_DIR = "_report"  # node names cannot start with "_": no node's outputs live there
MARKDOWN, JSON, PLOT = "report.md", "report.json", "curves.png"
MULTI_STAGE = "multi-stage"
AFTER_DISTILLATION = "after distillation"


class ReportError(ValueError):
    """Nothing to report yet; one line naming what to run."""


@dataclass
class Report:
    workflow: str
    rows: list[dict]  # one per evaluated model (see `model_row`)
    missing: list[dict]  # {"node", "state"} of every node whose output is not complete
    curves: dict[str, list[list[float]]]  # label -> [tokens, KL] points
    last_stage: Optional[str] = None
    baseline: Optional[str] = None  # the one_stage baseline the last stage is compared with

    @property
    def verdict(self) -> Optional[str]:
        return verdict_line(self.rows, self.last_stage, self.baseline)

    def markdown(self) -> str:
        parts = [to_markdown(self.rows)]
        if self.verdict:
            parts.append(self.verdict)
        if self.missing:
            listed = ", ".join(f"{m['node']} ({m['state']})" for m in self.missing)
            parts.append(f"Not complete yet (left out above): {listed}.")
        return "\n\n".join(parts)

    def to_json(self) -> dict:
        return {"workflow": self.workflow, "rows": self.rows, "verdict": self.verdict, "missing": self.missing,
                "curves": self.curves}


# -- rows ----------------------------------------------------------------------------------------


def model_row(model: str, when: str, report: dict) -> dict:
    """One table row from an evaluate node's `report.json`."""
    params = report.get("parameters", {})
    return {
        "model": model, "when": when, "total_params": params.get("total"), "active_params": params.get("active"),
        "perplexity": report.get("perplexity"), "kl_to_teacher": report.get("kl_to_teacher"),
        "tokens_per_s": (report.get("throughput") or {}).get("tokens_per_s"),
        "lm_eval": {task: _numbers(res.get("metrics") or {}) for task, res in (report.get("lm_eval") or {}).items()},
    }


def _numbers(metrics: dict) -> dict:
    # lm-eval's results also hold the task's alias and sample counts' text: only scores go in a table.
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _headline(metrics: dict) -> Optional[tuple[str, float]]:
    """A task's first score that is not a standard error (lm-eval lists the main metric first)."""
    return next(((k, v) for k, v in metrics.items() if "stderr" not in k), None)


def _lm_eval_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) per lm-eval task any row has, in the order first met."""
    columns: dict[str, str] = {}
    for r in rows:
        for task, metrics in (r.get("lm_eval") or {}).items():
            if task not in columns and (head := _headline(metrics)):
                columns[task] = head[0]
    return list(columns.items())


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def to_markdown(rows: list[dict]) -> str:
    lm_eval = _lm_eval_columns(rows)
    header = "| model | when | total params | active params | val ppl | KL to teacher | tokens/s |"
    header += "".join(f" {task} {metric.split(',')[0]} |" for task, metric in lm_eval)
    lines = [header, "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(lm_eval)]
    for r in rows:
        scores = "".join(f" {_fmt((r.get('lm_eval') or {}).get(task, {}).get(metric), '.4f')} |"
                         for task, metric in lm_eval)
        lines.append(f"| {r['model']} | {r['when']} | {_fmt(r['total_params'], ',')} | {_fmt(r['active_params'], ',')} | "
                     f"{_fmt(r['perplexity'], '.2f')} | {_fmt(r['kl_to_teacher'], '.4f')} | {_fmt(r['tokens_per_s'], '.0f')} |"
                     + scores)
    return "\n".join(lines)


def verdict_line(rows: list[dict], last_stage: str | None, baseline: str | None) -> str | None:
    """One sentence on what this run shows: the multi-stage result against the one-stage baseline, on
    validation perplexity and on KL to the teacher. The two can disagree (the next-token term lets a
    student beat its teacher's perplexity while drifting from it), and then the sentence says "mixed"
    rather than let one measure speak for both."""
    def final(model):
        return next((r for r in rows if r["model"] == model and r["when"] == AFTER_DISTILLATION), None)

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


# -- reading a workflow's outputs -------------------------------------------------------------------


def _stage_metrics(dag: Dag, name: str) -> dict:
    # Only this file: reading it through `local_input` would download the stage's whole model.
    text = dag.store.read_text(dag.store.sub(dag.output_path(name), STAGE_METRICS))
    return json.loads(text) if text else {}


def _kl_points(metrics: dict, offset: int = 0) -> list[list[float]]:
    return [[offset + h["tokens"], h["kl"]] for h in metrics.get("history", []) if h.get("kl") is not None]


def _curves(dag: Dag, done: set[str]) -> dict[str, list[list[float]]]:
    """KL vs tokens seen: the stages back to back (up to the first that is not complete: the ones after it
    have no place on a shared token axis), and each distilling baseline (one_stage, a trimmed model's
    distillation) on its own."""
    multi, offset = [], 0
    for name in dag.workflow.config.stage_names():
        if name not in done:
            break
        metrics = _stage_metrics(dag, name)
        multi += _kl_points(metrics, offset)
        offset += metrics.get("tokens_seen", 0)
    curves = {MULTI_STAGE: multi} if multi else {}
    for name, node in dag.nodes.items():
        if node.kind == "stage" and node.section[0] == "baselines" and name in done:
            if points := _kl_points(_stage_metrics(dag, name)):
                curves[name] = points
    return curves


def _collect(dag: Dag, driver: Driver) -> Report:
    states = {r["node"]: r["state"] for r in driver.status()}
    done = {n for n, state in states.items() if state == "done"}
    evaluated = [n for n, node in dag.nodes.items() if node.kind == "evaluate"]
    if not evaluated:
        raise ReportError(f"workflow {dag.name!r} evaluates no model, so there is nothing to report: add an "
                          "`evaluate:` section to its config and run it")
    if not done & set(evaluated):
        where = ", ".join(f"{n} ({states[n]})" for n in evaluated)
        raise ReportError(f"no evaluate node of workflow {dag.name!r} is complete yet ({where}): run `slimmoe run "
                          "CONFIG` first (`slimmoe status CONFIG` shows where it stands)")
    rows = []
    for name in evaluated:
        if name in done:
            model = dag.nodes[name].inputs["model"]
            when = AFTER_DISTILLATION if dag.nodes[model].kind == "stage" else "-"
            report = json.loads((Path(driver.local_input(name)) / "report.json").read_text())
            rows.append(model_row(model, when, report))
    cfg = dag.workflow.config
    stages = cfg.stage_names()
    return Report(workflow=dag.name, rows=rows, curves=_curves(dag, done),
                  missing=[{"node": n, "state": s} for n, s in states.items() if s != "done"],
                  last_stage=stages[-1] if stages else None,
                  baseline=next((b.name for b in cfg.baselines if b.kind == "one_stage"), None))


# -- writing ---------------------------------------------------------------------------------------------


def _plot(report: Report) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in report.curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("KL(teacher || student), training batches")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"{report.workflow}: distillation curves")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def write_report(report: Report, store: Store, path: str) -> None:
    """`report.md`, `report.json` and `curves.png` (when there is a curve to draw) under `path` of `store`.
    A URI store gets them uploaded from a local temporary directory: it has no byte writer of its own."""
    local = store.local_path(path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(local or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / MARKDOWN, (report.markdown() + "\n").encode())
        write_json_atomic(folder / JSON, report.to_json())
        if report.curves:
            write_bytes_atomic(folder / PLOT, _plot(report))
        store.upload_dir(folder, path)
    if not report.curves:  # a plot left by an earlier report would no longer match the table
        store.delete_file(store.sub(path, PLOT))


def report_workflow(config, overrides: dict | None = None, out: str | None = None,
                    extend_rows: Callable[[list[dict]], list[dict]] | None = None) -> tuple[Report, str]:
    """Read the report of a workflow (a YAML path, a dict, ...) from its complete nodes and write it to
    `out` (a local directory or a URI; default `<storage>/<workflow>/_report`). `extend_rows`: rows the
    caller adds (the demo's models right after slimming). Returns the report and where it went.
    Raises ReportError when no evaluate node is complete."""
    dag = build_dag(config, overrides, check_storage=False)
    with _storage_reads(dag):
        report = _collect(dag, Driver(dag, log=lambda _line: None, command="report"))
    if extend_rows is not None:
        report.rows = extend_rows(report.rows)
    store = Store(out) if out else dag.store
    path = store.root if out else store.join(dag.name, REPORT_DIR)
    write_report(report, store, path)
    return report, store.display(path)


__all__ = ["Report", "ReportError", "model_row", "report_workflow", "to_markdown", "verdict_line", "write_report"]
