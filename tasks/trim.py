"""Expert trimming: remove whole experts, whole MoE blocks or whole decoder layers, scored on calibration data.

The baselines of "Demystifying the Compression of Mixture-of-Experts Through a Unified Framework",
next to SlimMoE's expert slimming:

- expert-drop: per MoE layer, remove the `n` experts with the lowest score ('frequency': routing
  frequency x mean routing weight when routed; 'reconstruction': Frobenius norm of the change of
  the MoE block output on the calibration tokens when the expert's routing weight is zeroed,
  without renormalising the others). The same `n` in every layer so the config keeps one expert
  count; top-k is kept.
- layer-drop: remove the MoE block (router + experts + shared experts) of the `n` layers whose MoE
  output turns the residual stream least (1 - cos(h, h + moe(h))), keeping attention. Only
  Qwen2-MoE / Qwen3-MoE can express that in a plain config; the others are refused (see
  trim_surgery.check_layer_drop), with `scores_only` still reporting the ranking.
- block-drop: remove the `n` decoder layers whose output is most similar to their input
  (highest mean cos), and renumber the rest.

`run_trim` writes a standard Hugging Face checkpoint plus `trim_report.json` (scores, what was
removed, parameter counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .calibration import calibration_batches
from .checkpoint import load_config, load_model, save_model_dir
from .fingerprint import tokenizer_fingerprint
from .params import count_parameters
from .storage import ensure_free_output, write_json_atomic
from .text_sources import DataSource, detect_source
from .trim_scores import TrimStats, collect_stats
from .trim_surgery import (
    block_drop, check_block_drop, check_expert_drop, check_layer_drop, choose_experts, expert_drop, layer_drop,
)

METHODS = ("expert-drop", "layer-drop", "block-drop")
REPORT_NAME = "trim_report.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECONSTRUCTION_NOTE = (
    "reconstruction score = Frobenius norm, over the calibration tokens, of the change of the MoE block output "
    "when the expert's routing weight is zeroed; the other experts' weights are not renormalised and no other "
    "expert is routed in its place"
)


class TrimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["expert-drop", "layer-drop", "block-drop"]
    n: int = Field(ge=0, description="experts per layer (expert-drop), MoE blocks or decoder layers to remove")
    expert_score: Literal["frequency", "reconstruction"] = "frequency"
    calibration_batches: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=2)
    text_field: str = "text"
    # Compute the scores and write only the report (no checkpoint): the ranking for a method the
    # architecture cannot express, or a look before cutting.
    scores_only: bool = False
    check_tokenizer: bool = Field(True, description="refuse token data made with another tokenizer than the model's")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False


def check_trim(cfg: TrimConfig, config) -> None:
    """Every refusal that needs only the model's config, before weights are read."""
    if cfg.method == "expert-drop":
        check_expert_drop(config, cfg.n)
    elif cfg.method == "layer-drop":
        check_layer_drop(config, cfg.n, surgery=not cfg.scores_only)
    else:
        check_block_drop(config, cfg.n)


def check_token_data(source: DataSource, model_dir: Path) -> None:
    """Token shards record the tokenizer they were made with; refuse them for a model with another one."""
    if source.kind != "token_shards":
        return
    data_fp = json.loads((Path(source.root) / "manifest.json").read_text()).get("tokenizer_fingerprint")
    try:
        model_fp = tokenizer_fingerprint(model_dir)
    except FileNotFoundError:
        return  # no tokenizer files next to the model: nothing to compare (the vocab-size check still runs)
    if data_fp and data_fp != model_fp:
        raise ValueError(
            f"data at {source.root} was tokenized with another tokenizer ({data_fp}) than the model's ({model_fp}); "
            "tokenize the data with this model's tokenizer, or set check_tokenizer=False if they are equivalent"
        )


def choose(cfg: TrimConfig, config, stats: TrimStats) -> dict:
    """What to remove, from the statistics: {"experts": {layer: [ids]}} or {"layers": [ids]}."""
    if cfg.method == "expert-drop":
        return {"experts": choose_experts(config, stats.expert_scores(cfg.expert_score), cfg.n)}
    if cfg.method == "layer-drop":
        change = stats.moe_change()
        order = sorted(change, key=lambda l: (change[l], l))  # least change first
        return {"layers": sorted(order[: cfg.n])}
    cos = stats.layer_cosine()
    order = sorted(cos, key=lambda l: (-cos[l], l))  # most identity-like first
    return {"layers": sorted(order[: cfg.n])}


def trim_model(model, cfg: TrimConfig, stats: TrimStats, removal: dict | None = None):
    removal = removal or choose(cfg, model.config, stats)
    if cfg.method == "expert-drop":
        return expert_drop(model, removal["experts"]), removal
    if cfg.method == "layer-drop":
        return layer_drop(model, removal["layers"]), removal
    return block_drop(model, removal["layers"]), removal


def run_trim(cfg: TrimConfig, model_dir: str | Path, data: str | Path, out_dir: str | Path,
             log: Callable[[str], None] = print) -> dict:
    """Score the model on `data` (anything calibration_batches reads, e.g. a tokenized dataset dir),
    remove the chosen structures, write the checkpoint and trim_report.json to `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir, cfg.trust_remote_code)
    check_trim(cfg, config)
    source = detect_source(data)  # a bad data path fails here, before the model is read
    if cfg.check_tokenizer:
        check_token_data(source, model_dir)
    ensure_free_output(out_dir)

    model = load_model(model_dir, dtype=_DTYPES[cfg.dtype], device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    before = count_parameters(model)
    batches = calibration_batches(source, cfg.calibration_batches, cfg.batch_size, cfg.seq_len,
                                  tokenizer_dir=model_dir, text_field=cfg.text_field)
    top = max(int(b.max()) for b in batches)
    if top >= config.vocab_size:
        raise ValueError(f"calibration data holds token id {top}, beyond the model's vocab_size={config.vocab_size}; "
                         "tokenize the data with this model's tokenizer")
    log(f"trim {cfg.method} n={cfg.n}: scoring on {len(batches)} calibration batches of {tuple(batches[0].shape)}")
    stats = collect_stats(model, batches, reconstruction=cfg.method == "expert-drop" and cfg.expert_score == "reconstruction")
    removal = choose(cfg, config, stats)
    report = {
        "method": cfg.method,
        "n": cfg.n,
        "config": cfg.model_dump(),
        "removed": _json_keys(removal),
        "scores": stats.to_json(),
        "calibration": {"batches": stats.batches, "tokens": stats.tokens},
        "before": before,
    }
    if cfg.method == "expert-drop":
        report["expert_score"] = cfg.expert_score
        if cfg.expert_score == "reconstruction":
            report["note"] = RECONSTRUCTION_NOTE
    if cfg.scores_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / REPORT_NAME, report)
        log(f"scores only: wrote {out_dir / REPORT_NAME}")
        return _headline(report)

    trimmed, _ = trim_model(model, cfg, stats, removal)
    after = count_parameters(trimmed)
    report["after"] = after
    save_model_dir(trimmed, out_dir, tokenizer_from=model_dir)
    write_json_atomic(out_dir / REPORT_NAME, report)
    log(f"removed {report['removed']}; total params {before['total']} -> {after['total']}, "
        f"active {before['active']} -> {after['active']}; wrote {out_dir}")
    return _headline(report)


def _headline(report: dict) -> dict:
    """What the driver shows: the cut and the parameter counts; the per-structure scores stay in
    trim_report.json."""
    out = {k: report[k] for k in ("method", "n", "removed", "calibration", "before") if k in report}
    out["scores_only"] = "after" not in report
    if "expert_score" in report:
        out["expert_score"] = report["expert_score"]
    if "after" in report:
        out["after"] = report["after"]
        out["total_params"], out["active_params"] = report["after"]["total"], report["after"]["active"]
    out["report"] = REPORT_NAME
    return out


def _json_keys(removal: dict) -> dict:
    if "experts" in removal:
        return {"experts": {str(k): v for k, v in removal["experts"].items()}}
    return dict(removal)
