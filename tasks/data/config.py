"""The settings of the two data nodes: tokenize (text -> token shards) and teacher_logits (token
shards -> the teacher's top-k log-probs per token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from slimmoe.tasks.core.dtypes import dtype_bytes, resolve_dtype
from slimmoe.tasks.core.kernels import experts_kernel
from slimmoe.tasks.core.settings import TaskConfig

GB = 1e9


class BlendSource(TaskConfig):
    """One source of a weighted blend (`data.sources`)."""

    path: str = Field(..., description="a file, directory, glob or URI, as data.source takes")
    weight: float = Field(..., gt=0, description="its share of the blend's tokens (weights are normalised)")


class TokenizeConfig(TaskConfig):

    source: Optional[str] = Field(None, description="text/JSONL/Parquet file, directory or glob (local, s3://, gs:// "
                                                    "or hf://datasets/...), or a saved `datasets` directory")
    sources: Optional[list[BlendSource]] = Field(
        None, min_length=1, description="a weighted blend instead of source: [{path, weight}]; each source gives "
                                        "its weight's share of the tokens (see tasks/nodes/tokenize.py)")
    text_field: str = "text"
    seq_len: int = Field(512, ge=2)
    validation_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    rows_per_file: int = Field(8192, ge=1, description="rows per Parquet file")
    docs_per_batch: int = Field(256, ge=1)
    tokenize_workers: int = Field(1, ge=1, description="tokenizer actors (keep below the cluster's CPU count)")
    skip_unreadable: bool = Field(False, description="skip text files that are not UTF-8 or hold NUL bytes "
                                                     "(counted in the output) instead of refusing them")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_spelling(self):
        if (self.source is None) == (self.sources is None):
            raise ValueError("set exactly one of data.source (one source) and data.sources (a weighted blend: "
                             "[{path, weight}, ...])")
        return self

    def blend(self) -> list[BlendSource]:
        """The sources to read, one with weight 1 for `source`."""
        return list(self.sources) if self.sources is not None else [BlendSource(path=self.source, weight=1.0)]

    def source_loc(self, i: int) -> tuple:
        """Where the blend's source `i` is written in the workflow YAML."""
        return ("data", "source") if self.sources is None else ("data", "sources", i, "path")


class TeacherLogitsConfig(TaskConfig):

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
    # auto: the device's kernel (`core.kernels.experts_kernel`: grouped_mm on CPU and on GPUs with native
    # grouped GEMM over 16-bit weights, eager on the others).
    experts_implementation: Literal["auto", "eager", "grouped_mm", "batched_mm"] = "auto"
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
        # At parse time only what the config itself says: a CPU pass on any cluster.
        self._check_gpus_on(self.pass_device(cluster_has_gpus=True))
        return self

    def _check_gpus_on(self, device: str) -> None:
        if device == "cpu" and self.gpus_per_actor not in (1, "auto"):
            why = ("device: cpu" if self.device == "cpu" else "resources.use_gpu: false" if self.use_gpu is False
                   else "the Ray cluster has no GPUs and neither logits.device nor resources.use_gpu asks for them")
            raise ValueError(cpu_pass_with_gpus(self.gpus_per_actor, why))

    def pass_device(self, cluster_has_gpus: bool) -> str:
        """"cuda" or "cpu". `auto` follows the workflow's resources.use_gpu when it is set (a cluster that
        autoscales from zero GPU nodes shows no GPU yet when the node starts), else the cluster."""
        if self.device != "auto":
            return self.device
        return "cuda" if (self.use_gpu if self.use_gpu is not None else cluster_has_gpus) else "cpu"

    def torch_threads_per_actor(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_actor))

    def resolve_pass(self, facts: "PassFacts", model_config=None, seq_len: int | None = None) -> "TeacherPass":
        """Everything the pass derives from the device it runs on: the one place both `slimmoe plan`
        (planned facts) and the teacher_logits node (the cluster's facts) decide it.

        `model_config` and `seq_len` are needed only to resolve `gpus_per_actor: auto`."""
        device = self.pass_device(facts.cluster_has_gpus)
        on_gpu = device == "cuda"
        dtype = resolve_dtype(self.dtype, on_gpu)
        self._check_gpus_on(device)
        if not on_gpu:
            gpus = 0
        elif self.gpus_per_actor != "auto":
            gpus = int(self.gpus_per_actor)
        else:
            memory = int(self.gpu_memory_gb * GB) if self.gpu_memory_gb else facts.gpu_memory_bytes
            if memory is None:  # only the plan can lack it: the node asks a GPU worker first
                gpus = 1
            else:
                from slimmoe.tasks.planning.memory import teacher_actor_gpus

                try:
                    gpus = teacher_actor_gpus(model_config, self.batch_size, seq_len, self.k, memory,
                                              dtype_bytes=dtype_bytes(dtype), max_gpus=facts.gpus_per_node)
                except ValueError as err:
                    raise ValueError(f"logits.gpus_per_actor: auto: {err}") from None
        threads = self.torch_threads_per_actor()
        # A finish that has to share the forward's cores slows both: pipeline only with a spare CPU or a GPU.
        depth = self.pipeline_depth or (2 if on_gpu or self.cpus_per_actor >= threads + 1 else 1)
        return TeacherPass(device, dtype, gpus, depth, threads, self.experts_kernel(on_gpu, facts.gpu_capability, dtype))

    def experts_kernel(self, on_gpu: bool, capability: Optional[tuple[int, int]], dtype: str) -> str:
        return self.kernel_for(self.experts_implementation, on_gpu, capability, dtype)

    @staticmethod
    def kernel_for(requested: str, on_gpu: bool, capability: Optional[tuple[int, int]], dtype: str) -> str:
        """The kernel the teacher's experts run with; "auto" when it depends on a GPU not known yet (each
        actor then calls this with its own GPU's capability)."""
        if on_gpu and capability is None and requested == "auto":
            return "auto"
        return experts_kernel(requested, on_gpu, capability, weights_16bit=dtype != "float32")


@dataclass(frozen=True)
class PassFacts:
    """What the teacher pass's settings depend on beyond its config: planned by `slimmoe plan`, read
    off the cluster by the node."""

    cluster_has_gpus: bool
    gpu_memory_bytes: Optional[int] = None  # one GPU's memory; None: unknown
    gpus_per_node: int = 8  # the most GPUs one actor may span (an actor's GPUs are on one node)
    gpu_capability: Optional[tuple[int, int]] = None  # the GPUs' compute capability; None: unknown


@dataclass(frozen=True)
class TeacherPass:
    """The resolved settings of a teacher pass."""

    device: str  # "cuda" or "cpu"
    dtype: str  # "bfloat16" or "float32" (or what logits.dtype names)
    gpus_per_actor: int  # 0 on CPU: the actors ask Ray for no GPU at all
    pipeline_depth: int
    torch_threads: int
    experts_kernel: str  # "auto": each actor decides on its own GPU (`TeacherLogitsConfig.experts_kernel`)


def cpu_pass_with_gpus(gpus_per_actor, why: str) -> str:
    """Why a CPU pass refuses gpus_per_actor > 1 (an error rather than a warning: the setting exists for
    a teacher that does not fit one GPU, and such a teacher run on CPU instead would take days)."""
    return (f"logits.gpus_per_actor={gpus_per_actor} asks for GPUs, but the teacher pass runs on CPU ({why}); "
            "for a GPU pass set resources.use_gpu: true or logits.device: cuda, for a CPU pass remove "
            "logits.gpus_per_actor")
