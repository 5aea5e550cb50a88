"""The teacher_logits node end to end on a tiny teacher: the cache holds what a direct forward gives."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from slimmoe.tasks.core.checkpoint import copy_tokenizer_files
from slimmoe.tasks.core.fingerprint import model_fingerprint, tokenizer_fingerprint
from slimmoe.tasks.data.inspect import format_report, inspect_cache
from slimmoe.tasks.slimming.losses import topk_with_rest
from slimmoe.tasks.data.formats import MANIFEST, LogitCacheError
from slimmoe.tasks.data.readers import open_logit_cache, open_token_shards
from slimmoe.tasks.data.config import TeacherLogitsConfig
from slimmoe.tasks.slimming.losses import fast_topk_with_rest
from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits
from slimmoe.tasks.data.shards import write_tokenized_dataset

K, T = 8, 16


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir):
    """The tiny teacher with a sharpened output layer: spread-out log-probs (no near-ties inside the
    top-k) and a top-k that holds most of the mass, where an inexact rest bucket would show."""
    out = tmp_path_factory.mktemp("sharp_teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory, teacher_dir):
    rng = np.random.default_rng(0)
    vocab = AutoModelForCausalLM.from_pretrained(teacher_dir).config.vocab_size
    out = tmp_path_factory.mktemp("tok") / "tokens"
    write_tokenized_dataset(out, {"train": rng.integers(3, vocab, (22, T)), "validation": rng.integers(3, vocab, (7, T))},
                            tokenizer_fingerprint(teacher_dir), eos_token_id=2, vocab_size=vocab,
                            tokenizer_path=str(teacher_dir), rows_per_file=5)
    return out


@pytest.fixture(scope="module")
def node(ray_cluster, tmp_path_factory, teacher_dir, tokens_dir):
    out = tmp_path_factory.mktemp("logits") / "node"
    metrics = run_teacher_logits(TeacherLogitsConfig(k=K, batch_size=4, rows_per_file=6), teacher_dir, tokens_dir, out)
    return out, metrics


def _direct(teacher_dir, input_ids):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, experts_implementation="grouped_mm").eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_cached_topk_equals_a_direct_forward(node, teacher_dir, tokens_dir):
    out, _ = node
    for split in ("train", "validation"):
        cache = open_logit_cache(out / split)
        rows = cache.read_rows(np.arange(cache.num_rows))
        logprobs = torch.log_softmax(_direct(teacher_dir, rows["input_ids"]), dim=-1)
        values, ids = torch.topk(logprobs, K, dim=-1)
        assert torch.equal(rows["topk_ids"], ids)
        # float16 storage: relative error <= 2^-11, plus rounding of the float32 forward itself.
        assert torch.allclose(rows["topk_logprobs"], values, rtol=2**-10, atol=1e-4)
        _, _, rest = topk_with_rest(logprobs, K)
        assert torch.allclose(rows["rest_logprob"], rest, rtol=1e-4, atol=1e-4)
    # The sharpened teacher puts most of the mass in the top-k: the rest bucket is small but exact.
    assert rows["rest_logprob"].exp().mean() < 0.5


def test_reading_back_gives_exactly_the_rows_written(node, teacher_dir, tokens_dir):
    out, metrics = node
    top = json.loads((out / MANIFEST).read_text())
    assert top["kind"] == "teacher_logits" and top["splits"] == ["train", "validation"]
    assert top["teacher_fingerprint"] == model_fingerprint(teacher_dir)
    for split, n in (("train", 22), ("validation", 7)):
        shards = open_token_shards(tokens_dir / split)
        cache = open_logit_cache(out / split, expect_teacher_fingerprint=model_fingerprint(teacher_dir),
                                 expect_tokenizer_fingerprint=tokenizer_fingerprint(teacher_dir))
        m = cache.manifest
        assert (cache.num_rows, m["tokens"], m["k"], m["seq_len"]) == (n, n * T, K, T)
        assert m["dtypes"] == {"row_id": "int64", "input_ids": "int32", "topk_ids": "uint16",
                               "topk_logprobs": "float16", "rest_logprob": "float32"}
        assert sum(f["rows"] for f in m["files"]) == n and len(m["files"]) >= 2
        rows = cache.read_rows(np.arange(n))
        assert rows["row_id"].tolist() == list(range(n))
        assert torch.equal(rows["input_ids"], shards.read_rows(np.arange(n))["input_ids"])
        assert sorted(p.name for p in (out / split).glob("*.parquet")) == sorted(f["path"] for f in m["files"])
    assert metrics["rows"] == {"train": 22, "validation": 7} and metrics["storage_ratio"] < 1
    # One CPU per actor, all of it torch's: the finish gets no core of its own, so it runs in series.
    assert (metrics["pipeline_depth"], metrics["gpus_per_actor"]) == (1, 0)


def test_a_cache_killed_halfway_is_not_taken_for_complete(node, tmp_path):
    out, _ = node
    broken = tmp_path / "train"
    shutil.copytree(out / "train", broken)
    files = json.loads((broken / MANIFEST).read_text())["files"]
    (broken / MANIFEST).unlink()  # killed before the manifest: parquet files but no manifest
    with pytest.raises(LogitCacheError, match="incomplete"):
        open_logit_cache(broken)
    shutil.copy(out / "train" / MANIFEST, broken / MANIFEST)
    (broken / files[-1]["path"]).unlink()
    with pytest.raises(LogitCacheError, match="missing"):
        open_logit_cache(broken)


def test_another_teacher_or_tokenizer_is_refused(node):
    out, _ = node
    with pytest.raises(LogitCacheError, match="teacher changed"):
        open_logit_cache(out / "train", expect_teacher_fingerprint="0123456789abcdef")
    with pytest.raises(LogitCacheError, match="tokenizer changed"):
        open_logit_cache(out / "validation", expect_tokenizer_fingerprint="0123456789abcdef")


def test_bad_inputs_fail_before_any_work(ray_cluster, tmp_path, teacher_dir, tokens_dir, tiny_model_dir):
    with pytest.warns(UserWarning, match="no GPUs now"), pytest.raises(ValueError, match="0 GPUs; add GPU nodes"):
        run_teacher_logits(TeacherLogitsConfig(device="cuda", wait_for_actors_s=3), teacher_dir, tokens_dir, tmp_path / "a")
    other = tmp_path / "other_tokens"
    write_tokenized_dataset(other, {"train": np.zeros((2, 4), int), "validation": np.zeros((2, 4), int)}, "someothertok")
    with pytest.raises(ValueError, match="tokenizer"):
        run_teacher_logits(TeacherLogitsConfig(), teacher_dir, other, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("busy")
    with pytest.raises(FileExistsError):
        run_teacher_logits(TeacherLogitsConfig(), teacher_dir, tokens_dir, tmp_path / "c")
    with pytest.raises(LogitCacheError, match="incomplete"):
        shutil.copytree(tokens_dir, tmp_path / "t")
        (tmp_path / "t" / "train" / MANIFEST).unlink()
        run_teacher_logits(TeacherLogitsConfig(), teacher_dir, tmp_path / "t", tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_fast_topk_with_rest_matches_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 500) * 4
    logits[0, 0] = -300.0
    logits[0, 0, :3] = torch.tensor([0.0, -1.0, -2.0])  # everything outside the top-k underflows float32
    logits[1, 1, 7] = 60.0  # top-1 holds almost all the mass
    ref = topk_with_rest(logits, 4)
    got = fast_topk_with_rest(logits.clone(), 4)
    assert torch.equal(got[0], ref[0])
    assert torch.allclose(got[1], ref[1], atol=1e-5)
    assert torch.allclose(got[2], ref[2], atol=1e-4, rtol=1e-5)
    assert got[2][0, 0] < -290 and torch.isfinite(got[2]).all()


def test_inspect_reports_the_cache(node):
    out, _ = node
    report = inspect_cache(out, samples=3)
    assert set(report["splits"]) == {"train", "validation"}
    s = report["splits"]["train"]
    cache = open_logit_cache(out / "train")
    rows = cache.read_rows(np.arange(cache.num_rows))
    assert s["tokens_inspected"] == s["tokens"] == 22 * T
    assert s["tail_mass"]["mean"] == pytest.approx(rows["rest_logprob"].double().exp().mean().item(), rel=1e-6)
    top1 = rows["topk_logprobs"][..., 0].double().exp()
    assert s["top1_prob"]["p50"] == pytest.approx(top1.median().item(), abs=1e-3)
    assert 0 <= s["topk_entropy"]["min"] <= s["topk_entropy"]["max"] <= np.log(K) + 1e-6
    assert s["bytes_per_token"] == pytest.approx(sum(f["bytes"] for f in cache.manifest["files"]) / (22 * T))
    assert s["mass_error"]["max"] < 5e-3
    assert s["tokenizer"] is not None and len(s["samples"]) == 3 and "→" in s["samples"][0]["text"]
    assert "(p=" in s["samples"][0]["text"]
    text = format_report(report)
    assert "bytes/token" in text and "tail mass" in text and "[validation]" in text
    # An untouched cache: every fingerprint agrees, with the teacher directory too, and nothing warns.
    assert report["warnings"] == [] and "WARNING" not in text
    n = len(cache.manifest["files"])
    assert s["teacher_check"].startswith("matches") and s["checksums"].startswith(f"{n} of {n} files carry one")


def test_cli_inspect_json(node):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app

    out, _ = node
    res = CliRunner().invoke(app, ["logits", "inspect", str(out / "validation"), "--json", "--samples", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["kind"] == "logit_cache" and len(report["splits"]["validation"]["samples"]) == 2
    res = CliRunner().invoke(app, ["logits", "inspect", str(out / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
