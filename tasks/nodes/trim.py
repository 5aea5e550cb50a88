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
  trimming/surgery.py's check_layer_drop), with `scores_only` still reporting the ranking.
- block-drop: remove the `n` decoder layers whose output is most similar to their input
  (highest mean cos), and renumber the rest.

`run_trim` writes a standard Hugging Face checkpoint plus `trim_report.json` (scores, what was
removed, parameter counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from slimmoe.tasks.core.checkpoint import load_config, load_model, save_model_dir
from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.core.runtime import DTYPES
from slimmoe.tasks.core.storage import ensure_free_output, write_json_atomic
from slimmoe.tasks.data.calibration import calibration_batches
from slimmoe.tasks.data.sources import DataSource, detect_source
from slimmoe.tasks.trimming.config import RECONSTRUCTION_NOTE, TrimConfig, check_trim
from slimmoe.tasks.trimming.scores import collect_stats
from slimmoe.tasks.trimming.selection import choose, trim_model

REPORT_NAME = "trim_report.json"


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

    model = load_model(model_dir, dtype=DTYPES[cfg.dtype], device=cfg.device, trust_remote_code=cfg.trust_remote_code)
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
