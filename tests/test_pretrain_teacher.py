"""The demo teacher's pretraining, at a tiny size: it must beat unigram frequencies on held-out
files, write a standard Hugging Face directory, and be reproducible for a seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slimmoe.tasks.pretraining.config import PretrainTeacherConfig
from slimmoe.tasks.nodes.pretrain_teacher import run_pretrain_teacher
from slimmoe.tasks.pretraining.corpus import source_files
from tiny import TINY_TEACHER

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "out"
    lines: list[str] = []
    metrics = run_pretrain_teacher(PretrainTeacherConfig(**TINY_TEACHER, max_steps=60), out, log=lines.append)
    return out, metrics, lines


def test_beats_unigram_and_reports(trained):
    out, metrics, lines = trained
    report = json.loads((out / "report.json").read_text())
    # A model that learned nothing beyond token frequencies would sit at (or above) the unigram line.
    assert report["validation_perplexity"] < 0.85 * report["unigram_perplexity"]
    assert report["unigram_perplexity"] < report["vocab_size"]  # the baseline itself is not trivial
    assert metrics["validation_perplexity"] == pytest.approx(report["validation_perplexity"])
    assert report["steps"] == 60 and report["corpus"]["validation_files"] >= 2
    assert report["parameters"]["active"] < report["parameters"]["total"]
    # Progress lines and a metrics log a user can plot.
    progress = [line for line in lines if " step " in line]
    assert len(progress) == 6 and all("tok/s" in line and "ETA" in line for line in progress)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(10, 61, 10))
    assert records[0]["loss"] > records[-2]["loss"]
    assert any("val_loss" in r for r in records if not r.get("final"))
    assert math.log(report["validation_perplexity"]) == pytest.approx(records[-1]["val_loss"])


def test_output_reloads_without_custom_code(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = trained
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "phimoe" and cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert not cfg["tie_word_embeddings"] and "auto_map" not in cfg
    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False).eval()
    text = "def add(a, b):\n    return a + b\n"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and float(loss) < math.log(len(tok))  # better than uniform on real code


def test_same_seed_same_weights(tmp_path):
    small = dict(TINY_TEACHER, max_steps=8, eval_every=0, log_every=8)
    a = run_pretrain_teacher(PretrainTeacherConfig(**small), tmp_path / "a", log=lambda _: None)
    b = run_pretrain_teacher(PretrainTeacherConfig(**small), tmp_path / "b", log=lambda _: None)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a["validation_perplexity"] == b["validation_perplexity"]
    c = run_pretrain_teacher(PretrainTeacherConfig(**dict(small, seed=1)), tmp_path / "c", log=lambda _: None)
    assert c["validation_perplexity"] != a["validation_perplexity"]


def test_held_out_rule_and_bad_config(tmp_path):
    root, files = source_files(PretrainTeacherConfig(**TINY_TEACHER))
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 5 and not any(r.startswith(("test/", "encodings/")) for r in rel)
    assert sum(f.stat().st_size for f in files[:-1]) < TINY_TEACHER["max_text_bytes"]
    with pytest.raises(ValueError, match="num_attention_heads"):
        PretrainTeacherConfig(hidden_size=130)
    with pytest.raises(ValueError):
        PretrainTeacherConfig(nonsense=1)
    with pytest.raises(ValueError, match="source_dir"):
        run_pretrain_teacher(PretrainTeacherConfig(source_dir=str(tmp_path / "missing")), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(FileExistsError):
        run_pretrain_teacher(PretrainTeacherConfig(**TINY_TEACHER), busy)


def test_the_demo_scores_every_model_on_text_its_teacher_never_saw():
    """The demo's data (distillation and validation) and the teacher's corpus share no file."""
    from slimmoe.tasks.data.sources import detect_source
    from slimmoe.workflows.config import load_workflow
    from slimmoe.workflows.demo import demo_config_path

    cfg = load_workflow(demo_config_path()).config
    _, teacher_files = source_files(cfg.pretrain_teacher)
    data_files = {str(Path(f).resolve()) for f in detect_source(cfg.data.source).files}
    assert teacher_files and data_files
    assert not {str(p.resolve()) for p in teacher_files} & data_files
    assert sum(p.stat().st_size for p in teacher_files) >= 0.8 * cfg.pretrain_teacher.max_text_bytes  # most of 6 MB still
