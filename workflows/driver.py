"""The driver: run a workflow's nodes in order, skipping every node whose output is complete.

A node runs into a fresh `<node>/.<key>.partial-<id>` directory (for URI storage: a local staging
directory, uploaded there when the node is done), gets its `_SUCCESS` marker, and only then takes
its place at `<node>/<key>/` (`Store.publish`, the one way an output is published). A killed run
therefore leaves nothing that looks complete; the next run recovers a complete copy a killed
publish left beside its place (`_cleanup`), recomputes only what is missing, and a stage resumes
from the Ray Train checkpoints in its stable work dir `<node>/_work/<key>/`.
Each attempt is recorded in `<node>/_attempts/<key>.json` (pid, host, state, error) for `status`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import shutil
import socket
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from slimmoe.tasks.core.disk import dir_bytes
from slimmoe.tasks.core.storage import atomic_output_dir, file_checksum, write_json_atomic

from .dag import TEACHER_RECORD, Dag, Node, build_dag, teacher_record
from .nodes import NodeContext, get_node_kind, headline_of
from .signals import RunStopped, catch_stop_signals, received, signal_name, stop_ray, stop_signals
from .storage import MARKER, StorageError, Store, leftover


class NodeFailed(RuntimeError):
    def __init__(self, node: str, error: BaseException, log_path: str | None = None):
        self.node, self.error, self.log_path = node, error, log_path
        where = f"; log: {log_path}" if log_path else ""
        super().__init__(f"node {node!r} failed: {type(error).__name__}: {error}{where}. "
                         "Completed nodes are kept: fix the cause and run again.")


class UnknownNodeError(ValueError):
    pass


class NodeBusyError(RuntimeError):
    """Another live driver on this host is computing the node."""


class DamagedOutputError(ValueError):
    """A complete output whose files are no longer what its marker recorded: refused as a node's input."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(obj):
    return json.loads(json.dumps(obj if obj is not None else {}, default=str))


# A forced rerun's work dir is `<key>-rerun-<id>`, fresh each time: Ray Train silently resumes from a reused one.
RERUN_TAG = "-rerun-"


def _format_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def _output_checksums(out_dir: Path) -> dict[str, dict]:
    """{path relative to the output: {"bytes", "checksum"}} of every file a node wrote, for its marker.
    Computed once, on the local copy the node has just written (the store's staged copy, or the local
    staging dir a URI store uploads from), so it costs one read of the output, largely from the page cache."""
    out = {}
    for file in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            out[file.relative_to(out_dir).as_posix()] = {"bytes": os.fstat(f.fileno()).st_size,
                                                          "checksum": file_checksum(f)}
    return out


def _first_damage(store: Store, path: str, marker: dict, verify: bool) -> Optional[tuple[str, str]]:
    """(file relative to `path`, what is wrong with it) for the first file of the output at `path` that is
    not as its marker recorded it; None when all are, and when the marker (from before checksums were
    recorded) has none to compare: such an output is unverified, not damaged.

    Cost: one listing (sizes and mtimes), and a read only of the files written after the marker (an edit
    or a tool writing in place moves the mtime; the marker is written last, also by a copy), or of every
    file with `verify`. Reading every file each time would cost minutes per node start or `status` on a
    42B model (~84 GB). What keeps its size and mtime (bit rot) is left to `verify` and to downloads,
    which read everything anyway. A store without mtimes gets the size check alone."""
    recorded = marker.get("checksums")
    if not recorded:
        return None
    present = store.files(path)
    sealed = present.get(MARKER)
    for rel, want in sorted(recorded.items()):
        info = present.get(rel)
        if info is None:
            return rel, "is missing"
        if info.size != want["bytes"]:
            return rel, f"has {info.size} bytes, not the {want['bytes']} recorded when the node finished"
        if (verify or _written_after(info, sealed)) and (got := store.checksum(info.path)) != want["checksum"]:
            return rel, f"changed after the node finished (checksum {got}, recorded {want['checksum']})"
    return None


def _written_after(info, marker_info) -> bool:
    """Whether a file's mtime is past its marker's (False where the store gives no mtimes)."""
    times = (info.mtime_ns, marker_info.mtime_ns if marker_info is not None else None)
    return None not in times and times[0] > times[1]


def _input_record(parent: Node) -> dict:
    """An input as a marker records it; a Hub teacher with the commit it was read at."""
    return {"node": parent.name, "key": parent.key, **({"hub": parent.hub} if parent.hub else {})}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed child not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def attempt_alive(attempt: dict | None) -> bool:
    """Whether a recorded running attempt still runs (unknowable for another host: assumed yes)."""
    if not attempt or attempt.get("state") != "running":
        return False
    if attempt.get("host") != socket.gethostname():
        return True
    return _pid_alive(int(attempt.get("pid", -1)))


@dataclass
class NodeResult:
    name: str
    state: str  # skipped | finished
    key: str
    path: str
    seconds: float = 0.0
    metrics: dict | None = None


class Driver:
    def __init__(self, dag: Dag, log: Callable[[str], None] = print, address: Optional[str] = None,
                 command: str = "run"):
        self.dag, self.store, self.address = dag, dag.store, address
        cfg = dag.workflow.config
        self.cache_dir = Path(cfg.cache_dir or os.environ.get("SLIMMOE_CACHE") or Path.home() / ".cache" / "slimmoe")
        self._print = log
        self._command = command
        self._log_lines: list[str] = []
        self._log_path: Optional[str] = None
        self._log_file: Optional[str] = None  # the log as a local file, appended line by line; else uploaded whole
        self._teacher_fp: Optional[str] = None

    # -- logging -----------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        self._print(line)
        stamped = f"{_now()} {line}"
        self._log_lines.append(stamped)
        if self._log_file:
            with open(self._log_file, "a") as f:
                f.write(stamped + "\n")

    def _open_log(self) -> None:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{self._command}-{os.getpid()}.log"
        self._log_path = self.store.join(self.dag.name, "_logs", name)
        # A local log survives a SIGKILL line by line; a URI store has no append, so it gets the whole
        # log after each node and at the end.
        self._log_file = self.store.local_path(self._log_path)
        if self._log_file:
            os.makedirs(os.path.dirname(self._log_file), exist_ok=True)

    def _flush_log(self) -> None:
        if not self._log_file and self._log_path:
            try:
                self.store.write_text(self._log_path, "\n".join(self._log_lines) + "\n")
            except Exception as err:  # a log upload must never fail a run
                self._print(f"warning: could not upload the log to {self._log_path}: {err}")

    # -- markers and attempts ----------------------------------------------------------------------
    def marker(self, name: str, key: Optional[str] = None) -> Optional[dict]:
        """The node's `_SUCCESS` for `key` (default: its current key) if the output is complete."""
        node = self.dag.nodes[name]
        key = key or node.key
        path = self.store.join(self.dag.name, name, key)
        return self._valid_marker(path, key)

    def _valid_marker(self, path: str, key: str) -> Optional[dict]:
        text = self.store.read_text(self.store.sub(path, MARKER))
        if text is None:
            return None
        try:
            marker = json.loads(text)
        except ValueError:
            return None
        if marker.get("key") != key:
            return None
        present = set(self.store.listdir(path))
        if not set(marker.get("files", [])) <= present:  # a marker pointing at deleted data is no output
            return None
        return marker

    def _attempt_path(self, name: str, key: str) -> str:
        return self.store.join(self.dag.name, name, "_attempts", f"{key}.json")

    def attempt(self, name: str, key: Optional[str] = None) -> Optional[dict]:
        key = key or self.dag.nodes[name].key
        fallback = self._fallback_attempt_path(name, key)
        # There only while the store's record is behind: every record the store takes removes it.
        text = fallback.read_text() if fallback.is_file() else self.store.read_text(self._attempt_path(name, key))
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def _fallback_attempt_path(self, name: str, key: str) -> Path:
        return self.cache_dir / "attempts" / self.dag.name / name / f"{key}.json"

    def _write_attempt(self, name: str, key: str, record: dict) -> None:
        fallback = self._fallback_attempt_path(name, key)
        try:
            self.store.write_text(self._attempt_path(name, key), json.dumps(record, indent=2, sort_keys=True))
            fallback.unlink(missing_ok=True)
            return
        except Exception as err:  # bookkeeping must not fail the node
            where = self.store.display(self._attempt_path(name, key))
            record = record | {"record_error": f"could not write {where}: {type(err).__name__}: {err}"}
        try:  # a full store must not turn a failure into "interrupted" in `status`: the local cache keeps it
            fallback.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(fallback, record)
            self._print(f"warning: {record['record_error']}; recorded the attempt of {name} in {fallback}")
        except OSError as err:
            self._print(f"warning: {record['record_error']}, nor {fallback}: {err}")

    def complete(self, name: str) -> bool:
        node = self.dag.nodes[name]
        if node.is_external:
            return True
        return self.marker(name) is not None

    # -- leftovers -----------------------------------------------------------------------------------
    def _cleanup(self, name: str) -> list[tuple[str, Optional[int]]]:
        """Settle what interrupted attempts left beside the outputs: staged `.<key>.partial-<id>` and
        set-aside `.<key>.old-<id>` directories (see `Store.publish`), unless a live attempt owns them.

        Where the output in place is not complete but a leftover is (killed inside a publish: the old
        output set aside or deleted, the new one staged), the newest complete leftover becomes the
        output; every other leftover is deleted."""
        node_dir = self.dag.node_dir(name)
        found: dict[str, list[str]] = {}
        for entry in self.store.listdir(node_dir):
            parsed = leftover(entry)
            if parsed is None:
                continue
            key = parsed[0]
            att = self.attempt(name, key)
            if attempt_alive(att) and leftover(att.get("partial") or "") == parsed:
                continue  # a running attempt's own staging (or the old output it set aside)
            found.setdefault(key, []).append(entry)
        removed = []
        for key, entries in found.items():
            final = self.store.sub(node_dir, key)
            if self._valid_marker(final, key) is None:
                complete = sorted((m.get("finished", ""), entry) for entry in entries
                                  if (m := self._valid_marker(self.store.sub(node_dir, entry), key)) is not None)
                if complete:
                    best = complete[-1][1]
                    self.store.delete_dir(final)  # what is in place is incomplete (or absent)
                    self.store.move(self.store.sub(node_dir, best), final)
                    entries.remove(best)
            for entry in entries:
                path = self.store.sub(node_dir, entry)
                local = self.store.local_path(path)
                size = dir_bytes(Path(local)) if local else None
                self.store.delete_dir(path)
                removed.append((self.store.display(path), size))
        return removed

    # -- inputs ----------------------------------------------------------------------------------------
    def local_input(self, name: str) -> str:
        """A local path holding the complete output of node `name` (downloaded from URI storage), its
        files as its marker recorded them (else DamagedOutputError naming the file and the fix)."""
        node = self.dag.nodes[name]
        path = self.dag.output_path(name)
        if node.is_external:
            return path
        marker = self.marker(name)
        if self.store.local_path(path) is not None:
            if marker is not None and (damage := self.damage(name, marker)):
                raise DamagedOutputError(damage)
            return path
        local = self.cache_dir / "inputs" / self.dag.name / name / node.key
        cached = local / MARKER
        # A copy is the store's output while the store holds the same marker: a rerun keeps the key.
        if marker is not None and cached.is_file() and json.loads(cached.read_text()) == marker:
            return str(local)
        self.log(f"downloading {name} from {self.store.display(path)}")
        with atomic_output_dir(local, overwrite=True) as tmp:  # an incomplete copy is never taken as `local`
            self.store.download_dir(path, tmp)
            # Every file is checked in full: the download has just read it all, and it crossed a network.
            if damage := self.damage(name, json.loads((tmp / MARKER).read_text()), verify=True, copy=tmp):
                raise DamagedOutputError(damage)
        return str(local)

    def damage(self, name: str, marker: dict, verify: bool = False, copy: Optional[Path] = None) -> Optional[str]:
        """One line naming the first file of node `name`'s output that is not as `marker` recorded it, and
        the fix; None if there is none (see `_first_damage` for what is read). `copy`: a local download
        of the output to check instead, its files named by their place in the store."""
        path = self.dag.output_path(name)
        checked = Store(copy) if copy is not None else self.store
        found = _first_damage(checked, checked.root if copy is not None else path, marker, verify)
        if found is None:
            return None
        file, what = found
        return (f"{self.store.display(self.store.sub(path, file))} {what}: the output of {name} is damaged; "
                f"recompute it with `slimmoe rerun CONFIG {name}`")

    def _work_root(self, name: str) -> Path:
        in_store = self.store.local_path(self.store.join(self.dag.name, name, "_work"))
        return Path(in_store) if in_store else self.cache_dir / "work" / self.dag.name / name

    def work_dir(self, name: str, work_name: str) -> str:
        """A node's resumable scratch (Ray Train checkpoints): in the store when it is a local path, else
        in the local cache (tasks take local paths; for a multi-node cluster put cache_dir on a shared
        filesystem, as Ray Train needs its storage_path visible from every worker)."""
        return str(self._work_root(name) / work_name)

    def _dead_work_dirs(self, name: str) -> list[Path]:
        """Work dirs that no live attempt uses and no run will resume from: a forced rerun's (a rerun
        always starts afresh), and the stable one of a key whose output is complete (killed between
        publishing and removing it). A stable work dir of an unfinished key is resumable and stays."""
        root = self._work_root(name)
        if not root.is_dir():
            return []
        out = []
        for entry in sorted(root.iterdir()):
            key, rerun, _ = entry.name.partition(RERUN_TAG)
            att = self.attempt(name, key)
            if attempt_alive(att) and os.path.basename(att.get("work_dir") or "") == entry.name:
                continue
            if rerun or self.marker(name, key) is not None:
                out.append(entry)
        return out

    def _dead_staging(self, name: str) -> list[Path]:
        """Local copies that attempts no longer alive staged for a URI store (`<key>.partial-<id>`)."""
        if self.store.local_path(self.store.root) is not None:
            return []
        root = self.cache_dir / "staging" / self.dag.name / name
        out = []
        for entry in sorted(root.iterdir()) if root.is_dir() else ():
            parsed = leftover("." + entry.name)
            att = self.attempt(name, parsed[0]) if parsed else None
            if not (attempt_alive(att) and att.get("partial") == "." + entry.name):
                out.append(entry)
        return out

    def _settle(self, name: str) -> list[tuple[str, Optional[int]]]:
        """Remove what attempts that are no longer alive left behind (and recover a complete output an
        interrupted publish left beside its place); returns (path, bytes) of each removed directory."""
        removed: list[tuple[str, Optional[int]]] = []
        for entry in self._dead_work_dirs(name) + self._dead_staging(name):
            removed.append((str(entry), dir_bytes(entry)))
            shutil.rmtree(entry, ignore_errors=True)
        if self.store.exists(self.dag.node_dir(name)):
            removed += self._cleanup(name)
        for path, size in removed:
            self.log(f"removed {path}{f' ({_format_bytes(size)})' if size is not None else ''}: left by an attempt "
                     f"of {name} that is gone")
        return removed

    def clean(self) -> list[tuple[str, Optional[int]]]:
        """`_settle` every node: what `slimmoe status --clean` removes."""
        return [r for name, node in self.dag.nodes.items() if not node.is_external for r in self._settle(name)]

    def teacher_fingerprint(self) -> Optional[str]:
        teacher = self.dag.nodes["teacher"]
        if teacher.facets.get("model"):
            return teacher.facets["model"]
        if self._teacher_fp is None:
            from slimmoe.tasks.core.fingerprint import model_fingerprint

            try:
                self._teacher_fp = model_fingerprint(self.local_input("teacher"))
            except FileNotFoundError:  # a stand-in teacher without weights
                self._teacher_fp = None
        return self._teacher_fp

    # -- running ---------------------------------------------------------------------------------------
    def run(self, force: set[str] = frozenset(), targets: Optional[set[str]] = None) -> dict[str, NodeResult]:
        self._open_log()
        results: dict[str, NodeResult] = {}
        self.log(f"workflow {self.dag.name}: {len(self.dag.nodes)} nodes, storage {self.store.display(self.store.join(self.dag.name))}")
        self._record_teacher()
        with stop_signals():
            try:
                return self._run_nodes(force, targets, results)
            except KeyboardInterrupt:  # a stop signal outside a node (one inside is `RunStopped` already)
                if received() is None:
                    raise
                stop_ray()
                raise RunStopped(received(), f"stopped by {signal_name(received())}; `slimmoe run` goes on from "
                                             "the first node whose output is not complete") from None

    def _record_teacher(self) -> None:
        """The external teacher as this run validated it, in storage: `status` then computes every key
        from it on a machine without the teacher's files (a laptop beside a cluster run)."""
        teacher = self.dag.nodes.get("teacher")
        if teacher is None or not teacher.is_external or not teacher.facets or teacher.recorded is not None:
            return
        try:
            self.store.write_text(self.store.join(self.dag.name, TEACHER_RECORD),
                                  json.dumps(teacher_record(self.dag.workflow, teacher, _now()), indent=2, sort_keys=True))
        except Exception as err:  # bookkeeping: without it, status elsewhere reads the teacher as run does
            self._print(f"warning: could not record the teacher for `status` elsewhere: {err}")

    def _run_nodes(self, force, targets, results) -> dict[str, NodeResult]:
        try:
            for name, node in self.dag.nodes.items():
                if targets is not None and name not in targets:
                    continue
                path = self.store.display(self.dag.output_path(name)) if not node.is_external else node.external_path
                if node.is_external:
                    where = (f"Hub model {node.hub['repo_id']} at {node.hub['revision']}: commit {node.hub['commit']}, "
                             f"snapshot {node.external_path}" if node.hub else f"external model at {node.external_path}")
                    self.log(f"skipped {name} ({where}, key {node.key})")
                    results[name] = NodeResult(name, "skipped", node.key, path)
                    continue
                if name not in force:
                    # A killed publish may have left the complete output beside its place; a killed rerun,
                    # its work dir (model and optimizer state) beside a complete output.
                    self._settle(name)
                    m = self.marker(name)
                    if m is not None:
                        self.log(f"skipped {name} (key {node.key})")
                        results[name] = NodeResult(name, "skipped", node.key, path, m.get("duration_s", 0.0),
                                                   m.get("metrics"))
                        continue
                results[name] = self._execute(node, forced=name in force)
                self._flush_log()
        finally:
            self._flush_log()
        return results

    def _execute(self, node: Node, forced: bool) -> NodeResult:
        name, key = node.name, node.key
        kind = get_node_kind(node.kind)
        if kind.uses_ray:
            from slimmoe.tasks.core.runtime import ensure_ray  # imports torch: only when a node needs Ray

            ensure_ray(self.address)
            catch_stop_signals()  # ray.init replaced the SIGTERM handler
        node_dir = self.dag.node_dir(name)
        self.store.makedirs(node_dir)
        self._settle(name)
        try:
            inputs = {role: self.local_input(parent) for role, parent in node.inputs.items()}
        except DamagedOutputError as err:  # before any attempt: the fix is the input's rerun, not this node's
            raise DamagedOutputError(f"cannot run {name}: {err}") from None

        previous = self.attempt(name, key)
        if attempt_alive(previous) and previous.get("host") == socket.gethostname() and previous.get("pid") != os.getpid():
            # Two drivers on one node would train into the same work dir. (On another host liveness is
            # unknowable, and a job that died with its cluster must be resumable: that case proceeds.)
            raise NodeBusyError(
                f"node {name!r} (key {key}) is being computed by another run: pid {previous.get('pid')} since "
                f"{previous.get('started')}. Wait for it (`slimmoe status`) or stop that process, then run again.")
        interrupted = previous is not None and previous.get("state") in ("running", "failed", "stopped") and \
            not attempt_alive(previous)
        work_dir = None
        if kind.uses_work_dir:
            # A forced rerun gets a fresh work dir: Ray Train silently resumes from a reused one.
            work_name = key if not forced else f"{key}{RERUN_TAG}{uuid.uuid4().hex[:8]}"
            work_dir = self.work_dir(name, work_name)
            os.makedirs(work_dir, exist_ok=True)
        has_state = bool(work_dir) and bool(os.listdir(work_dir))
        retried = not forced and interrupted
        resumed = not forced and kind.uses_work_dir and (interrupted or has_state)

        final = self.store.sub(node_dir, key)
        staged = self.store.staging_path(final)  # <node>/.<key>.partial-<id>
        partial_name = os.path.basename(staged)
        if self.store.local_path(staged) is not None:
            out_dir = Path(self.store.local_path(staged))  # the task writes the staged copy itself
        else:  # tasks take local paths: stage locally (`_settle` removed what dead attempts staged), `publish` uploads
            out_dir = self.cache_dir / "staging" / self.dag.name / name / partial_name[1:]
        out_dir.mkdir(parents=True, exist_ok=False)

        note = ""
        if resumed or retried:
            ended = {"failed": "failed", "stopped": f"was stopped by {(previous or {}).get('signal')}"}
            why = (f"the previous attempt (pid {previous.get('pid')} on {previous.get('host')}) "
                   f"{ended.get(previous.get('state'), 'was interrupted')}"
                   if previous else "an earlier attempt left state")
            note = f", {'resuming' if resumed else 'retrying'}: {why}"
            note += f"; work dir {work_dir} has its checkpoints" if has_state else ""
        self.log(f"started {name} (key {key}{', forced rerun' if forced else ''}{note})")
        started, t0 = _now(), time.time()
        record = {"node": name, "key": key, "kind": node.kind, "state": "running", "pid": os.getpid(),
                  "host": socket.gethostname(), "started": started, "forced": forced, "resumed": resumed,
                  "work_dir": work_dir, "partial": partial_name}
        self._write_attempt(name, key, record)

        ctx = NodeContext(name=name, kind=node.kind, config=copy.deepcopy(node.task_config), inputs=inputs,
                          out_dir=out_dir, work_dir=work_dir, resumed=resumed, log=self.log,
                          teacher_fingerprint=self.teacher_fingerprint() if node.role in ("stage", "evaluate") else None)
        publishing = False
        try:
            metrics = _jsonable(kind.run(ctx))
            seconds = time.time() - t0
            marker = {"key": key, "node": name, "kind": node.kind, "version": get_node_kind(node.kind).version,
                      "workflow": self.dag.name, "config": _jsonable(node.config),
                      "inputs": {role: _input_record(self.dag.nodes[p]) for role, p in node.inputs.items()},
                      "started": started, "finished": _now(), "duration_s": round(seconds, 3), "metrics": metrics,
                      "resumed": resumed, "host": socket.gethostname(),
                      "files": sorted(p.name for p in out_dir.iterdir()), "checksums": _output_checksums(out_dir)}
            publishing = True
            self.store.publish(staged, final, json.dumps(marker, indent=2, sort_keys=True), local_dir=out_dir)
        except BaseException as err:
            seconds = time.time() - t0
            stopped_by = received() if isinstance(err, KeyboardInterrupt) else None
            if stopped_by is not None:
                # Recorded first, while the stage's workers may still write checkpoints: every one they
                # finish is named in its work dir's record, and the next run resumes from the latest.
                self._write_attempt(name, key, record | {"state": "stopped", "finished": _now(), "seconds": seconds,
                                                         "signal": signal_name(stopped_by)})
                stop_ray()
                if forced and work_dir is not None:
                    shutil.rmtree(work_dir, ignore_errors=True)
                if not publishing or str(out_dir) != self.store.local_path(staged):
                    shutil.rmtree(out_dir, ignore_errors=True)
                how = "resumes it from its last checkpoint" if kind.uses_work_dir and not forced else "runs it again"
                self.log(f"stopped {name} by {signal_name(stopped_by)} after {seconds:.1f}s; `slimmoe run` {how}")
                raise RunStopped(stopped_by, f"stopped by {signal_name(stopped_by)} during {name}; `slimmoe run` "
                                             f"{how}") from None
            state = "failed" if isinstance(err, Exception) else "interrupted"
            self._write_attempt(name, key, record | {"state": "failed", "finished": _now(), "seconds": seconds,
                                                     "error": f"{type(err).__name__}: {err}",
                                                     "traceback": traceback.format_exc()[-4000:]})
            # Before publishing, the attempt's output is worthless. While publishing, the staged copy in the
            # store may be the only complete one (the old output already set aside or deleted): it is left to
            # `_cleanup`, and only a local staging copy beside it goes.
            if not publishing or str(out_dir) != self.store.local_path(staged):
                shutil.rmtree(out_dir, ignore_errors=True)
            if forced and work_dir is not None:  # no run resumes a rerun's work dir
                shutil.rmtree(work_dir, ignore_errors=True)
            self.log(f"{state} {name} after {seconds:.1f}s: {type(err).__name__}: {err}")
            if isinstance(err, Exception):
                raise NodeFailed(name, err, self.store.display(self._log_path or "")) from err
            raise
        shutil.rmtree(out_dir, ignore_errors=True)  # a local staging copy, now uploaded (moved already otherwise)

        self._write_attempt(name, key, record | {"state": "done", "finished": marker["finished"], "seconds": seconds})
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
        self.log(f"finished {name} in {seconds:.1f}s" + (f": {h}" if (h := headline_of(node.kind, metrics)) else ""))
        return NodeResult(name, "finished", key, self.store.display(self.dag.output_path(name)), seconds, metrics)

    # -- status --------------------------------------------------------------------------------------------
    def status(self, verify: bool = False) -> list[dict]:
        """One row per node; `verify` reads every output file against its checksum (else only the files
        written after their marker are read: see `_first_damage`)."""
        rows = []
        for name, node in self.dag.nodes.items():
            row = {"node": name, "kind": node.kind if not node.is_external else "external", "key": node.key,
                   "path": node.external_path if node.is_external else self.store.display(self.dag.output_path(name)),
                   "state": "missing", "seconds": None, "finished": None, "metric": "", "metrics": None,
                   "error": None, "leftovers": []}
            if node.is_external:
                row["state"] = "done"
                if node.recorded is not None:
                    row["error"] = (f"not read here: the teacher as the run of {node.recorded} recorded it (`slimmoe "
                                    "run` reads its files and reruns what a changed teacher changes)")
                rows.append(row)
                continue
            marker = self.marker(name)
            att = self.attempt(name)
            gone = f"pid {att.get('pid')} on {att.get('host')} is gone" if att else ""
            if marker is not None:
                row.update(state="done", seconds=marker.get("duration_s"), finished=marker.get("finished"),
                           metrics=marker.get("metrics"), metric=headline_of(node.kind, marker.get("metrics")))
                rerun = att and att.get("started", "") > marker.get("finished", "")
                if rerun and att.get("state") == "failed":
                    row["error"] = f"last rerun failed: {att.get('error')}"
                elif attempt_alive(att):
                    row["error"] = "a rerun is in progress"
                elif rerun and att.get("state") == "running":  # killed: it could not record its end
                    row["error"] = f"last rerun was interrupted ({gone}); the output in place is the one before it"
                if damage := self.damage(name, marker, verify):
                    row.update(state="damaged", error="; ".join(filter(None, [damage, row["error"]])))
            elif attempt_alive(att):
                row.update(state="running", seconds=None, finished=None,
                           error=f"pid {att.get('pid')} on {att.get('host')} since {att.get('started')}")
            elif att and att.get("state") == "stopped":
                resumes = "resumes it from its last checkpoint" if att.get("work_dir") and not att.get("forced") \
                    else "runs it again"
                row.update(state="stopped", finished=att.get("finished"),
                           error=f"stopped by signal ({att.get('signal')}) at {att.get('finished')}; `slimmoe run` "
                                 f"{resumes}")
            elif att and att.get("state") in ("running", "failed"):
                err = att.get("error") or f"{'rerun ' if att.get('forced') else ''}interrupted ({gone})"
                if att.get("record_error"):  # kept in the local cache: the store could not take it
                    err += f" (the store's attempt record could not be written: {att['record_error']})"
                row.update(state="failed", error=err, finished=att.get("finished"))
            else:
                stale = self._stale_output(name)
                if stale is not None:
                    path, m = stale
                    row.update(state="stale", path=self.store.display(path), seconds=m.get("duration_s"),
                               finished=m.get("finished"), metrics=m.get("metrics"),
                               metric=headline_of(node.kind, m.get("metrics")),
                               error=f"config changed: output for key {m.get('key')} exists, current key {node.key}")
            row["leftovers"] = [{"path": str(p), "bytes": dir_bytes(p)} for p in self._dead_work_dirs(name)]
            if row["leftovers"]:
                left = ", ".join(f"{x['path']} ({_format_bytes(x['bytes'])})" for x in row["leftovers"])
                row["error"] = "; ".join(filter(None, [row["error"], f"work dir left by an attempt that is gone: {left}; "
                                                                     "the node's next run or `slimmoe status --clean` "
                                                                     "removes it"]))
            rows.append(row)
        return rows

    def _stale_output(self, name: str):
        """The newest complete output of this node under another key, if any."""
        node_dir = self.dag.node_dir(name)
        best = None
        for entry in self.store.listdir(node_dir):
            if entry.startswith((".", "_")) or entry == self.dag.nodes[name].key:
                continue
            path = self.store.sub(node_dir, entry)
            m = self._valid_marker(path, entry)
            if m is not None and (best is None or m.get("finished", "") > best[1].get("finished", "")):
                best = (path, m)
        return best


# ---------------------------------------------------------------------------------------------
# Public functions (the CLI and `slimmoe demo` call these)


def run_workflow(config, *, address: Optional[str] = None, overrides: dict | None = None,
                 log: Callable[[str], None] = print, allow_infeasible: bool = False,
                 targets: Optional[set[str]] = None) -> dict[str, NodeResult]:
    """Validate the workflow (raises WorkflowConfigError before any work, also for a node the memory
    plan says does not fit unless `allow_infeasible`), then run every node whose output is not
    complete (only the nodes in `targets`, when given: `slimmoe search` runs those up to its cache).
    `config` is a YAML path, a dict, a WorkflowConfig or a LoadedWorkflow.
    Returns NodeResult per node; raises NodeFailed when a node fails (completed nodes are kept)."""
    dag = build_dag(config, overrides, check_plan=not allow_infeasible)
    return Driver(dag, log=log, address=address, command="run").run(targets=targets)


def rerun_node(config, node: str, *, downstream: bool = False, address: Optional[str] = None,
               overrides: dict | None = None, log: Callable[[str], None] = print,
               allow_infeasible: bool = False) -> dict[str, NodeResult]:
    """Recompute `node` even if complete (and, with `downstream`, every node after it). Missing
    inputs are computed first. The old output stays in place until the new one is complete."""
    dag = build_dag(config, overrides, check_plan=not allow_infeasible)
    valid = [n for n, nd in dag.nodes.items() if not nd.is_external]
    if node not in valid:
        raise UnknownNodeError(f"unknown node {node!r}; the workflow's nodes are: {', '.join(valid)}")
    force = {node} | (set(dag.descendants(node)) if downstream else set())
    targets = set(dag.ancestors(node)) | force
    return Driver(dag, log=log, address=address, command="rerun").run(force=force, targets=targets)


@contextlib.contextmanager
def _storage_reads(dag: Dag):
    """Status reads the storage without `run`'s writability probe, so storage that does not answer (an
    S3 endpoint down, wrong credentials) fails inside pyarrow with an OSError: say it the way the probe
    does, one StorageError naming the storage."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        where = dag.store.display(dag.store.join(dag.name))
        raise StorageError(f"storage {where!r} cannot be read ({type(err).__name__}: {err}); check the storage "
                           "location, its endpoint and the credentials") from err


def workflow_status(config, overrides: dict | None = None, verify: bool = False) -> list[dict]:
    """One row per node: node, kind, state (done/damaged/missing/running/failed/stale), key, path, times,
    metric, and the work dirs that attempts no longer alive left (`leftovers`). `verify` checksums every
    output file (else only those written after their marker)."""
    dag = build_dag(config, overrides, check_storage=False, teacher_from_record=True)
    with _storage_reads(dag):
        return Driver(dag, log=lambda s: None, command="status").status(verify=verify)


def clean_workflow(config, overrides: dict | None = None,
                   log: Callable[[str], None] = print) -> list[tuple[str, Optional[int]]]:
    """Remove what attempts that are no longer alive left: a killed rerun's work dir, staged copies of
    an unfinished publish. A live attempt's files and a work dir a run resumes from stay. Returns
    (path, bytes) per removed directory (bytes None where the store is a URI)."""
    dag = build_dag(config, overrides, check_storage=False)
    with _storage_reads(dag):
        return Driver(dag, log=log, command="status").clean()


def plan_workflow(config, options=None, overrides: dict | None = None):
    """The memory / compute plan of a workflow (`slimmoe plan`): reads the workflow and the teacher's
    config.json only, so it runs on a laptop for a cluster's workflow. Returns a `workflows.plan.Plan`."""
    from .plan import plan_dag

    dag = build_dag(config, overrides, check_env=False, check_storage=False)
    return plan_dag(dag.workflow, dag.nodes, options)


def format_status(rows: list[dict]) -> str:
    headers = ["node", "state", "key", "time", "metric", "path"]
    table = []
    for r in rows:
        t = f"{r['seconds']:.1f}s" if isinstance(r.get("seconds"), (int, float)) else ""
        table.append([r["node"], r["state"], r["key"], t, r.get("metric") or "", r["path"]])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    notes = [f"  {r['node']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + (["", "notes:"] + notes if notes else []))


__all__ = ["DamagedOutputError", "Driver", "NodeBusyError", "NodeFailed", "NodeResult", "UnknownNodeError",
           "run_workflow", "rerun_node", "workflow_status", "clean_workflow", "format_status", "plan_workflow"]
