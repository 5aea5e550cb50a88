"""Damaged or contradicted caches are refused with the file named and the way to rebuild it:
checksums (a zeroed block keeps the size), non-finite log-probs, and edited teacher fingerprints."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from slimmoe.tasks.core.fingerprint import model_fingerprint, tokenizer_fingerprint
from slimmoe.tasks.data.config import TeacherLogitsConfig
from slimmoe.tasks.data.formats import (MANIFEST, LogitCacheError, LogitCacheManifest, numpy_to_binary_column,
                                        write_parquet_file)
from slimmoe.tasks.data.readers import open_logit_cache, open_token_shards
from slimmoe.tasks.data.shards import write_tokenized_dataset
from slimmoe.tasks.evaluation.config import EvaluateConfig
from slimmoe.tasks.nodes.evaluate import run_evaluate
from slimmoe.tasks.nodes.stage import run_stage
from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits
from slimmoe.tasks.slimming.config import StageConfig
from slimmoe.workflows.cli import app

T, K, ROWS = 64, 16, 24
RERUN = "slimmoe rerun CONFIG teacher_logits"
FAST_EVAL = ["--batch-size", "6", "--throughput-batch-size", "2", "--throughput-seq-len", "16",
             "--throughput-warmup", "1", "--throughput-repeats", "1"]


@pytest.fixture(scope="module")
def made(ray_cluster, tmp_path_factory, tiny_model_dir):
    """Token shards and the real teacher_logits node's output on them, files big enough to zero 4 KiB
    inside one without touching its footer."""
    root = tmp_path_factory.mktemp("integrity")
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    tokens = root / "tokens"
    write_tokenized_dataset(tokens, {s: rng.integers(3, vocab, (ROWS, T)) for s in ("train", "validation")},
                            tokenizer_fingerprint(tiny_model_dir), eos_token_id=2, vocab_size=vocab,
                            tokenizer_path=str(tiny_model_dir), rows_per_file=12)
    logits = root / "logits"
    run_teacher_logits(TeacherLogitsConfig(k=K, batch_size=12, rows_per_file=12), tiny_model_dir, tokens, logits)
    return {"tokens": tokens, "logits": logits, "teacher": tiny_model_dir, "fp": model_fingerprint(tiny_model_dir)}


def _zero_4k(file):
    data = bytearray(file.read_bytes())
    assert len(data) > 3 * 4096, "the file must be large enough to damage away from its footer"
    mid = len(data) // 2 - 2048
    data[mid : mid + 4096] = bytes(4096)
    file.write_bytes(bytes(data))  # same size: a byte count alone cannot tell


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _first_file(split_dir):
    return json.loads((split_dir / MANIFEST).read_text())["files"][0]["path"]


def _edit(manifest_path, **fields):
    m = json.loads(manifest_path.read_text())
    m.update(fields)
    manifest_path.write_text(json.dumps(m))


def test_written_manifests_carry_checksums_and_older_ones_still_read(made, tmp_path):
    for split in ("train", "validation"):
        for d in (made["logits"] / split, made["tokens"] / split):
            files = json.loads((d / MANIFEST).read_text())["files"]
            assert all(f["checksum"].startswith("crc32:") for f in files), d
    old = _copy(made["logits"], tmp_path / "old")
    m = json.loads((old / "validation" / MANIFEST).read_text())
    for f in m["files"]:
        f.pop("checksum")
    (old / "validation" / MANIFEST).write_text(json.dumps(m))
    want = open_logit_cache(made["logits"] / "validation").read_numpy(np.arange(ROWS))
    got = open_logit_cache(old / "validation").read_numpy(np.arange(ROWS))
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_zeroed_block_fails_inspect_and_evaluate_naming_the_file(made, tmp_path):
    bad = _copy(made["logits"], tmp_path / "bad")
    victim = _first_file(bad / "validation")
    _zero_4k(bad / "validation" / victim)
    runner = CliRunner()
    # Exit code 2 is the CLI's refusal of a bad input; an uncaught traceback would exit 1.
    res = runner.invoke(app, ["logits", "inspect", str(bad)])
    assert res.exit_code == 2, res.output
    assert victim in res.output and RERUN in res.output, res.output
    res = runner.invoke(app, ["evaluate", str(made["teacher"]), "--data", str(made["tokens"]),
                              "--teacher-logits", str(bad), "--out", str(tmp_path / "eval"), *FAST_EVAL])
    assert res.exit_code == 2, res.output
    assert victim in res.output and RERUN in res.output, res.output
    assert not (tmp_path / "eval" / "report.json").exists()


@pytest.mark.parametrize("manifest_checksums", [True, False], ids=["file-checksum", "page-checksums-only"])
def test_zeroed_block_fails_the_reader_naming_the_file(made, tmp_path, manifest_checksums):
    bad = _copy(made["logits"] / "train", tmp_path / "train")
    if not manifest_checksums:  # an older manifest: the Parquet page checksums still catch it
        m = json.loads((bad / MANIFEST).read_text())
        for f in m["files"]:
            f.pop("checksum")
        (bad / MANIFEST).write_text(json.dumps(m))
    victim = _first_file(bad)
    _zero_4k(bad / victim)
    cache = open_logit_cache(bad)  # opening reads footers only; the damage is found on reading
    with pytest.raises(LogitCacheError, match=rf"{victim}.*{RERUN}") as err:
        cache.read_rows(np.arange(cache.num_rows))
    assert ("does not match its checksum" if manifest_checksums else "is damaged") in str(err.value)


def test_zeroed_token_shard_is_named_before_the_teacher_pass(made, tmp_path):
    vocab = json.loads((made["teacher"] / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(2)
    tokens = tmp_path / "tokens"
    write_tokenized_dataset(tokens, {"train": rng.integers(3, vocab, (400, T)), "validation": rng.integers(3, vocab, (4, T))},
                            tokenizer_fingerprint(made["teacher"]), eos_token_id=2, vocab_size=vocab, rows_per_file=200)
    victim = _first_file(tokens / "train")
    _zero_4k(tokens / "train" / victim)
    shards = open_token_shards(tokens / "train")
    with pytest.raises(LogitCacheError, match=rf"{victim}.*`slimmoe rerun CONFIG tokenize`"):
        shards.read_rows(np.arange(shards.num_rows))
    with pytest.raises(LogitCacheError, match=rf"{victim}.*tokenize"):
        run_teacher_logits(TeacherLogitsConfig(k=K), made["teacher"], tokens, tmp_path / "logits")
    assert not (tmp_path / "logits").exists()


def test_a_zeroed_block_found_inside_a_training_worker_is_named_by_the_stage(made, tmp_path):
    bad = _copy(made["logits"], tmp_path / "bad")
    victims = [f["path"] for f in json.loads((bad / "train" / MANIFEST).read_text())["files"]]
    for name in victims:  # every file, so the first batch of the shuffled order hits one
        _zero_4k(bad / "train" / name)
    cfg = StageConfig(distill_only=True, token_budget=T * 4 * 2, micro_batch=4, max_failures=0, cpus_per_worker=1,
                      log_interval=1)
    with pytest.raises(LogitCacheError, match=rf"stage_x: a distillation worker.*({'|'.join(victims)}).*{RERUN}"):
        run_stage(cfg, made["teacher"], bad, tmp_path / "out", tmp_path / "work", teacher_fingerprint=made["fp"],
                  name="stage_x")
    assert not (tmp_path / "out").exists()


def _write_cache_with(path, column, value):
    """A two-file logit cache made with the formats helpers, `value` written into one row of `column`."""
    rng = np.random.default_rng(1)
    n, t, k, v = 8, 4, 3, 50
    ids = np.stack([np.stack([rng.permutation(v)[:k] for _ in range(t)]) for _ in range(n)]).astype(np.uint16)
    lp = np.sort(-rng.exponential(2.0, (n, t, k)), axis=-1)[..., ::-1].astype(np.float16)
    rest = np.log1p(-np.exp(lp.astype(np.float64)).sum(-1).clip(max=0.99)).astype(np.float32)
    (lp if column == "topk_logprobs" else rest)[6, 1] = value
    path.mkdir(parents=True)
    files = []
    for name, lo, hi in (("rows-a.parquet", 0, 4), ("rows-b.parquet", 4, 8)):
        table = pa.table({
            "row_id": pa.array(np.arange(lo, hi, dtype=np.int64)),
            "input_ids": pa.array(rng.integers(0, v, (hi - lo, t)).tolist(), pa.list_(pa.int32())),
            "topk_ids": numpy_to_binary_column(ids[lo:hi]),
            "topk_logprobs": numpy_to_binary_column(lp[lo:hi]),
            "rest_logprob": numpy_to_binary_column(rest[lo:hi]),
        })
        files.append({"path": name, "rows": hi - lo, **write_parquet_file(table, path / name)})
    LogitCacheManifest(teacher_fingerprint="teach0", tokenizer_fingerprint="tok0", k=k, seq_len=t, vocab_size=v,
                       rows=n, tokens=n * t, files=files).write(path)


@pytest.mark.parametrize("column, value", [("rest_logprob", np.nan), ("topk_logprobs", np.inf)])
def test_nonfinite_logprobs_are_an_error_not_a_statistic(tmp_path, column, value):
    path = tmp_path / "cache"
    _write_cache_with(path, column, value)
    res = CliRunner().invoke(app, ["logits", "inspect", str(path), "--json"])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert "non-finite" in res.output and "rows-b.parquet" in res.output and column in res.output, res.output
    cache = open_logit_cache(path)
    cache.read_rows([0, 3])  # the clean file reads
    with pytest.raises(LogitCacheError, match=rf"rows-b.parquet.*non-finite.*{column}.*row 6"):
        cache.read_rows([5])


def test_a_teacher_that_gives_nan_fails_the_pass_instead_of_caching_it(made, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from slimmoe.tasks.core.checkpoint import copy_tokenizer_files

    broken = tmp_path / "broken_teacher"
    model = AutoModelForCausalLM.from_pretrained(made["teacher"])
    with torch.no_grad():
        model.lm_head.weight[5].fill_(float("nan"))
    model.save_pretrained(broken, safe_serialization=True)
    copy_tokenizer_files(made["teacher"], broken)
    with pytest.raises(ValueError, match="non-finite"):
        run_teacher_logits(TeacherLogitsConfig(k=K, batch_size=12), broken, made["tokens"], tmp_path / "logits")
    assert not (tmp_path / "logits" / MANIFEST).exists()


def _inspect(path):
    text = CliRunner().invoke(app, ["logits", "inspect", str(path), "--samples", "0"])
    js = CliRunner().invoke(app, ["logits", "inspect", str(path), "--samples", "0", "--json"])
    assert text.exit_code == 0 and js.exit_code == 0, text.output + js.output
    return text.output, json.loads(js.output)


def test_an_edited_split_fingerprint_warns_in_inspect_and_is_refused(made, tmp_path):
    _, clean = _inspect(made["logits"])
    assert clean["warnings"] == []
    forged = "feedfacefeedface"
    out = _copy(made["logits"], tmp_path / "edited")
    _edit(out / "train" / MANIFEST, teacher_fingerprint=forged)
    text, report = _inspect(out)
    warning_lines = [line for line in text.splitlines() if line.startswith("WARNING:")]
    assert any(forged in line and "train" in line for line in warning_lines), text
    assert report["warnings"] and all(isinstance(w, str) for w in report["warnings"])
    assert any("splits disagree" in w for w in report["warnings"])
    assert any(forged in w and made["fp"] in w for w in report["splits"]["train"]["warnings"])
    assert report["splits"]["validation"]["warnings"] == []

    with pytest.raises(LogitCacheError, match=forged):
        open_logit_cache(out / "train", expect_teacher_fingerprint=made["fp"])
    with pytest.raises(LogitCacheError, match="contradicts itself"):
        open_logit_cache(out / "train")
    with pytest.raises(LogitCacheError, match=forged):
        run_stage(StageConfig(distill_only=True, token_budget=T * 8), made["teacher"], out, tmp_path / "stage",
                  tmp_path / "work")
    assert not (tmp_path / "stage").exists()

    # The parent edited to match: the fingerprints stamped into the files and the teacher
    # directory the manifest records still say otherwise.
    _edit(out / MANIFEST, teacher_fingerprint=forged)
    _edit(out / "validation" / MANIFEST, teacher_fingerprint=forged)
    text, report = _inspect(out)
    assert sum(line.startswith("WARNING:") for line in text.splitlines()) >= 3, text
    assert any("written with" in w and made["fp"] in w for w in report["warnings"])
    assert any(str(made["teacher"]) in w for w in report["warnings"])
    with pytest.raises(LogitCacheError, match="contradicts itself"):
        open_logit_cache(out / "validation", expect_teacher_fingerprint=forged)
    with pytest.raises(LogitCacheError):
        run_evaluate(EvaluateConfig(batch_size=6), made["teacher"], made["tokens"], out, tmp_path / "eval",
                     teacher_fingerprint=made["fp"])
    assert not (tmp_path / "eval" / "report.json").exists()


def test_evaluate_expects_the_teacher_its_node_output_records(made, tmp_path):
    out = _copy(made["logits"], tmp_path / "logits")
    _edit(out / MANIFEST, teacher_fingerprint="0123456789abcdef")
    with pytest.raises(LogitCacheError, match="0123456789abcdef"):
        run_evaluate(EvaluateConfig(batch_size=6), made["teacher"], made["tokens"], out, tmp_path / "eval")
    with pytest.raises(LogitCacheError, match="teacher changed"):
        run_evaluate(EvaluateConfig(batch_size=6), made["teacher"], made["tokens"], made["logits"], tmp_path / "eval2",
                     teacher_fingerprint="0123456789abcdef")
