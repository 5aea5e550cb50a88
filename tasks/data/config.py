"""The settings of the two data nodes: tokenize (text -> token shards) and teacher_logits (token
shards -> the teacher's top-k log-probs per token)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    actor_pool_size: int = Field(1, ge=1, description="teacher actors (gpus_per_actor GPUs each on GPU clusters)")
    # A teacher too big for one GPU is split layer by layer over the GPUs of one node; "auto" takes
    # the fewest that hold its bf16 weights plus a batch's activations and logits.
    gpus_per_actor: Union[int, Literal["auto"]] = Field(
        1, description="GPUs of one node per teacher actor (the model is split over them), or auto")
    gpu_memory_gb: Optional[float] = Field(
        None, gt=0, description="memory of one GPU, for gpus_per_actor auto (default: asked of a GPU worker)")
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
    # 2: a batch's top-k, encoding and checks run while the next batch's forward does; 1: in series.
    # Default: 2 on GPU (the finish runs on the CPU while the GPU computes); on CPU 2 only when
    # cpus_per_actor leaves a CPU beside torch_threads, since a finish that has to share the forward's
    # cores slows both (on a busy 2-core machine: forward 582 -> 1201 ms, finish 165 -> 532 ms a batch).
    pipeline_depth: Optional[int] = Field(None, ge=1, le=4, description="batches in flight per teacher actor "
                                          "(default: 2 on GPU or with a spare CPU, else 1)")
    trust_remote_code: bool = False

    @field_validator("gpus_per_actor", mode="before")
    @classmethod
    def _whole_gpus(cls, value):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # the command line gives a string
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"gpus_per_actor must be a whole number of GPUs >= 1 or 'auto', got {value!r}")

    @model_validator(mode="after")
    def _gpus_need_a_gpu_pass(self):
        cpu = self.device == "cpu" or (self.device == "auto" and self.use_gpu is False)
        if cpu and self.gpus_per_actor not in (1, "auto"):
            raise ValueError(cpu_pass_with_gpus(self.gpus_per_actor, "device: cpu" if self.device == "cpu"
                                                else "resources.use_gpu: false"))
        return self


def cpu_pass_with_gpus(gpus_per_actor, why: str) -> str:
    """Why a CPU pass refuses gpus_per_actor > 1 (an error rather than a warning: the setting exists for
    a teacher that does not fit one GPU, and such a teacher run on CPU instead would take days)."""
    return (f"logits.gpus_per_actor={gpus_per_actor} asks for GPUs, but the teacher pass runs on CPU ({why}); "
            "for a GPU pass set resources.use_gpu: true or logits.device: cuda, for a CPU pass remove "
            "logits.gpus_per_actor")
