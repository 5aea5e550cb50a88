"""`slimmoe slim`: the one-shot command over real files."""

import json

import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from slimmoe.workflows.cli import app
from tiny import stdlib_texts

runner = CliRunner()


def test_slim_scores_on_text_data_and_writes_a_loadable_checkpoint(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(stdlib_texts(max_files=6)):
        (data / f"doc{i}.txt").write_text(text)
    out = tmp_path / "slim"
    result = runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "24", "--kv-heads", "1",
                                 "--data", str(data / "*.txt"), "--calibration-batches", "2", "--seq-len", "32",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["scores"] == "taylor" and report["calibration_batches"] == 2
    assert report["after"]["total"] < report["before"]["total"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 24 and model.config.num_key_value_heads == 1
    assert (out / "tokenizer.json").exists()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_slim_without_data_says_it_falls_back_to_magnitude(tiny_model_dir, tmp_path):
    out = tmp_path / "slim"
    result = runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "12"])
    assert result.exit_code == 0, result.output
    assert "weight magnitude" in result.output
    assert "before" in result.output and "after" in result.output
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 12


def test_slim_bad_target_is_one_clear_error(tiny_model_dir, tmp_path):
    out = tmp_path / "slim"
    result = runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "4800"])
    assert result.exit_code == 2
    assert "expert_intermediate_size=4800 is not smaller" in result.output
    assert not out.exists()


def test_slim_refuses_existing_output(tiny_model_dir, tmp_path):
    out = tmp_path / "slim"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "12"])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_expert_sizes_the_fused_kernel_cannot_run_are_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    """float32 rows must be 16-byte multiples (torch._grouped_mm): 18 saves fine, then fails at the first forward."""
    out = tmp_path / "slim"
    result = runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "18"])
    assert result.exit_code == 2, result.output
    assert "expert_intermediate_size=18 gives 72-byte expert rows in float32" in result.output
    assert "choose 16 or 20" in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "20"]).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(8).view(1, 8)
    assert torch.isfinite(model(input_ids=ids).logits).all()  # the kernel runs on the accepted size


def test_the_stage_refuses_a_misaligned_size_before_it_reads_the_cache_or_starts_ray(tiny_model_dir, tmp_path):
    import pytest

    from slimmoe.tasks.nodes.stage import run_stage
    from slimmoe.tasks.slimming.config import SlimTargetError, StageConfig

    cfg = StageConfig(expert_intermediate_size=18, token_budget=64)
    with pytest.raises(SlimTargetError, match="choose 16 or 20"):
        run_stage(cfg, tiny_model_dir, tmp_path / "no_cache_here", tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    with pytest.raises(SlimTargetError, match="multiples of 8 in bfloat16: choose 16 or 24"):
        run_stage(cfg.with_changes(expert_intermediate_size=20, use_gpu=True), tiny_model_dir,
                  tmp_path / "no_cache_here", tmp_path / "out", tmp_path / "work")
