"""`slimmoe submit` for real: a Ray head started here on loopback, a workflow run as a Ray job.

The head gets its own temp dir and explicit free ports, so it never collides with the in-process
cluster of the `ray_cluster` fixture (not used here) or with other Ray clusters on the machine,
and `ray.init()` elsewhere never attaches to it. It is stopped by ending the process group of the
`ray start --block` process this module started (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from standins import STANDIN_SITE, make_teacher, workflow_dict, write_config

VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are chosen, or the OS may hand
    the same port out twice (and `ray start` refuses two components on one port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict:
    # Ray 2.60 turns token authentication on for a `ray start` that finds a token in ~/.ray (any earlier
    # local ray.init() writes one). This loopback-only test cluster opts out explicitly, so the outcome
    # does not depend on what ran on the machine before; see README_running for clusters with tokens.
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    for var in ("RAY_ADDRESS", "STANDIN_CALLS", "STANDIN_FAIL"):
        env.pop(var, None)
    return env


def _our_leftovers(temp_dir: str) -> list[int]:
    """Processes of this head that outlived its process group (matched by our private temp dir)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    names = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    ports = dict(zip(names, _free_ports(len(names))))
    # Worker ports from below the kernel's ephemeral range, where the free ports above come from:
    # `ray start` refuses a worker range that overlaps one of them.
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    low = 20000 + (uuid.uuid4().int % max(1, (ephemeral_low - 20100) // 100)) * 100
    assert not set(range(low, low + 100)) & set(ports.values())
    args = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
            f"--temp-dir={temp_dir}", f"--min-worker-port={low}", f"--max-worker-port={low + 99}",
            "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline, last = time.time() + 150, None
        while time.time() < deadline:
            assert proc.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception as err:  # the dashboard is not up yet
                last = err
                time.sleep(1)
        else:
            raise RuntimeError(f"the Ray head did not come up: {last}")
        yield address
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the process started above
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group did not stop gracefully
        except ProcessLookupError:
            pass
        proc.wait()
        deadline = time.time() + 20
        while _our_leftovers(temp_dir) and time.time() < deadline:
            time.sleep(0.5)
        for pid in _our_leftovers(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def job_workflow(tmp_path):
    root = tmp_path / "elsewhere"  # a config far from the project's working_dir
    root.mkdir()
    make_teacher(root / "teacher")
    cfg = workflow_dict(root)
    # Relative paths: the submitter resolves them against the config's directory before shipping it.
    cfg["storage"], cfg["teacher"] = "store", {"path": "teacher"}
    return write_config(root, cfg)


@pytest.fixture
def standin_runtime_env(tmp_path):
    """The job's processes get the stand-in node kinds (and an evaluate that runs in a Ray task)."""
    path = tmp_path / "standin_env.yaml"
    path.write_text(f"env_vars:\n  PYTHONPATH: {STANDIN_SITE}\n  STANDIN_RAY_EVAL: '1'\n")
    return path


def test_prepare_submission_ships_config_and_warns_about_local_storage(job_workflow):
    import yaml

    from slimmoe.workflows.submit import prepare_submission, project_root

    sub = prepare_submission(job_workflow, "http://10.20.30.40:8265")
    try:
        assert sub.entrypoint[:2] == ["slimmoe", "run"] and sub.entrypoint[-1] == "workflow.yaml"
        assert sub.runtime_env["working_dir"] == str(project_root())
        assert "cluster/pythonpath" in sub.runtime_env["env_vars"]["PYTHONPATH"]
        assert sub.runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"  # from cluster/runtime_env.yaml
        assert ".venv/" in sub.runtime_env["excludes"]
        pkg = Path(sub.runtime_env["py_modules"][-1])
        shipped = yaml.safe_load((pkg / "workflow.yaml").read_text())
        assert shipped["storage"] == str(job_workflow.parent / "store")  # absolute, as resolved locally
        assert shipped["teacher"]["path"] == str(job_workflow.parent / "teacher")
        assert "plugins" not in shipped and sorted(p.name for p in pkg.iterdir()) == ["__init__.py", "workflow.yaml"]
        assert any("local path" in n for n in sub.notes)
    finally:
        sub.cleanup()
    assert not pkg.exists()
    local = prepare_submission(job_workflow, "http://127.0.0.1:8265")
    local.cleanup()
    assert not any("local path" in n for n in local.notes)


def test_submit_runs_the_workflow_as_a_ray_job(ray_head, job_workflow, standin_runtime_env, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from slimmoe.workflows.driver import workflow_status

    cli = [sys.executable, "-m", "slimmoe.workflows.cli"]
    extra = ["--runtime-env", str(standin_runtime_env)]
    done = subprocess.run([*cli, "submit", str(job_workflow), "--address", ray_head, *extra], env=_env(),
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "submitted job slimmoe-wf-" in out
    assert "finished stage_3 in" in out and "finished evaluate_one_stage in" in out  # the job's streamed log
    assert "SUCCEEDED" in out

    rows = {r["node"]: r for r in workflow_status(job_workflow)}
    assert {r["state"] for r in rows.values()} == {"done"}, rows
    assert rows["evaluate_stage_3"]["metrics"]["ray_nodes"] == 1  # its Ray task ran on the head's cluster
    store = job_workflow.parent / "store" / "wf"
    assert (store / "stage_2" / rows["stage_2"]["key"] / "_SUCCESS").exists()

    # --no-wait returns at once with the job id; the second run of the finished workflow runs no node.
    quick = subprocess.run([*cli, "submit", str(job_workflow), "--address", ray_head, "--no-wait", *extra], env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert quick.returncode == 0, quick.stdout + quick.stderr
    job_id = next(w for w in quick.stdout.split() if w.startswith("slimmoe-wf-"))
    client = JobSubmissionClient(ray_head)
    deadline = time.time() + 180
    while str(client.get_job_status(job_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
        time.sleep(1)
    assert str(client.get_job_status(job_id).value) == "SUCCEEDED", client.get_job_logs(job_id)
    logs = client.get_job_logs(job_id)
    assert "skipped stage_3" in logs and "started " not in logs
