"""`slimmoe submit`: run the driver as a Ray job on a remote cluster through the Ray Jobs API.

The job gets the project as `working_dir` (so it runs the code being submitted), the runtime
environment from `cluster/runtime_env.yaml`, and the workflow config in a small `py_modules`
package built per submission: the config travels with the job wherever it lives locally, with
its relative paths already resolved. A job dies with its cluster; resuming comes from storage.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import shlex
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import yaml

from .config import load_workflow
from .storage import is_uri

PACKAGE_PREFIX = "slimmoe_job_"
CONFIG_NAME = "workflow.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_root() -> Optional[Path]:
    """The source checkout this package runs from (the directory with pyproject.toml), if any."""
    here = Path(__file__).resolve().parent
    for d in (here, *here.parents):
        pp = d / "pyproject.toml"
        if pp.is_file() and 'name = "slimmoe"' in pp.read_text():
            return d
    return None


def is_local_address(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    try:
        return host in {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False


def load_runtime_env(root: Optional[Path], extra: Optional[Path] = None) -> dict:
    """cluster/runtime_env.yaml merged with a user file (the user's keys win; lists are appended)."""
    env: dict = {}
    for path in ([root / "cluster" / "runtime_env.yaml"] if root else []) + ([Path(extra)] if extra else []):
        if not path.is_file():
            if path == extra:
                raise FileNotFoundError(f"runtime env file {path} does not exist")
            continue
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping (a Ray runtime_env)")
        for k, v in data.items():
            if isinstance(v, dict) and isinstance(env.get(k), dict):
                env[k] = {**env[k], **v}
            elif isinstance(v, list) and isinstance(env.get(k), list):
                env[k] = env[k] + [x for x in v if x not in env[k]]
            else:
                env[k] = copy.deepcopy(v)
    return env


@dataclass
class Submission:
    entrypoint: list[str]
    runtime_env: dict
    submission_id: str
    workflow: str
    notes: list[str] = field(default_factory=list)
    package_dir: Optional[Path] = None  # the temporary py_modules package; removed after submitting

    def cleanup(self) -> None:
        if self.package_dir is not None:
            shutil.rmtree(self.package_dir.parent, ignore_errors=True)


def check_plan(loaded) -> Optional[str]:
    """Refuse (WorkflowConfigError) a workflow whose memory plan has a node that does not fit, before
    anything is uploaded; a note instead when it cannot be planned here (no teacher config.json on
    this machine: the job's `slimmoe run` checks it on the cluster before any node starts)."""
    from .config import WorkflowConfigError
    from .dag import build_dag
    from .plan import PlanError, PlanOptions, plan_dag, problems_of

    loaded = copy.deepcopy(loaded)  # building the DAG names the stages in place; the shipped config stays as written
    dag = build_dag(loaded, check_env=False, check_storage=False)
    try:
        plan = plan_dag(loaded, dag.nodes, PlanOptions(require_gpu_memory=False))
    except PlanError as err:
        return f"memory plan not checked here ({err}); the job checks it on the cluster before any node starts"
    problems = problems_of(loaded, plan)
    if problems:
        raise WorkflowConfigError(problems)
    return None


def job_command(command: str, node: Optional[str] = None, downstream: bool = False,
                allow_infeasible: bool = False) -> tuple[list[str], list[str]]:
    """What a job runs: the `slimmoe` subcommand with its options, and the arguments after the config:
    `run`, `status` (on the cluster, where storage and the teacher are), or `rerun CONFIG NODE`."""
    if command == "run":
        if node is not None:
            raise ValueError(f"NODE ({node}) goes with --command rerun; remove it to run the workflow")
        return ["run", *(["--allow-infeasible"] if allow_infeasible else [])], []
    if command == "status":
        if node is not None:
            raise ValueError(f"NODE ({node}) goes with --command rerun; status takes none")
        return ["status"], []
    if command == "rerun":
        if not node:
            raise ValueError("--command rerun needs the NODE to recompute, e.g. `slimmoe submit CONFIG stage_2 "
                             "--command rerun --address URL`")
        return ["rerun", *(["--downstream"] if downstream else [])], [node]
    raise ValueError(f"--command {command!r} is not one of run, status, rerun")


def prepare_submission(config_path, address: str, runtime_env_file: Optional[Path] = None,
                       overrides: dict | None = None, submission_id: Optional[str] = None,
                       allow_infeasible: bool = False,
                       command: Optional[tuple[list[str], list[str]]] = None) -> Submission:
    """Check the config locally (and its memory plan for what computes, unless `allow_infeasible`) and
    build the job's entrypoint (`command`, default `run`: see `job_command`) and runtime env."""
    command = command or job_command("run", allow_infeasible=allow_infeasible)
    loaded = load_workflow(config_path, overrides)
    cfg = loaded.config
    notes: list[str] = []
    if not allow_infeasible and command[0][0] != "status":
        note = check_plan(loaded)
        if note:
            notes.append(note)
    root = project_root()
    runtime_env = load_runtime_env(root, runtime_env_file)

    pkg_name = f"{PACKAGE_PREFIX}{uuid.uuid4().hex[:12]}"
    pkg = Path(tempfile.mkdtemp(prefix="slimmoe-submit-")) / pkg_name
    pkg.mkdir()
    # Ray names an uploaded package by a hash of its files, not of the directory's name: the name must
    # be in the content, or a resubmission of the same config reuses the first upload's directory name.
    (pkg / "__init__.py").write_text(f'"""A workflow config shipped with a `slimmoe submit` job."""\nPACKAGE = "{pkg_name}"\n')
    raw = cfg.model_dump(by_alias=True, exclude_unset=True)
    raw["storage"] = cfg.storage  # resolved against the config's directory
    (pkg / CONFIG_NAME).write_text(yaml.safe_dump(raw, sort_keys=False))

    py_modules = list(runtime_env.get("py_modules", []))
    runtime_env["py_modules"] = py_modules + [str(pkg)]
    if root is not None:
        runtime_env.setdefault("working_dir", str(root))
        env_vars = dict(runtime_env.get("env_vars", {}))
        # Relative to the job's working directory (the uploaded project): see cluster/pythonpath/slimmoe.
        shim = "cluster/pythonpath"
        env_vars["PYTHONPATH"] = shim + (":" + env_vars["PYTHONPATH"] if env_vars.get("PYTHONPATH") else "")
        runtime_env["env_vars"] = env_vars
    else:
        notes.append("slimmoe is not running from a source checkout: no working_dir is uploaded, the cluster "
                     "must have slimmoe installed")

    if not is_uri(cfg.storage) and not is_local_address(address):
        notes.append(f"storage {cfg.storage} is a local path: the job writes it on the cluster's head node. Use a "
                     "URI (s3://bucket/prefix, gs://...) or a shared filesystem mounted at the same path on every "
                     "node, or the outputs stay on the head node and multi-node stages cannot share them.")
    if cfg.teacher is not None and not is_local_address(address):
        notes.append(f"teacher path {cfg.teacher.path} must exist on the cluster's head node")

    sid = submission_id or f"slimmoe-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    entrypoint = ["slimmoe", *command[0], "--config-package", pkg_name, CONFIG_NAME, *command[1]]
    return Submission(entrypoint, runtime_env, sid, cfg.name, notes, pkg)


class SubmitError(RuntimeError):
    """The cluster's Jobs API cannot be reached or refuses the request."""


def _connect(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, ray.exceptions.AuthenticationError, HTTP errors
        hint = ""
        if "uthentication" in str(err):
            hint = ("\nThe cluster uses token authentication: export RAY_AUTH_MODE=token and make its token "
                    "available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).")
        elif isinstance(err, ConnectionError):
            hint = ("\nIs the head up, and is its dashboard port forwarded to this machine "
                    "(`ray dashboard CLUSTER.yaml`, or ssh -L 8265:localhost:8265 HEAD)?")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {first}{hint}") from err


async def _follow(client, job_id: str, out: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out(chunk)


def wait_for_job(client, job_id: str, poll_s: float = 1.0, timeout_s: Optional[float] = None) -> str:
    t0 = time.time()
    while True:
        status = client.get_job_status(job_id)
        status = str(getattr(status, "value", status))
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.time() - t0 > timeout_s:
            return status
        time.sleep(poll_s)


def submit_workflow(config_path, address: str, *, wait: bool = True, runtime_env_file: Optional[Path] = None,
                    overrides: dict | None = None, submission_id: Optional[str] = None,
                    entrypoint_num_gpus: float = 0, entrypoint_num_cpus: float = 0, allow_infeasible: bool = False,
                    command: Optional[tuple[list[str], list[str]]] = None,
                    out: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> tuple[str, str]:
    """Submit the workflow's driver as a Ray job. Returns (job id, final status, or "SUBMITTED" without wait)."""
    sub = prepare_submission(config_path, address, runtime_env_file, overrides, submission_id, allow_infeasible,
                             command)
    try:
        for note in sub.notes:
            out(f"note: {note}\n")
        client = _connect(address)
        # The driver runs evaluate / trim / quantize in its own process: entrypoint GPUs place it on a GPU node.
        resources = {k: v for k, v in (("entrypoint_num_gpus", entrypoint_num_gpus),
                                       ("entrypoint_num_cpus", entrypoint_num_cpus)) if v}
        job_id = client.submit_job(entrypoint=shlex.join(sub.entrypoint), runtime_env=sub.runtime_env,
                                   submission_id=sub.submission_id, metadata={"workflow": sub.workflow}, **resources)
    finally:
        sub.cleanup()  # the package is uploaded by submit_job
    out(f"submitted job {job_id} to {address}: {shlex.join(sub.entrypoint)}\n")
    if not wait:
        out(f"follow it with: ray job logs --address {address} --follow {job_id}\n")
        return job_id, "SUBMITTED"
    try:
        asyncio.run(_follow(client, job_id, out))
    except KeyboardInterrupt:
        out(f"\nstopped following; the job keeps running. Stop it with: ray job stop --address {address} {job_id}\n")
        raise
    except RuntimeError as err:  # the log stream broke (head restarted, network): fall back to polling
        out(f"\nlost the log stream ({err}); waiting for the job to end\n")
    status = wait_for_job(client, job_id)
    out(f"job {job_id} {status}\n")
    return job_id, status


def resolve_config_package(package: str, name: str) -> Path:
    """The config file shipped in a submission's py_modules package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"config package {package!r} is not importable here (was it shipped with the job?)")
    return Path(list(spec.submodule_search_locations)[0]) / name
