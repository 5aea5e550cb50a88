"""Every module `tasks/` and `workflows/` import at run time comes with `pip install slimmoe` (a base
dependency or one of theirs), or is optional behind one clear error that names the extra to install.

CI installs the `dev` extra, so a module missing from the base dependencies would pass every other
test and fail only on a cluster image built with `pip install .`."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Imported only behind an error that names the extra to install: module -> extra.
OPTIONAL = {"lm_eval": "eval", "wandb": "wandb"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def base_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions `pip install` brings for `requirements`: them and, transitively, what they
    require (markers that name an extra are not followed)."""
    todo, seen = [_name(r) for r in requirements], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r and "extra==" not in r]
    return seen


def imported_modules() -> dict[str, list[str]]:
    """Top-level modules imported anywhere in tasks/ and workflows/ (function-level imports too),
    with where."""
    out: dict[str, list[str]] = {}
    for path in sorted([*ROOT.glob("tasks/**/*.py"), *ROOT.glob("workflows/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "slimmoe":
                    out.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def missing_from(requirements: list[str]) -> dict[str, list[str]]:
    closure = installed_closure(requirements)
    distributions = metadata.packages_distributions()
    missing = {}
    for module, where in imported_modules().items():
        if module in OPTIONAL:
            continue
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        if not dists & closure:
            missing[module] = where
    return missing


def test_every_runtime_import_is_a_base_dependency():
    missing = missing_from(base_requirements())
    assert not missing, ("imported by tasks/ or workflows/ but not installed by `pip install slimmoe`: "
                         + "; ".join(f"{m} ({', '.join(w[:3])})" for m, w in missing.items()))


def test_the_check_fails_when_accelerate_is_dropped():
    """fsdp's meta-device build and the multi-GPU teacher's device_map need accelerate."""
    without = [r for r in base_requirements() if _name(r) != "accelerate"]
    assert "accelerate" in missing_from(without)


def test_a_workflow_asking_for_lm_eval_without_it_is_refused_naming_the_extra(ws, monkeypatch):
    """Else the run trains every stage and then records the tasks as unavailable."""
    import importlib.util

    from standins import make_teacher, workflow_dict, write_config
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.dag import build_dag

    make_teacher(ws / "teacher")
    cfg = workflow_dict(ws)
    cfg["evaluate"]["lm_eval_tasks"] = "arc_easy"
    path = write_config(ws, cfg)
    assert build_dag(path).nodes["evaluate_stage_3"]  # installed here (the dev extra)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    with pytest.raises(WorkflowConfigError, match=r"evaluate.lm_eval_tasks: lm-eval tasks need lm_eval, which this "
                                                   r"environment lacks: .*slimmoe\[eval\]"):
        build_dag(path)
