"""What the evaluate node measures and how."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from slimmoe.tasks.core.dtypes import resolve_dtype
from slimmoe.tasks.core.settings import OnOneDevice, TaskConfig

# lm-eval is an optional dependency (the `eval` extra); its hf model also imports accelerate.
LM_EVAL_INSTALL_HINT = ("pip install 'lm-eval>=0.4.2' accelerate (or the project's extra: "
                        "pip install 'slimmoe[eval]')")


class EvaluateConfig(OnOneDevice, TaskConfig):

    max_rows: Optional[int] = Field(256, gt=0, description="validation rows scored (None = all)")
    batch_size: int = Field(8, gt=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    load_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    autocast_bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU, which runs float32)")
    experts_implementation: Optional[str] = Field(None, description="transformers experts kernel; None = library default")
    trust_remote_code: bool = False
    check_tokenizer: bool = Field(True, description="refuse a model whose tokenizer files differ from the data's tokenizer")
    # Throughput: a forward pass on random ids of this shape, after warm-up.
    throughput_batch_size: int = Field(8, gt=0)
    throughput_seq_len: int = Field(128, gt=0)
    throughput_warmup: int = Field(2, ge=0)
    throughput_repeats: int = Field(5, gt=0)
    seed: int = 0
    # lm-eval-harness tasks by name (run only when asked; lm_eval is an optional dependency).
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-eval-harness tasks, comma-separated (needs lm_eval)")
    lm_eval_limit: Optional[int] = Field(None, gt=0, description="examples per lm-eval task (None = all)")
    lm_eval_batch_size: int = Field(8, gt=0)
    lm_eval_num_fewshot: Optional[int] = Field(None, ge=0)
    # lm-eval's own tasks fetch their data from the Hugging Face Hub; an offline cluster runs task
    # YAMLs of its own (data files beside them) from a directory that lm-eval indexes too.
    lm_eval_include_path: Optional[str] = Field(
        None, description="directory of extra lm-eval task YAMLs (lm-eval's TaskManager include_path); "
                          "it must exist where the evaluation runs")
    # MC-MoE online dynamic pruning (ODP) during evaluation: a fixed beta, or a target fraction of
    # second experts to drop (beta calibrated). Both unset: the model runs unchanged.
    dynamic_pruning: Optional[float] = Field(None, ge=0, le=1, description="ODP beta")
    dynamic_pruning_target: Optional[float] = Field(None, ge=0, lt=1, description="ODP target share of expert calls dropped")
    dynamic_pruning_protect_top: float = Field(0.02, ge=0, lt=1, description="ODP: share of most important tokens kept whole")
    dynamic_pruning_calibration_rows: int = Field(32, gt=0, description="rows used to calibrate betas for a target")

    def weights_dtype(self, device: str) -> str:
        return resolve_dtype(self.load_dtype, device.startswith("cuda"))

    def experts_kernel_on(self, device) -> str:
        """The kernel the evaluated model's experts run with on `device` (a torch device): the configured
        one, else the device's for the weights' dtype (`core.kernels.experts_kernel`)."""
        from slimmoe.tasks.core.kernels import device_capability, experts_kernel

        return experts_kernel(self.experts_implementation, device.type == "cuda", device_capability(device),
                              weights_16bit=self.weights_dtype(device.type) != "float32")

    @field_validator("lm_eval_tasks", mode="before")
    @classmethod
    def _split_tasks(cls, v):
        if isinstance(v, str):
            v = [t for t in v.split(",")]
        return [t.strip() for t in v]

    @model_validator(mode="after")
    def _check(self):
        if any(not t for t in self.lm_eval_tasks):
            raise ValueError("lm_eval_tasks holds an empty task name; give names such as 'hellaswag,arc_easy'")
        if self.dynamic_pruning is not None and self.dynamic_pruning_target is not None:
            raise ValueError("set dynamic_pruning (a beta) or dynamic_pruning_target (a drop fraction), not both")
        return self
