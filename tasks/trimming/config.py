"""Trimming settings, and the refusals a model's config alone can decide before weights are read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimmoe.tasks.core.settings import OnOneDevice, TaskConfig


METHODS = ("expert-drop", "layer-drop", "block-drop")
RECONSTRUCTION_NOTE = (
    "reconstruction score = Frobenius norm, over the calibration tokens, of the change of the MoE block output "
    "when the expert's routing weight is zeroed; the other experts' weights are not renormalised and no other "
    "expert is routed in its place"
)


class TrimConfig(OnOneDevice, TaskConfig):

    method: Literal["expert-drop", "layer-drop", "block-drop"]
    n: int = Field(ge=0, description="experts per layer (expert-drop), MoE blocks or decoder layers to remove")
    expert_score: Literal["frequency", "reconstruction"] = "frequency"
    calibration_batches: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=2)
    text_field: str = "text"
    # Compute the scores and write only the report (no checkpoint): the ranking for a method the
    # architecture cannot express, or a look before cutting.
    scores_only: bool = Field(False, description="write only trim_report.json with the ranking, no checkpoint")
    check_tokenizer: bool = Field(True, description="refuse token data made with another tokenizer than the model's")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False


def check_trim(cfg: TrimConfig, config) -> None:
    """Every refusal that needs only the model's config, before weights are read."""
    # Imported here: the surgery module pulls in transformers, and the workflow schema imports this
    # module just for TrimConfig.
    from slimmoe.tasks.trimming.surgery import check_block_drop, check_expert_drop, check_layer_drop

    if cfg.method == "expert-drop":
        check_expert_drop(config, cfg.n)
    elif cfg.method == "layer-drop":
        check_layer_drop(config, cfg.n, surgery=not cfg.scores_only)
    else:
        check_block_drop(config, cfg.n)
