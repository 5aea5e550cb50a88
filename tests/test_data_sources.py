"""Data anywhere pyarrow reads: corpora on S3 (moto's server, the `s3_server` fixture), weighted blends of
sources, and the checks validation makes of them before any work, each at its YAML line."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tiny import stdlib_texts

SEQ, VAL = 32, 0.25


@pytest.fixture(scope="module")
def docs():
    return [t for t in stdlib_texts(24, 1500) if t]


@pytest.fixture
def bucket(s3_server):
    return s3_server.new_bucket()


def _uri(s3_server, bucket: str, path: str) -> str:
    """An s3:// URI (glob characters allowed in `path`) that carries the server's endpoint."""
    return s3_server.uri(bucket, path)


def _put(s3_server, bucket: str, key: str, data: bytes) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").put_object(
        Bucket=bucket, Key=key, Body=data)


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _parquet(columns: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _tokenizer(tok_dir):
    from slimmoe.tasks.data.calibration import load_tokenizer

    return load_tokenizer(tok_dir)


def _expected_rows(docs, tok_dir) -> dict:
    """The tokenize rule, computed here: documents in order, split by the SHA-1 of their text, packed with EOS."""
    from slimmoe.tasks.data.packing import pack_documents

    tok = _tokenizer(tok_dir)
    out = {}
    for s, name in enumerate(("train", "validation")):
        ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs
               if (int.from_bytes(hashlib.sha1(d.encode()).digest()[:8], "big") < int(VAL * 2**64)) == s]
        out[name] = torch.from_numpy(pack_documents(ids, SEQ, tok.eos_token_id)).long()
    return out


def _rows(out_dir) -> dict:
    from slimmoe.tasks.data.readers import open_token_shards

    rows = {}
    for name in ("train", "validation"):
        shards = open_token_shards(out_dir / name)
        rows[name] = shards.read_rows(np.arange(shards.num_rows))["input_ids"]
    return rows


def _line_of(config_path, text: str) -> int:
    return next(i for i, line in enumerate(config_path.read_text().splitlines(), 1) if text in line)


def test_jsonl_and_parquet_corpora_on_s3_tokenize_through_the_cli(ray_cluster, s3_server, bucket, docs, tmp_path,
                                                                   tiny_model_dir):
    from slimmoe.workflows.cli import app

    expected = _expected_rows(docs, tiny_model_dir)
    assert len(expected["train"]) > 10 and len(expected["validation"]) > 0
    _put(s3_server, bucket, "corpus/a.jsonl", _jsonl({"text": d, "id": i} for i, d in enumerate(docs[:10])))
    _put(s3_server, bucket, "corpus/b.jsonl", _jsonl({"text": d} for d in docs[10:]))
    _put(s3_server, bucket, "corpus/README.md", b"not part of the glob\n")
    _put(s3_server, bucket, "pq/part-0.parquet", _parquet({"body": docs[:7]}))
    _put(s3_server, bucket, "pq/part-1.parquet", _parquet({"body": docs[7:]}))

    for name, data, field in (("jsonl", _uri(s3_server, bucket, "corpus/*.jsonl"), "text"),
                              ("parquet", _uri(s3_server, bucket, "pq"), "body")):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["tokenize", data, str(tiny_model_dir), str(out), "--seq-len", str(SEQ),
                                          "--validation-fraction", str(VAL), "--text-field", field, "--json"])
        assert result.exit_code == 0, (name, result.output)
        rows = _rows(out)
        for split in ("train", "validation"):
            assert torch.equal(rows[split], expected[split]), (name, split)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["source"]["kind"] == name and manifest["splits"]["train"]["documents"] + \
            manifest["splits"]["validation"]["documents"] == len(docs)


def test_a_blend_of_two_sources_follows_the_weights(ray_cluster, ws, s3_server, bucket, docs, tiny_model_dir):
    """One source on S3, one local, weights 1:3, tokenized by the workflow (`slimmoe rerun CONFIG tokenize`).

    The rule (tasks/data/blend.py) takes whole documents, always from the source with the fewest tokens per
    unit of weight: so the tokens per unit of weight of the two sources differ by at most one document
    (the largest, over the smaller weight) - the tolerance asserted - and the counts are recomputed here
    from the documents the manifest says each source gave."""
    import standins
    from slimmoe.workflows.dag import build_dag
    from slimmoe.workflows.driver import plan_workflow, rerun_node
    from slimmoe.workflows.nodes import register_node_kind

    register_node_kind(standins._REPLACED["tokenize"], replace=True)  # the real tokenize; ws restores the stand-in
    a_docs, b_docs = docs[:12], [d[::-1] for d in docs] + docs  # b: more than 3x a's text: a runs out first
    _put(s3_server, bucket, "blend/a-0.jsonl", _jsonl({"text": d} for d in a_docs[:6]))
    _put(s3_server, bucket, "blend/a-1.jsonl", _jsonl({"text": d} for d in a_docs[6:]))
    local = ws / "b.jsonl"
    local.write_bytes(_jsonl({"text": d} for d in b_docs))
    a_uri = _uri(s3_server, bucket, "blend/*.jsonl")
    cfg = standins.workflow_dict(ws, teacher={"path": str(tiny_model_dir)},
                                 data={"sources": [{"path": a_uri, "weight": 1}, {"path": str(local), "weight": 3}],
                                       "seq_len": SEQ, "validation_fraction": VAL})
    config = standins.write_config(ws, cfg)

    # The plan sizes the data from its listing: each source's bytes at 4 a token, the blend by its scarcest source.
    plan = plan_workflow(config)
    a_bytes, b_bytes = sum(len(_jsonl({"text": d} for d in part)) for part in (a_docs[:6], a_docs[6:])), local.stat().st_size
    assert plan.data_tokens == int(min(a_bytes / 4 / 0.25, b_bytes / 4 / 0.75))
    assert "estimated from the data's listing" in plan.data_tokens_basis

    rerun_node(config, "tokenize", log=lambda s: None)
    dag = build_dag(config)
    out = dag.store.local_path(dag.output_path("tokenize"))
    manifest = json.loads(open(f"{out}/manifest.json").read())
    blend = manifest["source"]["blend"]
    assert [b["path"] for b in blend] == [a_uri, str(local)] and [b["kind"] for b in blend] == ["jsonl", "jsonl"]

    tok = _tokenizer(tiny_model_dir)
    sizes = [[len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in part] for part in (a_docs, b_docs)]
    for row, part in zip(blend, sizes):  # the realised counts are those of the first documents of each source
        assert 0 < row["documents"] <= len(part) and row["tokens"] == sum(part[:row["documents"]])
    assert [b["exhausted"] for b in blend] == [True, False]
    assert blend[0]["documents"] == len(a_docs) and blend[1]["documents"] < len(b_docs)  # b was cut, not a repeated
    assert [b["target_share"] for b in blend] == [0.25, 0.75]
    per_weight = [b["tokens"] / b["target_share"] for b in blend]
    assert abs(per_weight[0] - per_weight[1]) <= max(max(s) for s in sizes) / 0.25
    assert all(abs(b["share"] - b["target_share"]) < 0.05 for b in blend)
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "validation")) == sum(b["documents"] for b in blend)

    # The S3 source is keyed on its listing: the same objects give the same key, a changed object a new one.
    assert build_dag(config).nodes["tokenize"].key == dag.nodes["tokenize"].key
    _put(s3_server, bucket, "blend/a-1.jsonl", _jsonl({"text": d} for d in a_docs[6:] + ["one more document"]))
    assert build_dag(config).nodes["tokenize"].key != dag.nodes["tokenize"].key


def test_an_s3_glob_that_matches_nothing_is_refused_at_its_yaml_line(ws, s3_server, bucket):
    import standins
    from slimmoe.workflows.cli import app
    from slimmoe.workflows.driver import plan_workflow

    _put(s3_server, bucket, "corpus/a.txt", b"text, but not JSONL\n")
    missing = _uri(s3_server, bucket, "corpus/*.jsonl")
    config = standins.write_config(ws, standins.workflow_dict(ws, data={"source": missing}))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert f"wf.yaml:{_line_of(config, 'source:')}: data.source: data path '{missing}' matches no files" in result.output
    assert not (ws / "calls.txt").exists()  # refused before any node ran
    plan = plan_workflow(config)  # the plan, which lists the data itself, does not call it feasible either
    assert not plan.feasible and "matches no files" in plan.problems[0][1]


def test_validation_names_the_remote_file_whose_first_record_lacks_the_text_field(ws, s3_server, bucket):
    import standins
    from slimmoe.workflows.cli import app

    _put(s3_server, bucket, "good/a.jsonl", _jsonl([{"text": "fine"}]))
    _put(s3_server, bucket, "bad/a.jsonl", _jsonl([{"text": "fine"}]))
    _put(s3_server, bucket, "bad/b.jsonl", _jsonl([{"content": "the text under another key"}, {"text": "x"}]))
    good, bad = _uri(s3_server, bucket, "good"), _uri(s3_server, bucket, "bad")
    config = standins.write_config(ws, standins.workflow_dict(ws, data={"sources": [
        {"path": good, "weight": 1}, {"path": bad, "weight": 2}]}))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    line = _line_of(config, f"path: {bad}")
    assert (f"wf.yaml:{line}: data.sources[1].path: text field 'text' is missing in s3://{bucket}/bad/b.jsonl:1 "
            "(its keys: content); set text_field") in result.output
    assert "data.sources[0]" not in result.output and not (ws / "calls.txt").exists()
