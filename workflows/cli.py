"""The `slimmoe` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Compress Mixture-of-Experts models on Ray.")
logits_app = typer.Typer(no_args_is_help=True, help="Inspect teacher logit caches.")
app.add_typer(logits_app, name="logits")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


# Errors a user can fix by changing their input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


@app.command()
def slim(
    model_dir: Path = typer.Argument(..., help="Hugging Face MoE model directory"),
    out_dir: Path = typer.Argument(..., help="where the slimmed checkpoint is written (must not exist)"),
    expert_size: int = typer.Option(..., "--expert-size", help="target intermediate size of every routed expert"),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="target number of KV heads (query heads follow)"),
    data: Optional[str] = typer.Option(None, "--data", help="calibration data: text/JSONL/Parquet files or glob, a saved dataset, or token shards"),
    calibration_batches: int = typer.Option(8, "--calibration-batches"),
    batch_size: int = typer.Option(4, "--batch-size"),
    seq_len: int = typer.Option(256, "--seq-len"),
    text_field: str = typer.Option("text", "--text-field"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Score, slim and save a checkpoint in one shot (the same surgery a SlimMoE stage runs)."""
    from slimmoe.tasks.params import format_count
    from slimmoe.tasks.slim import slim_checkpoint
    from slimmoe.tasks.slimming import SlimTargets

    try:
        report = slim_checkpoint(
            model_dir, out_dir, SlimTargets(expert_size, kv_heads), data=data,
            calibration_batches_n=calibration_batches, batch_size=batch_size, seq_len=seq_len,
            text_field=text_field, trust_remote_code=trust_remote_code,
        )
    except USER_ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    b, a = report["before"], report["after"]
    print(f"{'':10}{'total':>12}{'active':>12}")
    print(f"{'before':10}{format_count(b['total']):>12}{format_count(b['active']):>12}")
    print(f"{'after':10}{format_count(a['total']):>12}{format_count(a['active']):>12}")
    print(f"scores: {report['scores']}; wrote {out_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
