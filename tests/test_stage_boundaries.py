"""A stage's typed boundaries without Ray: what the driver hands its workers (`StageRun`), the part of
metrics.json the next stage reads (`StageMetrics`), and the one choice of engine."""

import ast
import json
import pickle
import typing
from dataclasses import FrozenInstanceError, asdict
from pathlib import Path

import pytest

from slimmoe.tasks.data.formats import FORMAT_VERSION, StageMetrics
from slimmoe.tasks.nodes.stage import unspent_tokens_of
from slimmoe.tasks.slimming.config import StageConfig, stage_steps
from slimmoe.tasks.slimming.engines import ENGINES, engine_class
from slimmoe.tasks.slimming.stage_run import Cut, StageRun


def _cfg(**kw):
    return StageConfig(**{"expert_intermediate_size": 16, "token_budget": 4096, "micro_batch": 2, **kw})


def test_a_stage_run_pickles_whole_and_is_frozen(tmp_path):
    cfg = _cfg(early_stop_min_improvement=0.1)
    run = StageRun(cfg=cfg, name="stage_1", model_dir=tmp_path / "m", cache_dir=tmp_path / "c", work_dir=tmp_path / "w",
                   steps=stage_steps(cfg, 32, batches_per_epoch=100), cuts=(Cut(0, cfg.targets),),
                   cuts_the_teacher=True, teacher_fingerprint="t" * 16, tokenizer_fingerprint=None)
    back = pickle.loads(pickle.dumps(run))
    assert back == run and back.cfg.early_stop_window_tokens == cfg.early_stop_window_tokens
    with pytest.raises(FrozenInstanceError):
        run.name = "other"


def test_inherited_tokens_are_part_of_the_budget_and_recorded_apart():
    cfg = _cfg(token_budget=4096 + 1024, early_stop_min_improvement=0.1)
    steps = stage_steps(cfg, 32, batches_per_epoch=1000, inherited_tokens=1024)
    assert (steps.configured_token_budget, steps.inherited_tokens) == (4096, 1024)
    assert steps.planned_tokens == steps.total_steps * steps.tokens_per_step >= 5120
    assert list(asdict(steps))[:3] == ["total_steps", "tokens_per_step", "planned_tokens"]
    # A budget changed through with_changes derives its early-stop window again.
    assert _cfg(early_stop_min_improvement=0.1).with_changes(token_budget=8192).early_stop_window_tokens == 1024


def test_the_next_stage_reads_unspent_tokens_through_the_typed_model(tmp_path):
    assert unspent_tokens_of(tmp_path) == 0  # a teacher, or a model cut elsewhere: no stage wrote it
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(StageMetrics(unspent_tokens=512, history=[]).model_dump(mode="json")))
    assert unspent_tokens_of(tmp_path) == 512
    written = json.loads(metrics.read_text())
    assert (written["kind"], written["format_version"], written["history"]) == ("stage_metrics", FORMAT_VERSION, [])
    metrics.write_text(json.dumps({"unspent_tokens": 7, "history": []}))  # written before the model existed
    assert unspent_tokens_of(tmp_path) == 7
    for broken, why in (("{not json", "not a stage's metrics file"), ('{"unspent_tokens": -1}', "not a stage's"),
                        ('{"unspent_tokens": "many"}', "not a stage's"),
                        (json.dumps({"format_version": FORMAT_VERSION + 1}), "format_version")):
        metrics.write_text(broken)
        with pytest.raises(ValueError, match=why) as err:
            unspent_tokens_of(tmp_path)
        assert str(metrics) in str(err.value)


def test_every_strategy_a_stage_accepts_has_one_engine_and_the_loop_never_asks_which():
    strategies = set(typing.get_args(StageConfig.model_fields["strategy"].annotation)) - {"auto"}
    assert strategies == set(ENGINES)
    for strategy in strategies:
        assert engine_class(strategy) is ENGINES[strategy]
    loop = Path(__file__).resolve().parents[1] / "tasks" / "slimming" / "train_loop.py"
    names = {n.id for n in ast.walk(ast.parse(loop.read_text())) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(ast.parse(loop.read_text())) if isinstance(n, ast.Attribute)}
    strings = {n.value for n in ast.walk(ast.parse(loop.read_text())) if isinstance(n, ast.Constant)
               and isinstance(n.value, str) and len(n.value) < 20}
    assert not ({"strategy", "sharded"} & names) and not (strategies & strings), "train_loop branches on the strategy"
