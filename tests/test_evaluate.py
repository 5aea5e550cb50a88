"""The evaluate task: perplexity, KL / top-1 agreement against a teacher cache, parameters, speed,
memory, lm-eval tasks reported (not fatal) when lm_eval is missing."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from slimmoe.tasks.evaluation.config import EvaluateConfig
from slimmoe.tasks.nodes.evaluate import run_evaluate
from slimmoe.tasks.core.fingerprint import model_fingerprint, tokenizer_fingerprint
from slimmoe.tasks.slimming.losses import topk_with_rest
from slimmoe.tasks.data.formats import (LogitCacheManifest, TokenizedDatasetManifest, TokenShardsManifest, ids_dtype,
                                        numpy_to_binary_column)
from slimmoe.tasks.core.params import count_parameters

SEQ = 32
ROWS = 20
K = 8


def _token_rows(model_dir) -> np.ndarray:
    from tiny import stdlib_texts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stream = []
    for text in stdlib_texts(max_files=12):
        stream.extend(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    assert len(stream) >= ROWS * SEQ
    return np.asarray(stream[: ROWS * SEQ], dtype=np.int32).reshape(ROWS, SEQ)


def _write_files(out, tables: list[pa.Table]) -> list[dict]:
    files = []
    for i, t in enumerate(tables):
        name = f"part-{i:03d}.parquet"
        pq.write_table(t, out / name)
        files.append({"path": name, "rows": t.num_rows, "bytes": (out / name).stat().st_size})
    return files


def write_token_shards(out, rows: np.ndarray, tok_fp: str, eos: int = 2) -> None:
    out.mkdir(parents=True)
    half = len(rows) // 2  # two files, so reads cross a file boundary
    tables = [
        pa.table({"row_id": pa.array(np.arange(a, b), pa.int64()),
                  "input_ids": pa.array([r.tolist() for r in rows[a:b]], pa.list_(pa.int32()))})
        for a, b in ((0, half), (half, len(rows)))
    ]
    files = _write_files(out, tables)
    TokenShardsManifest(seq_len=rows.shape[1], rows=len(rows), tokens=int(rows.size), tokenizer_fingerprint=tok_fp,
                        eos_token_id=eos, files=files).write(out)


def write_logit_cache(out, teacher_dir, rows: np.ndarray, tok_fp: str, k: int = K) -> None:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    vocab = teacher.config.vocab_size
    with torch.no_grad():
        logits = teacher(input_ids=torch.as_tensor(rows, dtype=torch.long)).logits
    ids, lp, rest = topk_with_rest(logits, k)
    out.mkdir(parents=True)
    table = pa.table({
        "row_id": pa.array(np.arange(len(rows)), pa.int64()),
        "input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int32())),
        "topk_ids": numpy_to_binary_column(ids.numpy().astype(ids_dtype(vocab)).reshape(len(rows), -1)),
        "topk_logprobs": numpy_to_binary_column(lp.numpy().astype(np.float16).reshape(len(rows), -1)),
        "rest_logprob": numpy_to_binary_column(rest.numpy().astype(np.float32)),
    })
    files = _write_files(out, [table])
    LogitCacheManifest(teacher_fingerprint=model_fingerprint(teacher_dir), tokenizer_fingerprint=tok_fp, k=k,
                       seq_len=rows.shape[1], vocab_size=vocab, rows=len(rows), tokens=int(rows.size),
                       dtypes={"topk_ids": str(ids_dtype(vocab)), "topk_logprobs": "float16", "rest_logprob": "float32"},
                       files=files).write(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("evaluate")
    tok_fp = tokenizer_fingerprint(tiny_model_dir)
    rows = _token_rows(tiny_model_dir)
    # A tokenize-node output with train/ and validation/ splits.
    tokens = root / "tokens"
    write_token_shards(tokens / "train", rows[::-1].copy(), tok_fp)
    write_token_shards(tokens / "validation", rows, tok_fp)
    TokenizedDatasetManifest(seq_len=SEQ, tokenizer_fingerprint=tok_fp,
                             splits={s: {"rows": ROWS, "tokens": ROWS * SEQ} for s in ("train", "validation")}).write(tokens)
    # Random tiny models predict nearly uniform distributions, under which any two models agree;
    # a scaled-up head makes them confident, so KL and top-1 agreement can tell models apart.
    from tiny import tiny_model

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    teacher, other = root / "teacher", root / "other_model"
    for seed, d in ((0, teacher), (1, other)):
        m = tiny_model("phimoe", seed=seed, vocab_size=vocab)
        with torch.no_grad():
            m.lm_head.weight.mul_(30.0)
        m.save_pretrained(d, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tiny_model_dir / f, d / f)
    # A teacher-logits node output whose validation split was made by the teacher itself.
    logits = root / "logits"
    write_logit_cache(logits / "validation", teacher, rows, tok_fp)
    (logits / "manifest.json").write_text(json.dumps({
        "kind": "teacher_logits", "splits": ["validation"], "teacher_fingerprint": model_fingerprint(teacher),
        "tokenizer_fingerprint": tok_fp, "k": K}))
    return {"root": root, "tokens": tokens, "logits": logits, "rows": rows, "teacher": teacher, "other": other}


FAST = dict(batch_size=6, throughput_batch_size=2, throughput_seq_len=16, throughput_warmup=1, throughput_repeats=2)


def test_teacher_against_its_own_cache(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "eval"
    metrics = run_evaluate(EvaluateConfig(**FAST), setup["teacher"], setup["tokens"], setup["logits"], out)
    report = json.loads((out / "report.json").read_text())
    assert report["kl_to_teacher"] < 1e-3
    assert report["kl_to_teacher"] >= -1e-6
    assert report["top1_agreement"] == 1.0
    assert report["rows"] == ROWS and report["tokens_scored"] == ROWS * (SEQ - 1)
    assert metrics["perplexity"] == pytest.approx(report["perplexity"])

    # Perplexity computed directly: token-weighted mean NLL of every next token.
    model = AutoModelForCausalLM.from_pretrained(str(setup["teacher"])).eval()
    ids = torch.as_tensor(setup["rows"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert report["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)

    counts = count_parameters(model)
    assert report["parameters"]["total"] == counts["total"] and report["parameters"]["active"] == counts["active"]
    assert report["parameters"]["active"] < report["parameters"]["total"]
    tp = report["throughput"]
    assert tp["tokens_per_s"] > 0 and (tp["batch_size"], tp["seq_len"]) == (2, 16)
    for phase in ("evaluation", "throughput_forward"):
        assert report["memory"][phase]["peak_bytes"] > 0 and report["memory"][phase]["label"]
    assert report["teacher_cache"]["k"] == K
    assert report["dynamic_pruning"] is None and report["lm_eval"] == {}


def test_other_model_has_positive_kl(setup, tmp_path):
    report = run_evaluate(EvaluateConfig(**FAST), setup["other"], setup["tokens"], setup["logits"], tmp_path / "e")
    assert report["kl_to_teacher"] > 0.1
    assert report["top1_agreement"] < 0.9


def test_single_split_dirs_and_max_rows(setup, tiny_model_dir, tmp_path):
    cfg = EvaluateConfig(**dict(FAST, max_rows=7))
    report = run_evaluate(cfg, setup["teacher"], setup["tokens"] / "validation", setup["logits"] / "validation", tmp_path / "e")
    assert report["kl_to_teacher"] < 1e-3
    saved = json.loads((tmp_path / "e" / "report.json").read_text())
    assert saved["rows"] == 7 and saved["tokens_scored"] == 7 * (SEQ - 1)


def test_without_cache_and_cache_without_validation(setup, tiny_model_dir, tmp_path):
    report = run_evaluate(EvaluateConfig(**FAST), tiny_model_dir, setup["tokens"], None, tmp_path / "a")
    assert report["kl_to_teacher"] is None and report["perplexity"] > 1
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "manifest.json").write_text(json.dumps({"kind": "teacher_logits", "splits": ["train"]}))
    run_evaluate(EvaluateConfig(**FAST), tiny_model_dir, setup["tokens"], train_only, tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "report.json").read_text())
    assert saved["kl_to_teacher"] is None and "no validation split" in saved["teacher_cache_note"]


def test_lm_eval_tasks_without_lm_eval_are_refused_before_the_model_loads(setup, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    import slimmoe.tasks.nodes.evaluate as evaluate

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    cfg = EvaluateConfig(**FAST, lm_eval_tasks="hellaswag, arc_easy", max_rows=4)
    with pytest.raises(ValueError, match=r"lm_eval_tasks need lm_eval, which is not installed .*pip install"):
        run_evaluate(cfg, tiny_model_dir, setup["tokens"], None, tmp_path / "e")
    assert not (tmp_path / "e" / "report.json").exists()


def test_bad_inputs_fail_before_work(setup, tiny_model_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(FileExistsError):
        run_evaluate(EvaluateConfig(**FAST), tiny_model_dir, setup["tokens"], None, busy)
    with pytest.raises(ValueError, match="manifest"):
        run_evaluate(EvaluateConfig(**FAST), tiny_model_dir, tmp_path, None, tmp_path / "o1")
    # A cache made from other rows (the train split) than the validation rows scored.
    wrong = tmp_path / "wrong_cache"
    write_logit_cache(wrong, tiny_model_dir, setup["rows"][::-1].copy(), tokenizer_fingerprint(tiny_model_dir))
    with pytest.raises(ValueError, match="other tokens"):
        run_evaluate(EvaluateConfig(**FAST), tiny_model_dir, setup["tokens"], wrong, tmp_path / "o2")
    # Data made with another tokenizer.
    other_tok = tmp_path / "other_tok"
    write_token_shards(other_tok, setup["rows"], "0123456789abcdef")
    with pytest.raises(ValueError, match="tokenizer"):
        run_evaluate(EvaluateConfig(**FAST), tiny_model_dir, other_tok, None, tmp_path / "o3")
    for out in ("o1", "o2", "o3"):
        assert not (tmp_path / out / "report.json").exists()
    with pytest.raises(ValueError, match="not both"):
        EvaluateConfig(dynamic_pruning=0.3, dynamic_pruning_target=0.2)
    with pytest.raises(ValueError):
        EvaluateConfig(lm_eval_tasks="a,,b")
    with pytest.raises(ValueError):
        EvaluateConfig(unknown_field=1)


def test_cli_evaluate_json(setup, tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [
        "evaluate", str(setup["teacher"]), "--data", str(setup["tokens"]), "--teacher-logits", str(setup["logits"]),
        "--out", str(out), "--max-rows", "6", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["top1_agreement"] == 1.0 and printed["lm_eval"] == {}
    assert json.loads((out / "report.json").read_text())["rows"] == 6
    odp = CliRunner().invoke(app, [
        "evaluate", str(setup["teacher"]), "--data", str(setup["tokens"]), "--out", str(tmp_path / "odp"),
        "--max-rows", "6", "--json", "--dynamic-pruning", "0"])
    assert odp.exit_code == 0, odp.output
    assert json.loads(odp.stdout)["dynamic_pruning"]["beta"] == 0
    bad = CliRunner().invoke(app, ["evaluate", str(tiny_model_dir), "--data", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "error" in bad.output


def test_dynamic_pruning_hook(setup, tmp_path):
    plain = run_evaluate(EvaluateConfig(**FAST), setup["teacher"], setup["tokens"], None, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["dynamic_pruning"] is None
    run_evaluate(EvaluateConfig(**FAST, dynamic_pruning=0.0), setup["teacher"], setup["tokens"], None, tmp_path / "b0")
    beta0 = json.loads((tmp_path / "b0" / "report.json").read_text())
    assert beta0["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-4)
    assert beta0["dynamic_pruning"]["evaluation"]["share"] == 0.0
    run_evaluate(EvaluateConfig(**FAST, dynamic_pruning_target=0.3), setup["teacher"], setup["tokens"], None, tmp_path / "t")
    target = json.loads((tmp_path / "t" / "report.json").read_text())["dynamic_pruning"]
    # Calibrated on the train split, which here holds the same rows: the evaluated share is the target.
    assert target["calibrated_on"] == "train split"
    assert target["evaluation"]["share"] == pytest.approx(0.3, abs=0.02)
