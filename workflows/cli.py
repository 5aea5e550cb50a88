"""The `slimmoe` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from slimmoe.tasks.data.config import TeacherLogitsConfig, TokenizeConfig
from slimmoe.tasks.evaluation.config import EvaluateConfig
from slimmoe.tasks.mcmoe.config import QuantizeConfig
from slimmoe.tasks.slimming.config import SlimConfig
from slimmoe.tasks.slimming.search import SearchConfig
from slimmoe.tasks.trimming.config import TrimConfig
from slimmoe.workflows.cli_options import derive_options

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Compress Mixture-of-Experts models on Ray.")
logits_app = typer.Typer(no_args_is_help=True, help="Inspect teacher logit caches.")
app.add_typer(logits_app, name="logits")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


# Errors a user can fix by changing their input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _quiet_if(as_json: bool):
    """Progress lines would break the JSON on stdout."""
    return (lambda _m: None) if as_json else print


def _print_sizes(report: dict) -> None:
    from slimmoe.tasks.core.params import format_count

    b, a = report["before"], report["after"]
    print(f"{'':10}{'total':>12}{'active':>12}")
    print(f"{'before':10}{format_count(b['total']):>12}{format_count(b['active']):>12}")
    print(f"{'after':10}{format_count(a['total']):>12}{format_count(a['active']):>12}")


REVISION_HELP = "the branch, tag or commit of a MODEL_DIR named by its Hub id (org/name); default main"


def _local_model(model: str, revision: Optional[str], cfg) -> Path:
    """MODEL_DIR as a local directory: a Hub id is resolved to a commit and that snapshot downloaded
    (once: later runs find it in the Hub cache). MODEL_DIR is taken as typed, a str: as a Path, `./x`
    would lose the `./` that marks it a path."""
    from slimmoe.tasks.core.hub import resolve_model

    source = resolve_model(model, revision, trust_remote_code=getattr(cfg, "trust_remote_code", False))
    if source.is_hub:
        typer.echo(f"model: {source.describe()}", err=True)  # stderr: stdout may be one JSON document
    return Path(source.path)


# The names `slim` took before its options were derived from SlimConfig.
SLIM_ALIASES = {"--expert-size": "expert_intermediate_size", "--kv-heads": "num_key_value_heads"}


@app.command()
@derive_options(SlimConfig, aliases=SLIM_ALIASES)
def slim(
    cfg: SlimConfig,
    model_dir: str = typer.Argument(..., help="Hugging Face MoE model directory, or a Hub model id (org/name)"),
    out_dir: Path = typer.Argument(..., help="where the slimmed checkpoint is written (must not exist)"),
    revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Score, slim and save a checkpoint in one shot (the same surgery a SlimMoE stage runs), streamed
    one tensor at a time; with saved scores the model is never loaded."""
    from slimmoe.tasks.nodes.slim import run_slim

    try:
        model_dir = _local_model(model_dir, revision, cfg)
        report = run_slim(cfg, model_dir, out_dir, log=_quiet_if(as_json))
    except USER_ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_sizes(report)
    print(f"scores: {report['scores']}; wrote {out_dir} ({len(report['written']['files'])} weight file(s))")


@app.command()
@derive_options(TrimConfig)
def trim(
    cfg: TrimConfig,
    model_dir: str = typer.Argument(..., help="Hugging Face MoE model directory, or a Hub model id (org/name)"),
    out_dir: Path = typer.Argument(..., help="where the trimmed checkpoint is written (must not exist or be empty)"),
    revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
    data: str = typer.Option(..., "--data", help="calibration data: a tokenized dataset dir, token shards, text/JSONL/Parquet files or a saved dataset"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Remove whole experts, MoE blocks or decoder layers, scored on calibration data (expert trimming)."""
    from slimmoe.tasks.nodes.trim import run_trim

    try:
        model_dir = _local_model(model_dir, revision, cfg)
        report = run_trim(cfg, model_dir, data, out_dir, log=_quiet_if(as_json))
    except USER_ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if "after" in report:
        _print_sizes(report)
    print(f"scores and the structures {'to remove' if report['scores_only'] else 'removed'}: {out_dir / report['report']}")


# --- workflow driver: run / status / rerun / submit -------------------------------------------


def _workflow_source(config: Path, config_package: Optional[str]):
    if config_package:
        from slimmoe.workflows.submit import resolve_config_package

        return resolve_config_package(config_package, str(config))
    return config


def _driver_call(fn):
    """Run a driver function; config problems exit 2, a failed node exits 1 (tracebacks stay in the log)."""
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.driver import NodeBusyError, NodeFailed
    from slimmoe.workflows.signals import RunStopped

    try:
        return fn()
    except WorkflowConfigError as err:
        _fail(err)
    except (NodeFailed, NodeBusyError) as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1)
    except RunStopped as err:  # SIGTERM / SIGINT: the shell's convention, 128 + the signal
        typer.secho(str(err), err=True)
        raise typer.Exit(code=err.exit_code)
    except USER_ERRORS as err:
        _fail(err)


@app.command()
def demo(
    storage: Optional[Path] = typer.Option(None, "--storage", help="where outputs go (default ~/.cache/slimmoe/runs)"),
    config: Optional[Path] = typer.Option(None, "--config", help="another demo-style workflow config"),
):
    """The embedded default: train a small teacher, compress it with SlimMoE, print the results table."""
    import time

    from slimmoe.workflows.demo import DEFAULT_STORAGE, run_demo

    started = time.time()
    print(f"slimmoe demo: outputs under {storage or DEFAULT_STORAGE} (a second run reuses every finished node)")
    result = _driver_call(lambda: run_demo(storage=storage, config=config))
    print()
    print(result["markdown"])
    print(f"\ntable, JSON and distillation curves: {result['dir']} ({time.time() - started:.0f}s)")


@app.command()
def run(
    config: Path = typer.Argument(..., help="workflow config (YAML)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to connect to (default: RAY_ADDRESS, else a local one)"),
    config_package: Optional[str] = typer.Option(None, "--config-package", hidden=True,
                                                 help="CONFIG is a file in this importable package (set by `submit`)"),
    allow_infeasible: bool = typer.Option(False, "--allow-infeasible",
                                          help="run even if `slimmoe plan` says a node does not fit in memory"),
):
    """Run a workflow: every node whose output is not complete, in order."""
    from slimmoe.workflows.driver import run_workflow

    _driver_call(lambda: run_workflow(_workflow_source(config, config_package), address=address,
                                      allow_infeasible=allow_infeasible))


# Sizes and rates the plan divides by or compares against: a value of 0 or below would print a negative
# capacity or time rather than fail, so each is refused as resources.gpu_memory_gb is in the YAML.
PLAN_POSITIVE = {"--gpu-memory-gb": ("gpu_memory_gb", "the memory of one GPU in GB (resources.gpu_memory_gb in the YAML)"),
                 "--peak-tflops": ("peak_tflops", "the peak TFLOP/s of one GPU"),
                 "--intra-node-gb-per-s": ("intra_node_gb_per_s", "the GB/s between the GPUs of a node"),
                 "--inter-node-gb-per-s": ("inter_node_gb_per_s", "the GB/s one node sends to the others"),
                 "--cpu-memory-gb": ("cpu_memory_gb", "the RAM of the machine CPU nodes run on, in GB"),
                 "--data-tokens": ("data_tokens", "the tokens the data holds")}


def _check_plan_numbers(options) -> None:
    for flag, (attr, what) in PLAN_POSITIVE.items():
        value = getattr(options, attr)
        if value is not None and not value > 0:  # `not >` also refuses nan
            _fail(ValueError(f"{flag} {value:g}: {what} must be above 0"))
    if not 0 < options.mfu <= 1:
        _fail(ValueError(f"--mfu {options.mfu:g}: the share of the peak the kernels reach must be above 0 and at most 1"))


@app.command()
def plan(
    config: Path = typer.Argument(..., help="workflow config (YAML)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as one JSON object"),
    gpu_memory_gb: Optional[float] = typer.Option(None, "--gpu-memory-gb", help="memory of one GPU in GB (1e9 bytes); "
                                                  "default resources.gpu_memory_gb, else this machine's GPU"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="a100 | h100 | h200: the peak bf16 TFLOP/s for times"),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="peak TFLOP/s of one GPU (instead of --gpu)"),
    mfu: float = typer.Option(0.4, "--mfu", help="share of the peak the kernels reach while computing; the "
                              "communication they do not hide comes on top (the plan reports the effective MFU)"),
    intra_node_gb_per_s: Optional[float] = typer.Option(
        None, "--intra-node-gb-per-s", help="GB/s (gigabytes) per GPU between the GPUs of a node, as nccl-tests "
        "reports bus bandwidth (default from --gpu: a100 300, h100/h200 450)"),
    inter_node_gb_per_s: Optional[float] = typer.Option(
        None, "--inter-node-gb-per-s", help="GB/s (gigabytes) one node sends to the others, all its network adapters "
        "together (default from --gpu: a100 50 = 400 Gb/s, h100/h200 400 = 3.2 Tb/s)"),
    cpu_memory_gb: Optional[float] = typer.Option(None, "--cpu-memory-gb",
                                                  help="RAM of the machine CPU nodes run on (default: this one's)"),
    data_tokens: Optional[int] = typer.Option(None, "--data-tokens", help="tokens the data holds (default: what "
                                              "the largest stage budget needs)"),
):
    """Memory per GPU, FLOPs, communication, time, GPU-hours and cache size of every node, and whether each fits:
    from the workflow and the teacher's config.json only (no weights, no cluster)."""
    from slimmoe.workflows.driver import plan_workflow
    from slimmoe.workflows.plan import PlanOptions

    options = PlanOptions(gpu_memory_gb=gpu_memory_gb, gpu=gpu, peak_tflops=peak_tflops, mfu=mfu,
                          intra_node_gb_per_s=intra_node_gb_per_s, inter_node_gb_per_s=inter_node_gb_per_s,
                          cpu_memory_gb=cpu_memory_gb, data_tokens=data_tokens)
    _check_plan_numbers(options)
    result = _driver_call(lambda: plan_workflow(config, options))
    print(json.dumps(result.as_dict(), indent=2) if as_json else result.format())


@app.command()
@derive_options(SearchConfig)
def search(
    cfg: SearchConfig,
    config: Path = typer.Argument(..., help="workflow config (YAML)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where the workflow with the chosen shape is written "
                                                           "(default CONFIG's name + .searched.yaml beside it)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to connect to (default: RAY_ADDRESS, "
                                                                  "else a local one)"),
    as_json: bool = typer.Option(False, "--json", help="print the candidates as JSON"),
):
    """The best shape (expert width, experts kept, KV heads) for a parameter budget: the shapes within it,
    cut from one scoring of the stage's input, ranked by the held-out KL to the teacher; writes the workflow
    with its stages set to the winner."""
    from slimmoe.workflows.search import search_workflow

    # A refusal (no shape meets the targets) is a ValueError: one line, exit 2.
    result = _driver_call(lambda: search_workflow(config, cfg, out=out, log=_quiet_if(as_json), address=address))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    print(result.table())
    print(f"best: {result.best.shape.label()}; wrote {result.out}")


@app.command()
def status(
    config: Path = typer.Argument(..., help="workflow config (YAML)"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
    clean: bool = typer.Option(False, "--clean", help="first remove what attempts that are no longer alive left "
                                                      "(a killed rerun's work dir); resumable state stays"),
    verify: bool = typer.Option(False, "--verify", help="read every output file against the checksum its marker "
                                                        "recorded (without: only files changed since, by mtime)"),
    config_package: Optional[str] = typer.Option(None, "--config-package", hidden=True,
                                                 help="CONFIG is a file in this importable package (set by `submit`)"),
):
    """Each node: done / damaged / missing / running / failed / stale, key, path, time, headline metric.
    An external teacher is taken as the last run recorded it in storage, so this works where its files are not."""
    from slimmoe.workflows.driver import clean_workflow, format_status, workflow_status

    config = _workflow_source(config, config_package)
    if clean:
        # On stderr with --json, which keeps stdout one JSON document.
        removed = _driver_call(lambda: clean_workflow(config, log=lambda line: typer.echo(line, err=as_json)))
        if not removed:
            typer.echo("nothing to clean", err=as_json)
    rows = _driver_call(lambda: workflow_status(config, verify=verify))
    print(json.dumps(rows, indent=2) if as_json else format_status(rows))


@app.command()
def report(
    config: Path = typer.Argument(..., help="workflow config (YAML)"),
    out: Optional[str] = typer.Option(None, "--out", help="directory or URI for report.md, report.json and "
                                                          "curves.png (default <storage>/<workflow>/_report)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON instead of Markdown"),
):
    """Every evaluated model in one table (parameters, perplexity, KL, lm-eval, tokens/s) and the distillation
    curves, from the nodes that completed; the nodes that did not are listed."""
    from slimmoe.workflows.report import report_workflow

    result, where = _driver_call(lambda: report_workflow(config, out=out))
    print(json.dumps(result.to_json(), indent=2) if as_json else result.markdown())
    typer.echo(f"report written to {where}", err=True)  # stderr: stdout may be one JSON document


@app.command()
def rerun(
    config: Path = typer.Argument(..., help="workflow config (YAML)"),
    node: str = typer.Argument(..., help="the node to recompute"),
    downstream: bool = typer.Option(False, "--downstream", help="recompute the nodes after it too"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to connect to"),
    config_package: Optional[str] = typer.Option(None, "--config-package", hidden=True,
                                                 help="CONFIG is a file in this importable package (set by `submit`)"),
):
    """Recompute one node even though it is complete; the old output stays until the new one is."""
    from slimmoe.workflows.driver import rerun_node

    _driver_call(lambda: rerun_node(_workflow_source(config, config_package), node, downstream=downstream,
                                    address=address))


@app.command()
def submit(
    config: Path = typer.Argument(..., help="workflow config (YAML)"),
    address: str = typer.Option(..., "--address", help="the cluster's Jobs API, e.g. http://127.0.0.1:8265 (port-forwarded)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="print the job id and return"),
    runtime_env: Optional[Path] = typer.Option(None, "--runtime-env", help="YAML merged over cluster/runtime_env.yaml"),
    submission_id: Optional[str] = typer.Option(None, "--submission-id"),
    entrypoint_num_gpus: float = typer.Option(0, "--entrypoint-num-gpus",
                                              help="GPUs reserved for the driver (evaluate/trim/quantize run in it)"),
    allow_infeasible: bool = typer.Option(False, "--allow-infeasible",
                                          help="submit even if `slimmoe plan` says a node does not fit in memory"),
    command: str = typer.Option("run", "--command", help="what the job runs on the cluster: run, status, or rerun "
                                                         "(with NODE)"),
    node: Optional[str] = typer.Argument(None, help="the node to recompute (with --command rerun)"),
    downstream: bool = typer.Option(False, "--downstream", help="with --command rerun: the nodes after it too"),
):
    """Submit the driver as a Ray job (project as working_dir); stream its logs and exit with its status."""
    from slimmoe.workflows.submit import SubmitError, job_command, submit_workflow

    try:
        job = job_command(command, node, downstream, allow_infeasible)
    except ValueError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2)
    try:
        job_id, state = _driver_call(lambda: submit_workflow(config, address, wait=not no_wait,
                                                             runtime_env_file=runtime_env, submission_id=submission_id,
                                                             entrypoint_num_gpus=entrypoint_num_gpus,
                                                             allow_infeasible=allow_infeasible, command=job))
    except SubmitError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1)
    if state not in ("SUCCEEDED", "SUBMITTED"):
        raise typer.Exit(code=1)


# `--max-rows 0` has always meant every row; the field spells that None, which a command line cannot.
EVALUATE_PARSE = {"max_rows": lambda rows: rows or None}
EVALUATE_HELP = {"max_rows": "validation rows scored (0 = all)"}


@app.command()
@derive_options(EvaluateConfig, parse=EVALUATE_PARSE, help=EVALUATE_HELP)
def evaluate(
    cfg: EvaluateConfig,
    model_dir: str = typer.Argument(..., help="Hugging Face model directory, or a Hub model id (org/name)"),
    revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
    data: Path = typer.Option(..., "--data", help="a tokenize-node output (its validation split is used) or one token-shards directory"),
    teacher_logits: Optional[Path] = typer.Option(None, "--teacher-logits", help="teacher-logits output or one logit cache: adds KL and top-1 agreement"),
    out: Optional[Path] = typer.Option(None, "--out", help="directory for report.json (new or empty); default: a fresh temporary directory"),
    as_json: bool = typer.Option(False, "--json", help="print the whole report as JSON"),
):
    """Perplexity, KL / top-1 agreement with the teacher, parameters, tokens/s and peak memory of a model."""
    import tempfile

    from slimmoe.tasks.core.params import format_count
    from slimmoe.tasks.nodes.evaluate import run_evaluate

    try:
        model_dir = _local_model(model_dir, revision, cfg)
        out_dir = out if out is not None else Path(tempfile.mkdtemp(prefix="slimmoe-eval-"))
        run_evaluate(cfg, model_dir, data, teacher_logits, out_dir)
    except USER_ERRORS as err:
        _fail(err)
    report = json.loads((out_dir / "report.json").read_text())
    if as_json:
        print(json.dumps(report, indent=2))
        return
    p, tp = report["parameters"], report["throughput"]
    print(f"perplexity       {report['perplexity']:.3f}  ({report['tokens_scored']} tokens, {report['rows']} rows)")
    if report["kl_to_teacher"] is not None:
        print(f"KL to teacher    {report['kl_to_teacher']:.5f}")
        print(f"top-1 agreement  {report['top1_agreement']:.4f}")
    elif report.get("teacher_cache_note"):
        print(f"KL to teacher    n/a: {report['teacher_cache_note']}")
    print(f"parameters       {format_count(p['total'])} total, {format_count(p['active'])} active")
    print(f"forward          {tp['tokens_per_s']:,.0f} tokens/s (batch {tp['batch_size']} x seq {tp['seq_len']}, {tp['device']}, {tp['dtype']})")
    mem = report["memory"]["evaluation"]
    above = f", {mem['above_start_bytes'] / 2**20:,.0f} MiB above the start" if "above_start_bytes" in mem else ""
    print(f"peak memory      {mem['peak_bytes'] / 2**20:,.0f} MiB{above} ({mem['label']})")
    for task, res in report["lm_eval"].items():
        print(f"lm-eval {task}: {res.get('metrics') if res['status'] == 'ok' else res['message']}")
    print(f"report: {out_dir / 'report.json'}")


# `--bits` is the name the command had before its options were derived from QuantizeConfig.
QUANTIZE_ALIASES = {"--bits": "candidate_bits"}


@app.command()
@derive_options(QuantizeConfig, aliases=QUANTIZE_ALIASES)
def quantize(
    cfg: QuantizeConfig,
    model_dir: str = typer.Argument(..., help="Hugging Face MoE model directory, or a Hub model id (org/name)"),
    out_dir: Path = typer.Argument(..., help="where the packed quantized checkpoint is written (must not exist or be empty)"),
    revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
    data: str = typer.Option(..., "--data", help="calibration data: a tokenized dataset dir, token shards, text/JSONL/Parquet files or a saved dataset"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """MC-MoE PMQ: mixed-precision expert quantization under an average-bit budget (load with load_quantized)."""
    from slimmoe.tasks.core.storage import atomic_output_dir
    from slimmoe.tasks.nodes.quantize import run_quantize

    try:
        model_dir = _local_model(model_dir, revision, cfg)
        with atomic_output_dir(out_dir) as tmp:
            report = run_quantize(cfg, model_dir, data, tmp, log=_quiet_if(as_json))
    except USER_ERRORS as err:
        _fail(err)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    mib = 2 ** 20
    print(f"expert bits      {report['avg_bits_experts']:.3f} average (target {report['avg_bits_target']}), "
          f"histogram {report['bits_histogram']}; {report['expert_bits_per_weight']:.3f} bits/weight with scales")
    print(f"on disk          {report['disk_bytes'] / mib:,.2f} MiB (original {report['original_disk_bytes'] / mib:,.2f} MiB)")
    print(f"in memory        {report['memory_resident_bytes_16bit'] / mib:,.2f} MiB resident + "
          f"{report['memory_peak_transient_bytes_16bit'] / mib:,.2f} MiB transient (16-bit compute, on-the-fly dequantization)")
    print(f"wrote {out_dir}; load with slimmoe.tasks.nodes.quantize.load_quantized")


@app.command()
@derive_options(TokenizeConfig, hidden=("sources",))  # a blend is a workflow's data.sources: a YAML list
def tokenize(
    cfg: TokenizeConfig,
    # Named like the field it fills, so the positional DATA is TokenizeConfig.source.
    source: str = typer.Argument(..., metavar="DATA", help="text/JSONL/Parquet file, directory or glob, or a saved `datasets` directory"),
    tokenizer_dir: Path = typer.Argument(..., help="the teacher's directory (its tokenizer files)"),
    out_dir: Path = typer.Argument(..., help="where train/ and validation/ token shards are written (must not exist)"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON"),
):
    """Tokenize and pack text into fixed-length token shards (the DAG's tokenize node, by hand)."""
    from slimmoe.tasks.core.storage import atomic_output_dir
    from slimmoe.tasks.nodes.tokenize import run_tokenize

    try:
        with atomic_output_dir(out_dir) as tmp:
            metrics = run_tokenize(cfg, tokenizer_dir, tmp)
    except USER_ERRORS as err:
        _fail(err)
    print(json.dumps(metrics, indent=2) if as_json else
          f"train {metrics['train_rows']} rows, validation {metrics['validation_rows']} rows of {metrics['seq_len']} "
          f"tokens from {metrics['documents']} documents; wrote {out_dir}")


# The workflow sets use_gpu from its `resources:`; by hand, --device says where the teacher runs.
TEACHER_LOGITS_HIDDEN = ("use_gpu",)
# `--num-actors` is the name the command had before its options were derived from TeacherLogitsConfig.
TEACHER_LOGITS_ALIASES = {"--num-actors": "actor_pool_size"}


@app.command("teacher-logits")
@derive_options(TeacherLogitsConfig, hidden=TEACHER_LOGITS_HIDDEN, aliases=TEACHER_LOGITS_ALIASES)
def teacher_logits(
    cfg: TeacherLogitsConfig,
    teacher_dir: Path = typer.Argument(..., help="the teacher's Hugging Face directory"),
    tokens_dir: Path = typer.Argument(..., help="the tokenize output (train/ and validation/ token shards)"),
    out_dir: Path = typer.Argument(..., help="where the logit caches are written (must not exist)"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON"),
):
    """Cache the teacher's top-k log-probs for every token (the DAG's teacher_logits node, by hand)."""
    from slimmoe.tasks.core.storage import atomic_output_dir
    from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits

    try:
        with atomic_output_dir(out_dir) as tmp:
            metrics = run_teacher_logits(cfg, teacher_dir, tokens_dir, tmp)
    except USER_ERRORS as err:
        _fail(err)
    print(json.dumps(metrics, indent=2) if as_json else
          f"{metrics['tokens']} tokens at {metrics['tokens_per_s']:.0f} tokens/s; {metrics['bytes_per_token']:.1f} bytes/token "
          f"({100 * metrics['storage_ratio']:.2f}% of full float16 logits); wrote {out_dir}")


@logits_app.command("inspect")
def logits_inspect(
    path: Path = typer.Argument(..., help="a logit cache split, or a teacher_logits node output (every split)"),
    samples: int = typer.Option(5, "--samples", help="token positions to decode"),
    as_json: bool = typer.Option(False, "--json", help="print the numbers as JSON"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer directory (default: the one the manifest records)"),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", help="inspect a random subset of rows (big caches)"),
):
    """Manifest, bytes per token, and the teacher's top-1 probability, top-k entropy and tail mass over all tokens."""
    from slimmoe.tasks.data.inspect import format_report, inspect_cache

    try:
        report = inspect_cache(path, samples=samples, tokenizer_dir=tokenizer, max_rows=max_rows)
    except USER_ERRORS as err:
        _fail(err)
    print(json.dumps(report, indent=2, default=str) if as_json else format_report(report))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
