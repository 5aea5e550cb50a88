"""The tokenize node: every source kind gives the same, reproducible rows; bad input fails clearly."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from slimmoe.tasks.data.calibration import load_tokenizer
from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
from slimmoe.tasks.data.formats import MANIFEST
from slimmoe.tasks.data.readers import open_token_shards
from slimmoe.tasks.data.packing import pack_documents
from slimmoe.tasks.data.sources import DataSourceError
from slimmoe.tasks.data.config import TokenizeConfig
from slimmoe.tasks.nodes.tokenize import run_tokenize

from tiny import stdlib_texts

SEQ, VAL = 32, 0.25


@pytest.fixture(scope="module")
def docs():
    return [t for t in stdlib_texts(24, 1500) if t]


def _split_of(text):
    return int(int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") < int(VAL * 2**64))


def _expected(docs, tok_dir):
    """What the rule says: documents in input order, split by the hash of their text, packed with EOS."""
    tok = load_tokenizer(tok_dir)
    out = {}
    for s, name in enumerate(("train", "validation")):
        ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs if _split_of(d) == s]
        out[name] = torch.from_numpy(pack_documents(ids, SEQ, tok.eos_token_id)).long()
    return out


def _rows(out_dir):
    rows = {}
    for name in ("train", "validation"):
        shards = open_token_shards(out_dir / name)
        got = shards.read_rows(np.arange(shards.num_rows))
        assert got["row_id"].tolist() == list(range(shards.num_rows))
        rows[name] = got["input_ids"]
    return rows


def _run(data, tok_dir, out, **kw):
    return run_tokenize(TokenizeConfig(source=str(data), seq_len=SEQ, validation_fraction=VAL, rows_per_file=40, **kw), tok_dir, out)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_source_kind_gives_the_rule_s_rows_and_reruns_are_identical(ray_cluster, tmp_path, docs, tiny_model_dir):
    expected = _expected(docs, tiny_model_dir)
    assert len(expected["train"]) > 40 and len(expected["validation"]) > 0  # several files, both splits

    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for i, d in enumerate(docs):
        (text_dir / f"{i:03d}.txt").write_text(d)
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    parquet = tmp_path / "pq"
    parquet.mkdir()
    pq.write_table(pa.table({"body": docs[:10]}), parquet / "a.parquet")
    pq.write_table(pa.table({"body": docs[10:]}), parquet / "b.parquet")
    import datasets

    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(hf))

    metrics = _run(text_dir, tiny_model_dir, tmp_path / "o_text")
    for out, data, field in (("o_jsonl", jsonl, "text"), ("o_jsonl2", jsonl, "text"),
                             ("o_parquet", parquet, "body"), ("o_hf", hf, "content")):
        _run(data, tiny_model_dir, tmp_path / out, text_field=field)
    for out in ("o_text", "o_jsonl", "o_jsonl2", "o_parquet", "o_hf"):
        rows = _rows(tmp_path / out)
        for name in ("train", "validation"):
            assert torch.equal(rows[name], expected[name]), (out, name)
    # Same input, same files byte for byte.
    for name in ("train", "validation"):
        m1 = json.loads((tmp_path / "o_jsonl" / name / MANIFEST).read_text())
        m2 = json.loads((tmp_path / "o_jsonl2" / name / MANIFEST).read_text())
        assert m1 == m2 and len(m1["files"]) >= 1
        for f in m1["files"]:
            assert (tmp_path / "o_jsonl" / name / f["path"]).read_bytes() == (tmp_path / "o_jsonl2" / name / f["path"]).read_bytes()

    top = json.loads((tmp_path / "o_text" / MANIFEST).read_text())
    assert top["kind"] == "tokenized_dataset" and top["seq_len"] == SEQ
    assert top["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_model_dir)
    assert top["splits"]["train"]["rows"] == len(expected["train"]) == metrics["train_rows"]
    shard_manifest = json.loads((tmp_path / "o_text" / "train" / MANIFEST).read_text())
    assert shard_manifest["kind"] == "token_shards" and shard_manifest["eos_token_id"] == load_tokenizer(tiny_model_dir).eos_token_id
    assert shard_manifest["tokens"] == shard_manifest["rows"] * SEQ
    assert [f["rows"] for f in shard_manifest["files"]][:-1] == [40] * (len(shard_manifest["files"]) - 1)
    assert metrics["documents"] == len(docs)


def test_errors_found_before_any_work(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataSourceError, match="empty"):
        _run(empty, tiny_model_dir, tmp_path / "o1")
    with pytest.raises(DataSourceError, match="matches no files"):
        _run(tmp_path / "nothing-*.txt", tiny_model_dir, tmp_path / "o2")
    missing = _write_jsonl(tmp_path / "m.jsonl", [{"body": "x"}])
    with pytest.raises(DataSourceError, match="'text' is missing"):
        _run(missing, tiny_model_dir, tmp_path / "o3")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "pq" / "a.parquet")
    with pytest.raises(DataSourceError, match="'text'.*int64, not a string"):
        _run(tmp_path / "pq", tiny_model_dir, tmp_path / "o4")
    with pytest.raises(DataSourceError, match="'content' is missing"):
        _run(tmp_path / "pq", tiny_model_dir, tmp_path / "o5", text_field="content")
    for i in range(5):
        assert not (tmp_path / f"o{i + 1}").exists()


def test_errors_found_while_reading_name_the_field(ray_cluster, tmp_path, docs, tiny_model_dir):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": docs[0]}, {"text": docs[1]}, {"text": 42}])
    with pytest.raises(DataSourceError, match="'text'.*holds int, not a string"):
        _run(bad, tiny_model_dir, tmp_path / "o1")
    gap = _write_jsonl(tmp_path / "gap.jsonl", [{"text": docs[0]}, {"title": "no text here"}])
    with pytest.raises(DataSourceError, match="'text' is missing"):
        _run(gap, tiny_model_dir, tmp_path / "o2")
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("")
    (blank / "b.txt").write_text("")
    with pytest.raises(DataSourceError, match="no documents"):
        _run(blank, tiny_model_dir, tmp_path / "o3")
    for i in range(3):  # no manifest: nothing is taken for complete
        assert not (tmp_path / f"o{i + 1}" / MANIFEST).exists()


def test_a_split_without_one_full_row_names_the_fix(ray_cluster, tmp_path, docs, tiny_model_dir):
    few = _write_jsonl(tmp_path / "few.jsonl", [{"text": d} for d in docs[:3]])
    with pytest.raises(DataSourceError, match="validation split.*validation_fraction"):
        run_tokenize(TokenizeConfig(source=str(few), seq_len=SEQ, validation_fraction=1e-9), tiny_model_dir, tmp_path / "o")
