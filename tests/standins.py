"""Stand-in node kinds for the driver tests: small but real tasks that take the real task configs,
read their inputs, write outputs, and (the stage) checkpoint progress to the stable work dir, so a
killed run can resume.

`install()` registers them under the real kind names and returns what it replaced; `uninstall()`
puts the real kinds back. A subprocess gets them with `PYTHONPATH=tests/standin_site`, whose
`sitecustomize` installs them at interpreter start. Environment: STANDIN_CALLS (a file each call's
node name is appended to), STANDIN_FAIL (a node name that raises), STANDIN_SLOW (`node:seconds`,
the pause per stage step), STANDIN_RAY_EVAL=1 (evaluate inside a Ray task).

Below them, the small workflow the driver-level tests (driver, config, validation, plan, submit, S3)
run: `workflow_dict` / `write_config`, a stand-in teacher directory, and helpers to read the calls
and SIGKILL a run mid-stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
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


def _rows() -> dict | None:
    """STANDIN_ROWS=`train:validation`: the rows the stand-in data outputs say they hold, in manifests
    shaped like the real ones' (what validation reads of a finished output)."""
    spec = os.environ.get("STANDIN_ROWS")
    return dict(zip(("train", "validation"), map(int, spec.split(":")))) if spec else None


def run_tok(ctx):
    _record(ctx)
    text = _digest(ctx.config.source, ctx.config.seq_len, _read_dir(ctx.inputs["tokenizer"]))
    (ctx.out_dir / "tokens.txt").write_text(text)
    if (rows := _rows()) is not None:
        splits = {split: {"rows": n} for split, n in rows.items()}
        (ctx.out_dir / "manifest.json").write_text(json.dumps({"kind": "tokenized_dataset", "splits": splits}))
    return {"tokens": 64 * ctx.config.seq_len}


def run_logits(ctx):
    _record(ctx)
    tokens = (Path(ctx.inputs["tokens"]) / "tokens.txt").read_text()
    (ctx.out_dir / "logits.txt").write_text(_digest(tokens, ctx.config.k, _read_dir(ctx.inputs["teacher"])))
    for split, n in (_rows() or {}).items():
        (ctx.out_dir / split).mkdir()
        (ctx.out_dir / split / "manifest.json").write_text(json.dumps({"kind": "logit_cache", "rows": n}))
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
    # As a real stage's model dir has: the size it cut to, the file a hand edit would change.
    (ctx.out_dir / "config.json").write_text(json.dumps({"expert_intermediate_size": cfg.expert_intermediate_size}))
    _write_stage_metrics(ctx, state)
    return {"val_loss": int(state["acc"][:6], 16) / 16**6, "steps": state["step"]}


STANDIN_STEP_TOKENS = 4096  # the tokens a stand-in stage step stands for in its metrics.json


def _write_stage_metrics(ctx, state) -> None:
    """A real stage's metrics.json (`StageMetrics`), with a falling KL per step derived from the final state
    (so a resumed stage writes the same file as an uninterrupted one)."""
    from slimmoe.tasks.data.formats import STAGE_METRICS, StageMetrics

    base = 0.05 + int(state["acc"][6:10], 16) / 16**4
    history = [{"step": i, "tokens": i * STANDIN_STEP_TOKENS, "loss": round(2 * base + 1 / i, 6),
                "kl": round(base + 1 / i, 6), "lr": 1e-3} for i in range(1, state["step"] + 1)]
    metrics = StageMetrics(stage=ctx.name, steps_done=state["step"], tokens_seen=state["step"] * STANDIN_STEP_TOKENS,
                           history=history)
    (ctx.out_dir / STAGE_METRICS).write_text(json.dumps(metrics.model_dump(mode="json"), indent=2))


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
    report = _eval_report(ctx, text)
    (ctx.out_dir / "report.json").write_text(json.dumps(report))
    return {"perplexity": report["perplexity"]}


def _eval_report(ctx, text: str) -> dict:
    """The fields of a real evaluate report.json that readers use, with numbers derived from the inputs'
    digest; parameters follow the model's expert size, as a cut's do."""
    config = Path(ctx.inputs["model"]) / "config.json"
    size = json.loads(config.read_text()).get("expert_intermediate_size", 64) if config.is_file() else 64
    score = int(text[6:12], 16) / 16**6
    lm_eval = {task: {"status": "ok", "metrics": {"alias": task, "acc,none": round(0.25 + score / 2 + i / 100, 6),
                                                  "acc_stderr,none": 0.01}}
               for i, task in enumerate(ctx.config.lm_eval_tasks)}
    return {"kind": "evaluate", "digest": text, "perplexity": 1 + int(text[:6], 16) / 16**6,
            "kl_to_teacher": round(0.01 + score / 10, 6), "top1_agreement": round(1 - score / 2, 6),
            "parameters": {"total": 10_000 + 1_000 * size, "active": 10_000 + 250 * size},
            "throughput": {"tokens_per_s": round(1_000 + 1_000 * score, 1)}, "lm_eval": lm_eval}


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


# The small workflow the driver-level tests run with these stand-ins.

STANDIN_SITE = str(Path(__file__).resolve().parent / "standin_site")  # see the module docstring
ALL_NODES = ["tokenize", "teacher_logits", "stage_1", "stage_2", "stage_3", "one_stage",
             "evaluate_stage_3", "evaluate_one_stage"]


def write_weights(path: Path, value: float = 0.0) -> Path:
    """A small but valid safetensors file (validation reads its header)."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.full(4, value, dtype=np.float32)}, str(path))
    return path


def make_teacher(path: Path) -> Path:
    """A teacher directory as the driver sees it: a PhiMoE config.json, weights and tokenizer files."""
    from tiny import tiny_config

    path.mkdir(parents=True, exist_ok=True)
    # Room for data.seq_len's default (512): validation refuses sequences longer than the teacher's context.
    tiny_config("phimoe", max_position_embeddings=512).to_json_file(path / "config.json")
    write_weights(path / "model.safetensors")
    (path / "tokenizer.json").write_text('{"stand-in": true}')
    return path


def workflow_dict(root: Path, storage: str | None = None, **changes) -> dict:
    data = root / "data.txt"  # validation checks that the source exists
    if not data.exists():
        data.write_text("hello\n")
    cfg = {
        "name": "wf",
        "storage": storage or str(root / "store"),
        "teacher": {"path": str(root / "teacher")},
        "data": {"source": str(data)},
        "logits": {"k": 4},
        "resources": {"actor_pool_size": 1},
        "stages": [
            {"expert_intermediate_size": 32, "token_budget": 3},
            {"expert_intermediate_size": 16, "num_key_value_heads": 1, "token_budget": 3},
            {"expert_intermediate_size": 8, "token_budget": 3},
        ],
        "baselines": [{"name": "one_stage", "kind": "one_stage"}],
        "evaluate": {"models": ["stage_3", "one_stage"]},
    }
    cfg.update(changes)
    return cfg


def write_config(root: Path, cfg: dict, name: str = "wf.yaml") -> Path:
    import yaml

    path = root / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def take_calls(path: Path) -> list[str]:
    """The stand-in calls recorded in `path` since the last look (the file is emptied)."""
    out = path.read_text().split() if path.exists() else []
    path.unlink(missing_ok=True)
    return out


def kill_mid_stage(proc: subprocess.Popen, work: Path, log: Path, at_step: int = 3, timeout_s: float = 120) -> int:
    """SIGKILL the driver `proc` once its stage stand-in (work dirs under `work`) has passed `at_step`;
    return the step the killed stage had reached."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        progress = list(work.glob("*/progress.json"))
        if progress and json.loads(progress[0].read_text())["step"] >= at_step:
            break
        time.sleep(0.1)
    assert proc.poll() is None, log.read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(list(work.glob("*/progress.json"))[0].read_text())["step"]
