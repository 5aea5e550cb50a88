"""Stand-in node kinds for the driver tests: small but real tasks that take the real task configs,
read their inputs, write outputs, and (the stage) checkpoint progress to the stable work dir, so a
killed run can resume.

`install()` registers them under the real kind names and returns what it replaced; `uninstall()`
puts the real kinds back. A subprocess gets them with `PYTHONPATH=tests/standin_site`, whose
`sitecustomize` installs them at interpreter start. Environment: STANDIN_CALLS (a file each call's
node name is appended to), STANDIN_FAIL (a node name that raises), STANDIN_SLOW (`node:seconds`,
the pause per stage step), STANDIN_RAY_EVAL=1 (evaluate inside a Ray task).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from slimmoe.workflows.nodes import NodeKind, get_node_kind, register_node_kind

_REPLACED: dict[str, NodeKind] = {}


def _digest(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _record(ctx):
    calls = os.environ.get("STANDIN_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(ctx.name + "\n")
    if os.environ.get("STANDIN_FAIL") == ctx.name:
        raise RuntimeError(f"stand-in {ctx.name} told to fail")


def _read_dir(path) -> str:
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in (".txt", ".json"))
    return _digest(*[(f.name, f.read_text()) for f in files])


def _step_seconds(name: str) -> float:
    node, _, seconds = os.environ.get("STANDIN_SLOW", "").partition(":")
    return float(seconds) if node == name else 0.0


def run_tok(ctx):
    _record(ctx)
    text = _digest(ctx.config.source, ctx.config.seq_len, _read_dir(ctx.inputs["tokenizer"]))
    (ctx.out_dir / "tokens.txt").write_text(text)
    return {"tokens": 64 * ctx.config.seq_len}


def run_logits(ctx):
    _record(ctx)
    tokens = (Path(ctx.inputs["tokens"]) / "tokens.txt").read_text()
    (ctx.out_dir / "logits.txt").write_text(_digest(tokens, ctx.config.k, _read_dir(ctx.inputs["teacher"])))
    return {"rows": 64}


def run_stage(ctx):
    _record(ctx)
    cfg, work = ctx.config, Path(ctx.work_dir)
    state_file = work / "progress.json"
    state = {"step": 0, "acc": _digest(_read_dir(ctx.inputs["model"]), _read_dir(ctx.inputs["logits"]),
                                       cfg.expert_intermediate_size, cfg.num_key_value_heads, cfg.lr)}
    if state_file.exists():
        state = json.loads(state_file.read_text())
        ctx.log(f"stand-in {ctx.name} resumed from step {state['step']} in {work}")
    while state["step"] < cfg.token_budget:
        time.sleep(_step_seconds(ctx.name))
        state = {"step": state["step"] + 1, "acc": _digest(state["acc"], state["step"])}
        tmp = work / "progress.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_file)
    (ctx.out_dir / "model.txt").write_text(state["acc"])
    return {"val_loss": int(state["acc"][:6], 16) / 16**6, "steps": state["step"]}


def _digest_remote(a, b):
    return _digest(a, b)


def run_eval(ctx):
    _record(ctx)
    if os.environ.get("STANDIN_RAY_EVAL") == "1":  # proves the driver reached the cluster
        import ray

        text = ray.get(ray.remote(_digest_remote).remote(_read_dir(ctx.inputs["model"]), ctx.config.max_rows))
        (ctx.out_dir / "report.json").write_text(json.dumps({"digest": text}))
        return {"perplexity": 1 + int(text[:6], 16) / 16**6, "ray_nodes": len(ray.nodes())}
    text = _digest(_read_dir(ctx.inputs["model"]), _read_dir(ctx.inputs["tokens"]), ctx.config.max_rows)
    (ctx.out_dir / "report.json").write_text(json.dumps({"digest": text}))
    return {"perplexity": 1 + int(text[:6], 16) / 16**6}


def install() -> None:
    """Replace the real tokenize, teacher_logits, stage and evaluate kinds by the stand-ins."""
    standins = {"tokenize": (run_tok, {}), "teacher_logits": (run_logits, {}),
                "stage": (run_stage, {"uses_work_dir": True, "headline": ("val_loss",)}),
                "evaluate": (run_eval, {"headline": ("perplexity",)})}
    for name, (run, extra) in standins.items():
        real = _REPLACED.get(name) or get_node_kind(name)
        _REPLACED[name] = real
        # The real kind's version, config class and ignored fields: keys are computed exactly as in production.
        register_node_kind(NodeKind(name, real.version, run, real.config_class,
                                    uses_ray=os.environ.get("STANDIN_RAY_EVAL") == "1" and name == "evaluate",
                                    key_ignore=real.key_ignore, **extra), replace=True)


def uninstall() -> None:
    for kind in _REPLACED.values():
        register_node_kind(kind, replace=True)
    _REPLACED.clear()
