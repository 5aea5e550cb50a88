"""The settings of the two data nodes: tokenize (text -> token shards) and teacher_logits (token
shards -> the teacher's top-k log-probs per token)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., description="text/JSONL/Parquet file, directory or glob, or a saved `datasets` directory")
    text_field: str = "text"
    seq_len: int = Field(512, ge=2)
    validation_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    rows_per_file: int = Field(8192, ge=1, description="rows per Parquet file")
    docs_per_batch: int = Field(256, ge=1)
    tokenize_workers: int = Field(1, ge=1, description="tokenizer actors (keep below the cluster's CPU count)")
    trust_remote_code: bool = False


class TeacherLogitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(64, ge=1, description="top-k token ids kept per position")
    batch_size: int = Field(8, ge=1, description="sequences per teacher forward pass")
    actor_pool_size: int = Field(1, ge=1, description="teacher actors (one GPU each on GPU clusters)")
    # "auto": the workflow's resources.use_gpu when it is set (a cluster that autoscales from zero GPU
    # nodes shows no GPU yet when the node starts), else whether the cluster has GPUs now.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    use_gpu: Optional[bool] = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] = "grouped_mm"
    cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: Optional[int] = Field(None, ge=1, description="default: the actor's CPU count")
    memory_per_actor_gb: Optional[float] = Field(None, gt=0)
    rows_per_file: int = Field(1024, ge=1, description="minimum rows per Parquet file")
    compression: Literal["none", "snappy", "zstd"] = "zstd"
    wait_for_actors_s: int = Field(600, ge=1, description="fail instead of waiting forever for actors (e.g. no GPU)")
    trust_remote_code: bool = False
