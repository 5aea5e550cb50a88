"""Faults a careful user hit (issue 24, items 11, 12 and 13), each driven through `slimmoe run` on a real
tiny workflow (tokenize, teacher_logits, one Ray Train stage): an error that recurs is reported once,
a disk too small for the stage is refused before it starts, and SIGTERM stops a run cleanly and the
next run resumes from the latest checkpoint the workers reported."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimmoe.workflows.cli import app

runner = CliRunner()
SEQ, MICRO = 32, 4
STEP_TOKENS = SEQ * MICRO


def _workflow(root: Path, teacher: Path, store: Path, **stage) -> Path:
    cfg = {"name": "wf", "storage": str(store), "teacher": {"path": str(teacher)},
           "data": {"source": "${PYTHON_STDLIB}/[a-c]*.py", "seq_len": SEQ, "validation_fraction": 0.2},
           "logits": {"k": 8, "batch_size": 32},
           "stages": [{"expert_intermediate_size": 24, "micro_batch": MICRO, "calibration_batches": 1,
                       "token_budget": 20 * STEP_TOKENS, "checkpoint_interval": 5, "log_interval": 5, **stage}]}
    path = root / "wf.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prepared(ray_cluster, tiny_model_dir, tmp_path_factory):
    """The workflow's tokenize and teacher_logits outputs, made once; each test copies the store."""
    from slimmoe.workflows.dag import build_dag
    from slimmoe.workflows.driver import Driver

    root = tmp_path_factory.mktemp("faults")
    config = _workflow(root, tiny_model_dir, root / "store")
    Driver(build_dag(str(config)), log=lambda s: None).run(targets={"tokenize", "teacher_logits"})
    return root / "store"


def _copy(prepared: Path, tmp_path: Path, teacher: Path, **stage) -> tuple[Path, Path]:
    store = tmp_path / "store"
    shutil.copytree(prepared, store)
    return _workflow(tmp_path, teacher, store, **stage), store / "wf"


def _status(config: Path) -> dict:
    result = runner.invoke(app, ["status", str(config), "--json"])
    assert result.exit_code == 0, result.output
    return {r["node"]: r for r in json.loads(result.output)}


# -- item 11: an error that recurs gets one attempt and one report ------------------------------------


def _train_workers_started() -> int:
    """Ray Train workers this cluster has ever started (one per rank and attempt), from the GCS actor table:
    what Ray did, whoever decided it."""
    from ray._private.state import actors

    return sum(1 for a in actors().values() if a.get("ActorClassName", "").endswith("RayTrainWorker"))


def test_a_damaged_cache_file_found_by_a_worker_fails_the_stage_once_naming_the_file(prepared, tiny_model_dir,
                                                                                    tmp_path):
    config, wf = _copy(prepared, tmp_path, tiny_model_dir, max_failures=2)
    train = next((wf / "teacher_logits").glob("*/train"))
    files = [f["path"] for f in json.loads((train / "manifest.json").read_text())["files"]]
    for name in files:  # every file: the first shuffled batch hits one
        path = train / name
        if path.stat().st_size < 3 * 4096:  # too small to damage away from its footer, which the driver reads
            continue
        data, st = bytearray(path.read_bytes()), path.stat()
        mid = len(data) // 2
        data[mid:mid + 4096] = bytes(min(4096, len(data) - mid))
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # rot on disk: same size, same time

    before = _train_workers_started()
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 1, result.output
    assert _train_workers_started() - before == 1  # one worker, one attempt: max_failures=2 is for lost workers
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "LogitCacheError" in errors[0], result.output
    assert any(name in errors[0] for name in files), errors[0]
    assert "stage_1" in errors[0] and "rerun" in errors[0]


def test_errors_that_recur_are_told_from_those_a_retry_may_cure():
    from slimmoe.tasks.slimming.stage_run import StageWorkerError

    def raised(err: BaseException) -> BaseException:  # as the worker sees it: with its cause chained
        try:
            raise RuntimeError("while saving") from err
        except RuntimeError as wrapped:
            return wrapped

    def recurs(err):
        return StageWorkerError.of("s", 0, 2, 7, "training", raised(err)).recurs

    assert recurs(OSError(errno.ENOSPC, "No space left on device", "/store/ckpt/model.pt")) == "the disk is full"
    assert recurs(ModuleNotFoundError("No module named 'deepspeed'")) == "a module is missing"
    assert recurs(RuntimeError("Error(s) in loading state_dict: size mismatch for w: copying a param with shape "
                               "[4, 8] from checkpoint, the shape in current model is [4, 6]"))
    from safetensors import SafetensorError

    assert recurs(SafetensorError("Error while deserializing header: InvalidHeaderDeserialization"))
    assert recurs(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) == ""  # a lost peer
    assert recurs(RuntimeError("Gloo connectFullMesh failed")) == ""
    # Its verdict survives the trip back to the driver inside Ray Train's report.
    import pickle

    err = StageWorkerError.of("s", 1, 2, 7, "training", raised(OSError(errno.ENOSPC, "full")))
    assert pickle.loads(pickle.dumps(err)).recurs == "the disk is full"


# -- item 12: a stage that would fill the disk is refused before it starts ----------------------------


def test_a_disk_too_small_for_the_stage_is_refused_before_it_starts_and_status_says_why(
        prepared, tiny_model_dir, tmp_path, monkeypatch):
    import slimmoe.tasks.core.disk as disk
    from slimmoe.workflows.storage import Store

    config, wf = _copy(prepared, tmp_path, tiny_model_dir)
    planned = runner.invoke(app, ["plan", str(config), "--json"])
    assert planned.exit_code == 0, planned.output
    need = next(n for n in json.loads(planned.output)["nodes"] if n["name"] == "stage_1")["disk_bytes"]
    assert need > 1_000_000  # checkpoints (float32 weights and AdamW moments) and the models

    free = 2_000_000 if need > 2_000_000 else need // 2  # the 2 MB, where the stage needs more
    monkeypatch.setattr(disk, "free_bytes", lambda path: free)
    before = _train_workers_started()
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    work = next((wf / "stage_1" / "_work").iterdir())
    assert str(work) in errors[0] and f"{need:,} bytes" in errors[0] and f"{free:,} bytes" in errors[0], errors[0]
    assert "storage" in errors[0]  # the fix
    assert _train_workers_started() == before  # no worker was started
    assert not (work / "ray_train").exists()

    row = _status(config)["stage_1"]
    assert row["state"] == "failed" and f"{free:,} bytes" in row["error"], row

    # The store itself refuses the failure record (as a full disk does): `status` still says what happened.
    real_write = Store.write_text

    def full_store(self, path, text):
        if "/_attempts/" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(self, path, text)

    monkeypatch.setattr(Store, "write_text", full_store)
    monkeypatch.setenv("SLIMMOE_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 1, result.output
    monkeypatch.setattr(Store, "write_text", real_write)
    row = _status(config)["stage_1"]
    assert row["state"] == "failed" and "interrupted" not in row["error"], row
    assert f"{free:,} bytes" in row["error"] and "No space left on device" in row["error"], row


# -- item 13: SIGTERM stops the run cleanly; the next run resumes from the latest reported checkpoint --


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_step(proc: subprocess.Popen, work_root: Path, step: int, log: Path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        for progress in work_root.glob("*/progress.json"):
            try:
                if json.loads(progress.read_text())["step"] >= step:
                    return
            except (OSError, ValueError):  # replaced while read
                pass
        time.sleep(0.05)
    raise AssertionError(f"the stage did not reach step {step}: {log.read_text()[-3000:]}")


def test_sigterm_stops_the_run_cleanly_and_the_next_run_resumes_from_the_latest_reported_checkpoint(
        prepared, tiny_model_dir, tmp_path):
    config, wf = _copy(prepared, tmp_path, tiny_model_dir, token_budget=40 * STEP_TOKENS)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "slimmoe.workflows.cli", "run", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        # Ray Train's controller registers a checkpoint only when it next polls the workers (every 2 s):
        # a stop right after a report is what lost the checkpoints of steps 20 and 30.
        _wait_for_step(proc, wf / "stage_1" / "_work", 11, log)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert "SIGTERM received" not in text and "*** " not in text, text[-3000:]  # no C++ stack dump
    assert "stopped by SIGTERM during stage_1" in text

    row = _status(config)["stage_1"]
    assert row["state"] == "stopped" and "stopped by signal (SIGTERM)" in row["error"], row
    work = next((wf / "stage_1" / "_work").iterdir())
    worker = int((work / "pids" / "rank0.pid").read_text())
    deadline = time.time() + 30
    while _alive(worker) and time.time() < deadline:  # the stop ends the workers too; then nothing writes
        time.sleep(0.1)
    assert not _alive(worker)
    reported = json.loads((work / "checkpoint.json").read_text())["step"]  # the latest every rank finished
    assert reported >= 10 and reported % 5 == 0

    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert "resuming: the previous attempt" in result.output and "was stopped by SIGTERM" in result.output
    marker = json.loads(next((wf / "stage_1").glob("*/_SUCCESS")).read_text())
    assert marker["metrics"]["resumed_from_step"] == reported, (marker["metrics"], reported)
    assert marker["metrics"]["steps"] == 40
