"""The by-hand commands take their options from the task configs: one declaration per setting."""

import re
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from slimmoe.tasks.data.config import TeacherLogitsConfig, TokenizeConfig
from slimmoe.tasks.evaluation.config import EvaluateConfig
from slimmoe.tasks.mcmoe.config import QuantizeConfig
from slimmoe.tasks.slimming.config import SlimConfig
from slimmoe.tasks.slimming.search import SearchConfig
from slimmoe.tasks.trimming.config import TrimConfig
from slimmoe.workflows.cli import app
from slimmoe.workflows.cli_options import derive_options, option_name

runner = CliRunner()
WIDE = {"COLUMNS": "400"}  # rich truncates long option names at 80 columns

# command -> (config, module and function it runs, positional arguments, config fields those fill)
# (`./model`: a bare `model` that does not exist here would be read as a Hub model id)
COMMANDS = {
    "slim": (SlimConfig, "slimmoe.tasks.nodes.slim", "run_slim", ["./model", "{out}"], {}),
    "trim": (TrimConfig, "slimmoe.tasks.nodes.trim", "run_trim", ["./model", "{out}", "--data", "d"], {}),
    "quantize": (QuantizeConfig, "slimmoe.tasks.nodes.quantize", "run_quantize", ["./model", "{out}", "--data", "d"], {}),
    "evaluate": (EvaluateConfig, "slimmoe.tasks.nodes.evaluate", "run_evaluate",
                 ["./model", "--data", "d", "--out", "{out}"], {}),
    "tokenize": (TokenizeConfig, "slimmoe.tasks.nodes.tokenize", "run_tokenize", ["text.txt", "tok", "{out}"],
                 {"source": "text.txt"}),
    "teacher-logits": (TeacherLogitsConfig, "slimmoe.tasks.nodes.teacher_logits", "run_teacher_logits",
                       ["teacher", "tokens", "{out}"], {}),
}
# Workflow commands whose options are derived too, but that run a workflow rather than one task function.
WORKFLOW_COMMANDS = {"search": SearchConfig}
# The fields each config requires that no positional argument fills, with a value the model accepts.
REQUIRED = {"slim": {"expert_intermediate_size": 24}, "trim": {"method": "layer-drop", "n": 1}}


def _callbacks() -> dict:
    return {info.name or info.callback.__name__.replace("_", "-"): info.callback for info in app.registered_commands}


def _click_command(name: str):
    return typer.main.get_command(app).commands[name]


def test_every_by_hand_command_is_derived_from_its_config():
    derived = {name: cb.derived_options.model for name, cb in _callbacks().items() if hasattr(cb, "derived_options")}
    assert derived == {**{name: case[0] for name, case in COMMANDS.items()}, **WORKFLOW_COMMANDS}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_not_hidden_is_on_the_command_line_with_the_models_default(name):
    spec = _callbacks()[name].derived_options
    params = {p.name: p for p in _click_command(name).params}
    help_text = runner.invoke(app, [name, "--help"], env=WIDE).output
    for field, info in spec.model.model_fields.items():
        if field in spec.hidden:
            assert field not in params
            continue
        assert field in params, f"{name}: {field} is not on the command line"
        param = params[field]
        if param.param_type_name == "option":
            opt = option_name(field)
            assert opt in param.opts
            # The option's row in --help (not a longer option that merely contains the name).
            [row] = [line for line in help_text.splitlines() if re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", line)]
            if not info.is_required():
                default = info.get_default(call_default_factory=True)
                expected = ",".join(map(str, default)) or None if isinstance(default, list) else default
                assert param.default == expected, f"{name} {opt}"
                if expected is not None and not isinstance(expected, bool):
                    assert f"[default: {expected}]" in row, row
            if info.description and field not in spec.help:
                assert info.description in row, row


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_aliases_and_hidden_names_are_fields_of_the_config(name):
    spec = _callbacks()[name].derived_options
    assert spec.named_fields() <= spec.model.model_fields.keys()
    params = {p.name: p for p in _click_command(name).params}
    for alias, field in spec.aliases.items():
        assert alias in params[field].opts


def test_a_renamed_field_breaks_the_command_at_import():
    class Settings(BaseModel):
        seq_len: int = 256

    with pytest.raises(TypeError, match="no field"):
        derive_options(Settings, aliases={"--length": "sequence_length"})
    with pytest.raises(TypeError, match="no field"):
        derive_options(Settings, hidden=("device",))
    with pytest.raises(TypeError, match="no field"):
        derive_options(Settings, parse={"length": int})


@pytest.fixture
def captured(monkeypatch):
    """Replace each command's task function: record the config it gets and write an empty report."""
    seen = []

    def fake(cfg, *args, **kwargs):
        seen.append(cfg)
        out = Path(args[-1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text("{}")
        return {}

    for _, module, fn, _, _ in COMMANDS.values():
        monkeypatch.setattr(f"{module}.{fn}", fake)
    return seen


def _invoke(name: str, tmp_path: Path, *options: str):
    args = [a.replace("{out}", str(tmp_path / "out")) for a in COMMANDS[name][3]]
    return runner.invoke(app, [name, *args, "--json", *options])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unset_options_leave_the_models_defaults(name, tmp_path, captured):
    model, *_, filled = COMMANDS[name]
    required = REQUIRED.get(name, {})
    options = [str(v) for field, value in required.items() for v in (option_name(field), value)]
    result = _invoke(name, tmp_path, *options)
    assert result.exit_code == 0, result.output
    [cfg] = captured
    assert cfg == model(**filled, **required)
    assert cfg.model_dump(exclude_unset=True) == {**filled, **required}


def test_bad_value_names_the_option_and_exits_2(tmp_path, captured):
    result = _invoke("trim", tmp_path, "--method", "layer-drop", "--n", "1", "--seq-len", "1")
    assert result.exit_code == 2
    assert "--seq-len: Input should be greater than or equal to 2 (got 1)" in result.output
    assert "Traceback" not in result.output and captured == []


def test_every_error_gets_its_own_line(tmp_path, captured):
    result = _invoke("quantize", tmp_path, "--group-size", "2", "--bits", "1,9")
    assert result.exit_code == 2 and captured == []
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert [e.split(":")[1].strip() for e in errors] == ["--candidate-bits", "--group-size"], result.output


def test_the_old_option_names_still_work(tmp_path, captured):
    assert _invoke("slim", tmp_path, "--expert-size", "24", "--kv-heads", "1").exit_code == 0
    assert captured.pop().model_dump(exclude_unset=True) == {"expert_intermediate_size": 24, "num_key_value_heads": 1}
    assert _invoke("quantize", tmp_path / "q", "--bits", "2, 3", "--no-paper-constraints").exit_code == 0
    assert captured.pop().model_dump(exclude_unset=True) == {"candidate_bits": [2, 3], "paper_constraints": False}
    assert _invoke("evaluate", tmp_path / "e", "--max-rows", "0", "--lm-eval-tasks", "hellaswag,arc_easy").exit_code == 0
    cfg = captured.pop()
    assert cfg.max_rows is None and cfg.lm_eval_tasks == ["hellaswag", "arc_easy"]
    assert _invoke("teacher-logits", tmp_path / "t", "--num-actors", "2").exit_code == 0
    assert captured.pop().actor_pool_size == 2


def test_toy_model_types_become_typer_options():
    class Toy(BaseModel):
        size: int = Field(gt=0, description="how big")
        mode: str = "a"
        fast: bool = True
        widths: list[int] = [1, 2]
        limit: int | None = None
        gpu: bool | None = None

    toy = typer.Typer()
    got = []

    @toy.command()
    @derive_options(Toy)
    def main(cfg: Toy, verbose: bool = typer.Option(False, "--verbose")):
        got.append((cfg, verbose))

    result = runner.invoke(toy, ["--size", "3", "--no-fast", "--widths", "4,5", "--limit", "7", "--no-gpu", "--verbose"])
    assert result.exit_code == 0, result.output
    assert got.pop() == (Toy(size=3, fast=False, widths=[4, 5], limit=7, gpu=False), True)
    assert runner.invoke(toy, ["--size", "3"]).exit_code == 0
    assert got.pop()[0].model_dump(exclude_unset=True) == {"size": 3}
    bad = runner.invoke(toy, ["--size", "0"])
    assert bad.exit_code == 2 and "--size: Input should be greater than 0 (got 0)" in bad.output and not got
    assert "how big" in runner.invoke(toy, ["--help"], env=WIDE).output
