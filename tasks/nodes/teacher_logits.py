"""The teacher_logits node: token shards -> top-k teacher log-probs cached as Parquet, per split.

One Ray Data pipeline for all splits (so each teacher loads once): read_parquet(the token shards'
manifest files, each row tagged with its split) -> map_batches(teacher) on an actor pool (one
teacher per actor: bf16 on `gpus_per_actor` GPUs of one node when the cluster has GPUs, float32
on CPU otherwise) -> map_batches(write files of about `rows_per_file` rows) as parallel tasks ->
the driver collects what was written and writes each split's manifest, then the top-level one, last.

GPUs per actor. A teacher too big for one GPU (Phi-3.5-MoE is 84 GB in bf16) is split over the
actor's GPUs layer by layer with an explicit balanced `device_map` (`core.placement`), the
logits' GPU keeping room for them; Ray gives the actor `num_gpus=gpus_per_actor` of one node.
`auto` takes the fewest GPUs that hold the weights plus a batch's activations and logits
(`planning.memory.teacher_actor_gpus`), with the GPU memory from `gpu_memory_gb` (the workflow's
`resources.gpu_memory_gb`) or else asked of a GPU worker. All of it is checked on the driver before
the pool starts: more GPUs than the biggest node has, or gpus_per_actor > 1 for a pass that runs on
CPU, is an error naming `logits.gpus_per_actor` (an error, not a warning: the setting exists for a
teacher that does not fit one GPU, and running that teacher on CPU instead would take days).

Keeping the forward busy. The actor is an async UDF with `pipeline_depth` batches in flight, each
through two one-thread stages: the forward (on a GPU also the top-k, milliseconds there, and the
copy of the small top-k tensors to host memory), then the finish (on CPU the top-k,
an exp pass over [tokens, vocab] that costs about a third of the forward; the float16 encoding,
the finite checks, the Arrow columns). torch, numpy and pyarrow release the GIL, so at depth 2
the finish of one batch runs while the next batch's forward does, and at most two batches' logits
are alive. Parquet encoding and writing stay in the separate write stage. Depth 2 is the default on
GPU, and on CPU when `cpus_per_actor` leaves a CPU beside `torch_threads`; otherwise 1, because the
finish then has no core of its own. Measured by benchmarks/teacher_logits.py (221k tokens, one CPU
actor with one torch thread, 2 cores): with a spare core, depth 2 runs at 0.91x the bare forward
end to end and ~1.0x at the margin, against 0.71x and 0.79x in series; on the same machine busy
with other work (load 20) the two stages slow each other down (a forward 1.2 s instead of 0.58, a
finish 0.53 s instead of 0.17) and depth 2 fell to 0.38x. The CPU top-k runs on a few rows at a
time, its scratch in cache (155 instead of 200 ms per 1024 tokens at a 32k vocabulary; same numbers).

Why the files are written by our own map_batches stage and not `write_parquet`: readers look rows
up by row id, so every file must hold one ascending run of row ids. `write_parquet` bundles blocks
without keeping their order even under `preserve_order` (measured on Ray 2.60: one file with rows
399, 416, ..., 408), names files by a per-write uuid and is not atomic. Our writer sorts its batch
by row id, writes one file per contiguous run under a name made of the run
(`rows-000000000000-000000001023.parquet`) through a temporary name, so a retried task rewrites
the same file, and the manifest lists the files that tile 0..N-1 (copies left by retries are
deleted; readers never list the directory anyway). The output directory must be on storage every
node sees (a local path on one machine, NFS, or a mounted bucket), as with `write_parquet`.

Per token the cache keeps the top-k ids, their log-probs normalised over the FULL vocabulary,
and the exact log-mass outside the top-k (float32, summed over the complement, so it stays exact when the top-k holds almost all the mass),
as `slimming.losses.topk_with_rest` defines them, computed by `fast_topk_with_rest` (same numbers, one exp
pass instead of two). Encoding: see `slimmoe.tasks.data.formats`.

Integrity: each file is written with Parquet page checksums, its footer stamped with the teacher
and tokenizer fingerprints, and its manifest entry carries a checksum of its bytes. The token
shards are checked against their checksums before the pass (a damaged shard is named on the
driver, not inside a Ray task), and a batch whose log-probs hold NaN or inf fails the pass rather
than being cached for every later stage to train on.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from slimmoe.tasks.core.checkpoint import has_tokenizer, load_config
from slimmoe.tasks.core.fingerprint import model_fingerprint, tokenizer_fingerprint
from slimmoe.tasks.core.runtime import Progress, ensure_ray, quiet_ray_data_progress
from slimmoe.tasks.core.storage import ensure_free_output
from slimmoe.tasks.core.dtypes import dtype_bytes
from slimmoe.tasks.core.kernels import device_capability, enable_gpu_numerics
from slimmoe.tasks.data.config import PassFacts, TeacherLogitsConfig, TeacherPass
from slimmoe.tasks.data.formats import (LogitCacheError, LogitCacheManifest, TeacherLogitsManifest, ids_dtype,
                                        list_column_to_numpy, numpy_to_binary_column, read_manifest, write_parquet_file)
from slimmoe.tasks.data.readers import open_token_shards, page_verifying_scan_options, split_dirs, tile_files
from slimmoe.tasks.planning.memory import model_shape, teacher_logit_bytes
from slimmoe.tasks.slimming.losses import fast_topk_with_rest

# The CPU top-k's scratch: about an L2 cache (a few rows of logits at a time).
CPU_TOPK_SCRATCH_BYTES = 2 * 2**20


class _TeacherActor:
    """One teacher per actor, loaded once (split over the actor's GPUs when it has several); turns
    batches of sequences into cache rows with up to `pipeline_depth` batches in flight.

    An async UDF, so that Ray Data hands it the next batch before the last one is done. Each batch
    goes through two one-thread stages: the forward (and on a GPU the top-k, milliseconds there),
    then the finish (on CPU the top-k, the heavy part: one exp pass over [tokens, vocab]; the
    float16 encoding, the finite checks and the Arrow columns). A semaphore of `pipeline_depth` keeps
    at most that many batches' logits alive. torch and most of numpy / pyarrow release the GIL, so
    the finish of batch i runs while the forward of batch i+1 does."""

    def __init__(self, teacher_dir: str, k: int, dtype: str, device: str, gpus: int, experts_implementation: str,
                 trust_remote_code: bool, torch_threads: int | None, vocab_size: int, split_of_path: dict[str, int],
                 pipeline_depth: int = 2, head_reserve_bytes: int = 0):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from slimmoe.tasks.core.checkpoint import load_model
        from slimmoe.tasks.core.placement import balanced_device_map, input_device

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if device == "cuda":
            enable_gpu_numerics(torch.device("cuda"))
            experts_implementation = TeacherLogitsConfig.kernel_for(
                experts_implementation, True, device_capability(torch.device("cuda")), dtype)
        self.experts_implementation = experts_implementation
        self.torch = torch
        self.device = device
        self.k = k
        self.vocab_size = vocab_size
        self.ids_dtype = ids_dtype(vocab_size)
        self.work = None  # scratch [rows, vocab] float32 for the CPU top-k, reused across batches
        self.split_of_path = split_of_path
        device_map = None
        if device == "cuda" and gpus > 1:
            visible = torch.cuda.device_count()
            if visible < gpus:
                raise RuntimeError(f"this teacher actor was given {gpus} GPUs by Ray but sees {visible} CUDA "
                                   f"device(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
            device_map = balanced_device_map(load_config(teacher_dir, trust_remote_code), list(range(gpus)),
                                             reserve_bytes=head_reserve_bytes, dtype_bytes=dtype_bytes(dtype))
        self.model = load_model(teacher_dir, dtype=getattr(torch, dtype), device=device,
                                trust_remote_code=trust_remote_code, experts_implementation=experts_implementation,
                                device_map=device_map).eval()
        self.input_device = input_device(self.model)
        self.depth = max(1, int(pipeline_depth))
        self.slots = None  # (the event loop Ray Data runs __call__ on, its semaphore)
        self.forward_stage = ThreadPoolExecutor(1, thread_name_prefix="teacher-forward")
        self.finish_stage = ThreadPoolExecutor(1, thread_name_prefix="teacher-finish")

    async def __call__(self, batch):
        import asyncio

        loop = asyncio.get_running_loop()
        if self.slots is None or self.slots[0] is not loop:  # an asyncio semaphore serves one loop
            self.slots = (loop, asyncio.Semaphore(self.depth))
        async with self.slots[1]:
            staged = await loop.run_in_executor(self.forward_stage, self.forward, batch)
            return await loop.run_in_executor(self.finish_stage, self.finish, batch, staged)

    def forward(self, batch):
        """The teacher's logits of a batch (CPU), or its top-k in host memory (GPU)."""
        torch = self.torch
        n = batch.num_rows
        col = batch.column("input_ids").combine_chunks()
        seq_len = (col.offsets[-1].as_py() - col.offsets[0].as_py()) // max(1, n)
        ids = list_column_to_numpy(col, seq_len)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id {int(ids.max())} is outside the teacher's vocabulary of {self.vocab_size}: "
                             "the tokens were made with another tokenizer")
        with torch.inference_mode():
            x = torch.from_numpy(ids.astype(np.int64)).to(self.input_device)
            logits = self.model(input_ids=x, use_cache=False).logits.float()
            if logits.device.type == "cpu":
                return logits
            # On a GPU the top-k takes milliseconds and waits for the forward anyway (it checks for
            # underflowed rows on the host); what leaves the GPU is k/vocab of the logits.
            topk_ids, topk_logprobs, rest = fast_topk_with_rest(logits, self.k)
            return topk_ids.to(torch.int32).cpu(), topk_logprobs.to(torch.float16).cpu(), rest.cpu()

    def _topk_by_rows(self, logits):
        """`fast_topk_with_rest` over a few rows of logits at a time (the same numbers: every row is
        independent), so that its exp pass and scratch stay in cache: the logits are read from memory
        once instead of three times (measured here: 155 instead of 200 ms per 1024 tokens at a 32k
        vocabulary, while a forward takes ~525)."""
        torch = self.torch
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        rows = max(1, CPU_TOPK_SCRATCH_BYTES // (4 * vocab))
        if self.work is None or self.work.shape != (rows, vocab):
            self.work = torch.empty(rows, vocab, dtype=logits.dtype)
        parts = [fast_topk_with_rest(chunk, self.k, self.work[: len(chunk)]) for chunk in flat.split(rows)]
        lead = logits.shape[:-1]
        return (torch.cat([p[0] for p in parts]).view(*lead, self.k), torch.cat([p[1] for p in parts]).view(*lead, self.k),
                torch.cat([p[2] for p in parts]).view(lead))

    def finish(self, batch, staged):
        """Cache rows of a batch from what `forward` gave: top-k ids, float16 log-probs, float32 rest."""
        torch = self.torch
        if isinstance(staged, tuple):
            topk_ids, topk_logprobs, rest = staged
        else:
            logits = staged
            with torch.inference_mode():
                topk_ids, topk_logprobs, rest = self._topk_by_rows(logits)
                del logits, staged
                topk_ids, topk_logprobs = topk_ids.to(torch.int32), topk_logprobs.to(torch.float16)
        topk_ids = topk_ids.numpy().astype(self.ids_dtype)
        topk_logprobs = topk_logprobs.numpy()
        rest = rest.to(torch.float32).numpy()
        n = batch.num_rows
        paths = batch.column("path").to_pylist()
        for name, values in (("top-k log-probs", topk_logprobs), ("rest log-mass", rest)):
            bad = ~np.isfinite(values)
            if bad.any():
                first = int(np.nonzero(bad.reshape(n, -1).any(axis=1))[0][0])
                raise ValueError(
                    f"the teacher gave {int(bad.sum())} non-finite {name} (NaN or inf) in this batch, the first for row "
                    f"{batch.column('row_id')[first].as_py()} of {paths[first]}: its weights are broken or its dtype "
                    "overflows (try dtype float32); no manifest is written, so nothing of this pass counts as a cache")
        return _cache_rows(batch, self.split_of_path, topk_ids, topk_logprobs, rest)


def _cache_rows(batch, split_of_path: dict[str, int], topk_ids, topk_logprobs, rest):
    import pyarrow as pa

    split = np.array([split_of_path[_norm(p)] for p in batch.column("path").to_pylist()], dtype=np.int8)
    return pa.table({
        "split": pa.array(split),
        "row_id": batch.column("row_id").combine_chunks().cast(pa.int64()),
        "input_ids": batch.column("input_ids").combine_chunks(),
        "topk_ids": numpy_to_binary_column(topk_ids),
        "topk_logprobs": numpy_to_binary_column(topk_logprobs),
        "rest_logprob": numpy_to_binary_column(rest),
    })


def _norm(path) -> str:
    return os.path.normpath(os.path.abspath(str(path)))


def write_row_runs(batch, root: str, splits: list[str], compression: str, provenance: dict | None = None):
    """Write a batch of cache rows as one Parquet file per split and contiguous run of row ids, under
    root/<split>/, with `provenance` (the fingerprints) in each footer; return what was written
    (split, path, first, rows, bytes, checksum) for the manifests."""
    import pyarrow as pa
    import pyarrow.compute as pc

    meta = {"split": [], "path": [], "first": [], "rows": [], "bytes": [], "checksum": []}
    split_col = batch.column("split").to_numpy(zero_copy_only=False)
    for s in np.unique(split_col):
        part = batch.filter(pc.equal(batch.column("split"), pa.scalar(int(s), pa.int8()))).drop_columns(["split"])
        rid = part.column("row_id").to_numpy(zero_copy_only=False)
        order = np.argsort(rid, kind="stable")
        if not np.array_equal(order, np.arange(len(rid))):
            part, rid = part.take(pa.array(order)), rid[order]
        cuts = np.nonzero(np.diff(rid) != 1)[0] + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rid)]])):
            first, last = int(rid[lo]), int(rid[hi - 1])
            name = f"rows-{first:012d}-{last:012d}.parquet"
            directory = Path(root) / splits[int(s)]
            written = write_parquet_file(part.slice(lo, hi - lo), directory / name, provenance, compression=compression,
                                         use_dictionary=False, write_statistics=["row_id"])
            for key, value in (("split", int(s)), ("path", name), ("first", first), ("rows", int(hi - lo)),
                               ("bytes", written["bytes"]), ("checksum", written["checksum"])):
                meta[key].append(value)
    return pa.table({"split": pa.array(meta["split"], pa.int8()), "path": pa.array(meta["path"], pa.string()),
                     "first": pa.array(meta["first"], pa.int64()), "rows": pa.array(meta["rows"], pa.int64()),
                     "bytes": pa.array(meta["bytes"], pa.int64()), "checksum": pa.array(meta["checksum"], pa.string())})


def pass_facts(cfg: TeacherLogitsConfig) -> PassFacts:
    """The cluster's facts the pass's settings depend on (not this process's own devices). One GPU's
    memory is asked of a GPU worker only when `gpus_per_actor: auto` needs it and no config gives it."""
    import ray

    has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    facts = PassFacts(cluster_has_gpus=has_gpus, gpus_per_node=_biggest_node_gpus() or 8)
    device = cfg.pass_device(has_gpus)
    if device == "cuda" and not has_gpus:
        warnings.warn(f"the Ray cluster has no GPUs now; waiting up to wait_for_actors_s={cfg.wait_for_actors_s}s "
                      "for GPU nodes (an autoscaler may be adding them)", stacklevel=2)
    if device == "cuda" and cfg.gpus_per_actor == "auto" and not cfg.gpu_memory_gb:
        facts = replace(facts, gpu_memory_bytes=_probe_gpu_memory(cfg))
    return facts


def _biggest_node_gpus() -> int:
    import ray

    return int(max((n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0))


def _probe_gpu_memory(cfg: TeacherLogitsConfig) -> int:
    """The memory of one GPU as a GPU worker sees it (the driver may have none)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def gpu_memory() -> int:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else 0

    ref = gpu_memory.remote()
    try:
        got = ray.get(ref, timeout=cfg.wait_for_actors_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        got = 0
    if not got:
        raise ValueError(f"logits.gpus_per_actor: auto needs the memory of one GPU, and no GPU worker answered within "
                         f"wait_for_actors_s={cfg.wait_for_actors_s}s; set resources.gpu_memory_gb (logits.gpu_memory_gb, "
                         "--gpu-memory-gb by hand), or give logits.gpus_per_actor a number")
    return got


def resolve_teacher_pass(cfg: TeacherLogitsConfig, model_config, seq_len: int) -> TeacherPass:
    """The pass's settings on this cluster, checked against it before the pool starts."""
    resolved = cfg.resolve_pass(pass_facts(cfg), model_config, seq_len)
    biggest = _biggest_node_gpus()  # 0 while an autoscaler has not started any GPU node yet
    gpus = resolved.gpus_per_actor
    if biggest and gpus > biggest:
        raise ValueError(f"logits.gpus_per_actor={gpus}, but the biggest node of the Ray cluster has {biggest} GPUs "
                         "(an actor's GPUs must be on one node); lower logits.gpus_per_actor, or add nodes with more GPUs")
    return resolved


def teacher_pool_args(cfg: TeacherLogitsConfig, device: str, gpus: int) -> dict[str, Any]:
    """The actor pool's arguments to `map_batches`: the pool and each actor's Ray resources."""
    import ray

    args: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=cfg.actor_pool_size), "num_cpus": cfg.cpus_per_actor}
    if device == "cuda":  # on CPU no GPU request at all (a GPU request without GPUs waits forever)
        args["num_gpus"] = gpus
    if cfg.memory_per_actor_gb:
        args["memory"] = int(cfg.memory_per_actor_gb * 2**30)
    return args


def _no_actors_error(cfg: TeacherLogitsConfig, device: str, gpus: int = 1) -> ValueError:
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    want = f"{cfg.actor_pool_size} actor(s) with {cfg.cpus_per_actor} CPU" + (f" and {gpus} GPU" if device == "cuda" else "")
    fix = ("add GPU nodes, or run on CPU (logits.device: cpu, or resources.use_gpu: false)" if device == "cuda"
           else "lower resources.actor_pool_size or logits.cpus_per_actor, or add nodes")
    return ValueError(f"no teacher actor started within wait_for_actors_s={cfg.wait_for_actors_s}s: the pool needs {want}, "
                      f"the cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs and {have:g} GPUs; {fix}")


def run_teacher_logits(cfg: TeacherLogitsConfig, teacher_dir: str | Path, tokens_dir: str | Path,
                       out_dir: str | Path) -> dict[str, Any]:
    """Cache the teacher's top-k log-probs for every split of `tokens_dir` into `out_dir`/<split>/."""
    teacher_dir, tokens_dir, out_dir = Path(teacher_dir), Path(tokens_dir), Path(out_dir)
    ensure_free_output(out_dir)
    config = load_config(teacher_dir, cfg.trust_remote_code)
    vocab_size = int(config.vocab_size)
    in_manifest = read_manifest(tokens_dir)
    inputs = split_dirs(tokens_dir)
    shards = {name: open_token_shards(d) for name, d in inputs.items()}
    tok_fps = {s.manifest["tokenizer_fingerprint"] for s in shards.values()}
    if len(tok_fps) != 1:
        raise LogitCacheError(f"the splits of {tokens_dir} were made with different tokenizers ({sorted(tok_fps)}); tokenize again")
    tok_fp = tok_fps.pop()
    if has_tokenizer(teacher_dir) and tokenizer_fingerprint(teacher_dir) != tok_fp:
        raise ValueError(f"the tokens in {tokens_dir} were made with tokenizer {tok_fp}, but the teacher {teacher_dir} "
                         f"carries tokenizer {tokenizer_fingerprint(teacher_dir)}; tokenize the data with the teacher's tokenizer")
    if in_manifest.get("vocab_size") and int(in_manifest["vocab_size"]) > vocab_size:
        raise ValueError(f"the tokenizer of {tokens_dir} has {in_manifest['vocab_size']} tokens, more than the teacher's "
                         f"vocabulary of {vocab_size}; tokenize with the teacher's tokenizer")
    if cfg.k >= vocab_size:
        raise ValueError(f"k={cfg.k} must be smaller than the teacher's vocabulary ({vocab_size})")
    teacher_fp = model_fingerprint(teacher_dir)
    for shard in shards.values():
        shard.verify_checksums()
    tokenizer_path = str(teacher_dir.resolve()) if has_tokenizer(teacher_dir) else in_manifest.get("tokenizer_path")

    import ray

    ensure_ray()
    seq_len = max(s.seq_len for s in shards.values())
    resolved = resolve_teacher_pass(cfg, config, seq_len)
    device, dtype, gpus, depth, threads = (resolved.device, resolved.dtype, resolved.gpus_per_actor,
                                           resolved.pipeline_depth, resolved.torch_threads)
    head_reserve = 0
    if gpus > 1:  # the logits and their top-k buffers sit on the GPU of the output head
        head_reserve = teacher_logit_bytes(model_shape(config), cfg.batch_size * seq_len, dtype_bytes(dtype), cfg.k)
    names = list(shards)
    created_out_dir = not out_dir.exists()
    for name in names:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # One pipeline (and one file listing) over every split, so the teacher loads once; each row's
    # split comes from the path of the file it was read from.
    split_of_path = {_norm(f): i for i, name in enumerate(names) for f in shards[name].files}
    ds = ray.data.read_parquet(list(split_of_path), include_paths=True, file_extensions=None, num_cpus=0.5,
                               fragment_scan_options=page_verifying_scan_options())
    ds = ds.select_columns(["row_id", "input_ids", "path"])
    ds = ds.map_batches(
        _TeacherActor, batch_size=cfg.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs=dict(teacher_dir=str(teacher_dir.resolve()), k=cfg.k, dtype=dtype, device=device,
                                   gpus=gpus, experts_implementation=resolved.experts_kernel,
                                   trust_remote_code=cfg.trust_remote_code, torch_threads=threads, vocab_size=vocab_size,
                                   split_of_path=split_of_path, pipeline_depth=depth,
                                   head_reserve_bytes=head_reserve),
        **teacher_pool_args(cfg, device, gpus),
    )
    # Half a CPU: writing is light, and must not wait behind the actors for a whole free CPU.
    ds = ds.map_batches(write_row_runs, batch_size=cfg.rows_per_file, batch_format="pyarrow", num_cpus=0.5,
                        fn_kwargs={"root": str(out_dir.resolve()), "splits": names, "compression": cfg.compression,
                                   "provenance": {"teacher_fingerprint": teacher_fp, "tokenizer_fingerprint": tok_fp}})
    # In-order blocks give long runs, i.e. few files (correctness does not depend on the order).
    ds.context.execution_options.preserve_order = True
    ds.context.wait_for_min_actors_s = cfg.wait_for_actors_s
    ds.context.raise_original_map_exception = True  # e.g. a token id outside the vocabulary: keep its message
    quiet_ray_data_progress(ds.context)
    progress = Progress("teacher_logits", sum(s.num_rows for s in shards.values()), "rows")
    try:
        written = []
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            rows = b.to_pylist()
            written.extend(rows)
            progress.advance(sum(int(r["rows"]) for r in rows))
        progress.finish()
    except ray.exceptions.GetTimeoutError as err:
        # No actor ever ran, so nothing was written: leave the output path as it was found.
        for name in names:
            (out_dir / name).rmdir()
        if created_out_dir:
            out_dir.rmdir()
        raise _no_actors_error(cfg, device, gpus) from err
    summary: dict[str, dict] = {}
    for i, name in enumerate(names):
        shard, split_dir = shards[name], out_dir / name
        files = tile_files(split_dir, [w for w in written if w["split"] == i], shard.num_rows)
        disk = sum(f["bytes"] for f in files)
        tokens = shard.num_rows * shard.seq_len
        LogitCacheManifest(
            split=name, teacher_fingerprint=teacher_fp, tokenizer_fingerprint=tok_fp, k=cfg.k, seq_len=shard.seq_len,
            vocab_size=vocab_size, rows=shard.num_rows, tokens=tokens, eos_token_id=shard.manifest.get("eos_token_id"),
            dtypes={"row_id": "int64", "input_ids": "int32", "topk_ids": ids_dtype(vocab_size).name,
                    "topk_logprobs": "float16", "rest_logprob": "float32"},
            compression=cfg.compression, files=files, disk_bytes=disk,
            bytes_per_token=disk / max(1, tokens), teacher_dir=str(teacher_dir.resolve()),
            tokenizer_path=tokenizer_path, tokens_dir=str(inputs[name].resolve()),
            compute={"device": device, "dtype": dtype, "experts_implementation": resolved.experts_kernel,
                     "actor_pool_size": cfg.actor_pool_size, "gpus_per_actor": gpus, "pipeline_depth": depth,
                     "batch_size": cfg.batch_size},
        ).write(split_dir)
        summary[name] = {"rows": shard.num_rows, "tokens": tokens, "disk_bytes": disk}
    seconds = time.perf_counter() - t0
    TeacherLogitsManifest(
        splits=list(shards), teacher_fingerprint=teacher_fp, tokenizer_fingerprint=tok_fp, k=cfg.k,
        vocab_size=vocab_size, seq_len=next(iter(shards.values())).seq_len, tokenizer_path=tokenizer_path,
        teacher_dir=str(teacher_dir.resolve()), split_rows={n: v["rows"] for n, v in summary.items()},
        config=cfg.model_dump(),
    ).write(out_dir)
    tokens = sum(v["tokens"] for v in summary.values())
    disk = sum(v["disk_bytes"] for v in summary.values())
    return {
        "k": cfg.k, "vocab_size": vocab_size, "tokens": tokens, "rows": {n: v["rows"] for n, v in summary.items()},
        "bytes_per_token": disk / max(1, tokens), "full_logits_bytes_per_token": 2 * vocab_size,
        "storage_ratio": disk / max(1, tokens) / (2 * vocab_size), "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None, "device": device, "dtype": dtype, "gpus_per_actor": gpus,
        "pipeline_depth": depth,
        "experts_implementation": resolved.experts_kernel, "teacher_fingerprint": teacher_fp,
    }
