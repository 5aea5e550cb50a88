"""The logit-cache / token-shard readers: exact read-back, refusals, deterministic rank sharding."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from slimmoe.tasks.data.formats import MANIFEST, LogitCacheError, LogitCacheManifest, numpy_to_binary_column
from slimmoe.tasks.data.readers import open_logit_cache, open_token_shards, tile_files
from slimmoe.tasks.data.shards import write_token_shards

T, K, V = 6, 4, 300


def _synthetic_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, V, (n, T)).astype(np.int32)
    topk_ids = np.stack([np.stack([rng.permutation(V)[:K] for _ in range(T)]) for _ in range(n)]).astype(np.uint16)
    topk_logprobs = np.sort(-rng.exponential(2.0, (n, T, K)), axis=-1)[..., ::-1].astype(np.float16)
    rest = np.log1p(-np.exp(topk_logprobs.astype(np.float64)).sum(-1).clip(max=0.99)).astype(np.float32)
    return input_ids, topk_ids, topk_logprobs, rest


def write_cache(path, n=23, rows_per_file=5, seed=0, teacher="teach0", tokenizer="tok0"):
    """A logit cache written the way the teacher_logits node writes one."""
    path.mkdir(parents=True)
    input_ids, topk_ids, topk_logprobs, rest = _synthetic_rows(n, seed)
    files = []
    for i, lo in enumerate(range(0, n, rows_per_file)):
        hi = min(n, lo + rows_per_file)
        offsets = pa.array(np.arange(0, (hi - lo) * T + 1, T, dtype=np.int32))
        table = pa.table({
            "row_id": pa.array(np.arange(lo, hi, dtype=np.int64)),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(input_ids[lo:hi].reshape(-1))),
            "topk_ids": numpy_to_binary_column(topk_ids[lo:hi]),
            "topk_logprobs": numpy_to_binary_column(topk_logprobs[lo:hi]),
            "rest_logprob": numpy_to_binary_column(rest[lo:hi]),
        })
        name = f"rows-{i}.parquet"
        pq.write_table(table, path / name)
        files.append({"path": name, "rows": hi - lo, "bytes": (path / name).stat().st_size})
    LogitCacheManifest(teacher_fingerprint=teacher, tokenizer_fingerprint=tokenizer, k=K, seq_len=T, vocab_size=V,
                       rows=n, tokens=n * T, files=files).write(path)
    return input_ids, topk_ids, topk_logprobs, rest


@pytest.fixture()
def cache_dir(tmp_path):
    arrays = write_cache(tmp_path / "cache")
    return tmp_path / "cache", arrays


def test_read_rows_returns_exactly_what_was_written(cache_dir):
    path, (input_ids, topk_ids, topk_logprobs, rest) = cache_dir
    cache = open_logit_cache(path)
    assert (cache.num_rows, cache.k, cache.seq_len, cache.vocab_size) == (23, K, T, V)
    idx = [22, 0, 7, 7, 13]  # across files, repeated, out of order
    got = cache.read_rows(idx)
    assert got["row_id"].tolist() == idx
    assert torch.equal(got["input_ids"], torch.from_numpy(input_ids[idx].astype(np.int64)))
    assert torch.equal(got["topk_ids"], torch.from_numpy(topk_ids[idx].astype(np.int64)))
    assert torch.equal(got["topk_logprobs"], torch.from_numpy(topk_logprobs[idx].astype(np.float32)))
    assert torch.equal(got["rest_logprob"], torch.from_numpy(rest[idx]))
    assert got["topk_logprobs"].dtype == torch.float32 and got["topk_ids"].dtype == torch.long
    whole = cache.read_rows(np.arange(23))
    assert torch.equal(whole["input_ids"], torch.from_numpy(input_ids.astype(np.int64)))


def test_small_memory_budget_still_reads_correctly(tmp_path):
    input_ids, *_ = write_cache(tmp_path / "c", n=17, rows_per_file=3)
    cache = open_logit_cache(tmp_path / "c", cache_bytes=1)  # evicts after every file
    got = cache.read_rows(np.arange(17)[::-1])
    assert torch.equal(got["input_ids"], torch.from_numpy(input_ids[::-1].astype(np.int64)))
    assert len(cache._cache) == 1


def test_missing_manifest_is_an_incomplete_cache(cache_dir):
    path, _ = cache_dir
    (path / MANIFEST).unlink()
    with pytest.raises(LogitCacheError, match="incomplete"):
        open_logit_cache(path)


@pytest.mark.parametrize("damage, message", [
    ("remove", "missing"),
    ("truncate", "bytes"),
    ("rows", "rows"),
    ("extra_listing", "missing"),
])
def test_files_that_differ_from_the_manifest_are_refused(cache_dir, damage, message):
    path, _ = cache_dir
    manifest = json.loads((path / MANIFEST).read_text())
    victim = path / manifest["files"][2]["path"]
    if damage == "remove":
        victim.unlink()
    elif damage == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "rows":
        manifest["files"][2]["rows"] += 1
        manifest["rows"] += 1
        (path / MANIFEST).write_text(json.dumps(manifest))
    else:
        manifest["files"].append({"path": "rows-99.parquet", "rows": 1, "bytes": 10})
        (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LogitCacheError, match=message):
        open_logit_cache(path)


def test_leftover_files_not_in_the_manifest_are_ignored(cache_dir):
    path, (input_ids, *_) = cache_dir
    shutil.copy(path / "rows-0.parquet", path / "leftover-from-a-retry.parquet")
    cache = open_logit_cache(path)
    assert cache.num_rows == 23
    assert torch.equal(cache.read_rows(range(23))["input_ids"], torch.from_numpy(input_ids.astype(np.int64)))


def test_fingerprint_mismatch_is_refused(cache_dir):
    path, _ = cache_dir
    open_logit_cache(path, expect_teacher_fingerprint="teach0", expect_tokenizer_fingerprint="tok0")
    with pytest.raises(LogitCacheError, match="teacher fingerprint teach0.*other"):
        open_logit_cache(path, expect_teacher_fingerprint="other")
    with pytest.raises(LogitCacheError, match="tokenizer fingerprint tok0"):
        open_logit_cache(path, expect_tokenizer_fingerprint="other")


def test_a_node_output_with_splits_names_them(tmp_path):
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / MANIFEST).write_text(json.dumps({"kind": "teacher_logits", "splits": ["train", "validation"]}))
    with pytest.raises(LogitCacheError, match="train, validation"):
        open_logit_cache(tmp_path / "node")


def _all_ranks(cache, batch_size, world_size, **kw):
    return [[b["row_id"].tolist() for b in cache.iter_batches(batch_size, rank=r, world_size=world_size, **kw)]
            for r in range(world_size)]


def test_rank_shards_are_disjoint_equal_and_deterministic(tmp_path):
    write_cache(tmp_path / "c", n=41, rows_per_file=4)
    cache = open_logit_cache(tmp_path / "c")
    ranks = _all_ranks(cache, 3, 4, seed=5, epoch=2)
    assert [len(r) for r in ranks] == [cache.num_batches(3, 4)] * 4 == [3] * 4
    flat = [i for r in ranks for b in r for i in b]
    assert all(len(b) == 3 for r in ranks for b in r)
    assert len(flat) == len(set(flat)) == 36 and set(flat) <= set(range(41))
    assert _all_ranks(cache, 3, 4, seed=5, epoch=2) == ranks  # same (seed, epoch): same batches
    assert _all_ranks(cache, 3, 4, seed=5, epoch=3) != ranks  # next epoch: another order
    assert _all_ranks(cache, 3, 4, seed=6, epoch=2) != ranks
    # Resume: start_batch skips exactly the consumed batches.
    resumed = [b["row_id"].tolist() for b in cache.iter_batches(3, rank=1, world_size=4, seed=5, epoch=2, start_batch=2)]
    assert resumed == ranks[1][2:]
    # The full shuffle covers every file at this size; no shuffle is row order.
    assert [b["row_id"].tolist() for b in cache.iter_batches(10, shuffle=False)] == [list(range(i, i + 10)) for i in range(0, 40, 10)]


def test_windowed_shuffle_is_a_permutation(tmp_path):
    write_cache(tmp_path / "c", n=40, rows_per_file=4)
    cache = open_logit_cache(tmp_path / "c", shuffle_window_bytes=1)  # one file per window
    order = cache.order(seed=1, epoch=0)
    assert sorted(order.tolist()) == list(range(40))
    # Each window is one file: consecutive groups of 4 come from one file.
    assert all(len({int(i) // 4 for i in order[j : j + 4]}) == 1 for j in range(0, 40, 4))


def test_too_few_rows_for_the_world_is_a_clear_error(tmp_path):
    write_cache(tmp_path / "c", n=5, rows_per_file=5)
    cache = open_logit_cache(tmp_path / "c")
    with pytest.raises(LogitCacheError, match="fewer than batch_size"):
        next(cache.iter_batches(4, rank=0, world_size=2))
    with pytest.raises(ValueError, match="rank"):
        next(cache.iter_batches(1, rank=2, world_size=2))


def test_token_shards_round_trip_and_kind_check(tmp_path):
    rows = np.random.default_rng(1).integers(0, 1000, (13, 8))
    m = write_token_shards(tmp_path / "s", rows, "tokfp", eos_token_id=2, rows_per_file=4)
    assert [f["rows"] for f in m["files"]] == [4, 4, 4, 1] and m["tokens"] == 13 * 8
    shards = open_token_shards(tmp_path / "s", expect_tokenizer_fingerprint="tokfp")
    got = shards.read_rows([12, 0, 5])
    assert torch.equal(got["input_ids"], torch.from_numpy(rows[[12, 0, 5]]))
    assert got["row_id"].tolist() == [12, 0, 5]
    batches = list(shards.iter_batches(2, rank=1, world_size=2, seed=3))
    assert len(batches) == shards.num_batches(2, 2) == 3
    with pytest.raises(LogitCacheError, match="tokenizer fingerprint"):
        open_token_shards(tmp_path / "s", expect_tokenizer_fingerprint="other")
    with pytest.raises(LogitCacheError, match="token_shards"):
        open_logit_cache(tmp_path / "s")


def test_tile_files_drops_retry_copies_and_finds_gaps(tmp_path):
    for name in ("a", "b", "c", "dup"):
        (tmp_path / name).write_bytes(b"x")
    spans = [{"path": "a", "first": 0, "rows": 3, "bytes": 1}, {"path": "dup", "first": 0, "rows": 3, "bytes": 1},
             {"path": "b", "first": 3, "rows": 2, "bytes": 1}, {"path": "c", "first": 5, "rows": 4, "bytes": 1}]
    entries = tile_files(tmp_path, spans, 9)
    assert [e["rows"] for e in entries] == [3, 2, 4]
    assert sum((tmp_path / n).exists() for n in ("a", "dup")) == 1  # one copy of rows 0..2 kept
    with pytest.raises(RuntimeError, match="row 5"):
        tile_files(tmp_path, spans[:3], 9)

