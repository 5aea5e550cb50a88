"""From a workflow config to a DAG of keyed nodes.

  [pretrain_teacher as `teacher`] -> tokenize -> teacher_logits -> stage_1 -> ... -> stage_n
  + baselines (one_stage, trim, quantize) + evaluate_<model> for each evaluated model

A node's key hashes its kind, the kind's implementation version, its resolved config and its
inputs' keys; an external teacher's key is its model and tokenizer fingerprints, so a changed
parent changes every descendant's key. Outputs are never hashed (they can be terabytes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from .config import LoadedWorkflow, Problem, WorkflowConfigError, describe_error, load_workflow_collecting
from .fsio import Store, StorageError
from .nodes import NodeKind, get_node_kind

EXTERNAL = "external"


@dataclass
class Node:
    name: str
    role: str  # teacher | pretrain_teacher | tokenize | teacher_logits | stage | evaluate | trim | quantize
    kind: str  # the registered kind that runs it (the role unless the config's `kinds:` maps it)
    section: tuple  # where its settings live in the YAML, for error messages
    fields: dict = field(default_factory=dict)  # its settings from the config
    inputs: dict = field(default_factory=dict)  # input role -> node name
    config: dict = field(default_factory=dict)  # the settings after resources etc. were filled in
    task_config: Any = None  # the validated task config object (or the dict)
    key: str = ""
    facets: dict = field(default_factory=dict)  # external teacher: {"model": fp, "tokenizer": fp}
    external_path: Optional[str] = None

    @property
    def is_external(self) -> bool:
        return self.role == "teacher" and self.kind == EXTERNAL


@dataclass
class Dag:
    workflow: LoadedWorkflow
    nodes: dict  # name -> Node, in topological order
    store: Store

    @property
    def name(self) -> str:
        return self.workflow.config.name

    @property
    def order(self) -> list[str]:
        return list(self.nodes)

    def node_dir(self, name: str) -> str:
        return self.store.join(self.name, name)

    def output_path(self, name: str) -> str:
        node = self.nodes[name]
        if node.is_external:
            return node.external_path
        return self.store.join(self.name, name, node.key)

    def descendants(self, name: str) -> list[str]:
        out: set[str] = {name}
        for n, node in self.nodes.items():  # topological order: parents come first
            if any(i in out for i in node.inputs.values()):
                out.add(n)
        out.discard(name)
        return [n for n in self.nodes if n in out]

    def ancestors(self, name: str) -> list[str]:
        out: set[str] = set()
        todo = list(self.nodes[name].inputs.values())
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(self.nodes[n].inputs.values())
        return [n for n in self.nodes if n in out]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _nodes_from_config(loaded: LoadedWorkflow) -> dict[str, Node]:
    cfg = loaded.config
    kinds = dict(cfg.kinds)
    nodes: dict[str, Node] = {}

    def add(name, role, section, fields, inputs):
        nodes[name] = Node(name, role, kinds.get(role, role), section, dict(fields), dict(inputs))

    if cfg.teacher is not None:
        nodes["teacher"] = Node("teacher", "teacher", EXTERNAL, ("teacher",), external_path=cfg.teacher.path)
    else:
        add("teacher", "pretrain_teacher", ("pretrain_teacher",), cfg.pretrain_teacher or {}, {})
    add("tokenize", "tokenize", ("data",), cfg.data, {"tokenizer": "teacher"})
    add("teacher_logits", "teacher_logits", ("logits",), cfg.logits, {"teacher": "teacher", "tokens": "tokenize"})

    prev, names = "teacher", cfg.stage_names()
    for i, name in enumerate(names):
        add(name, "stage", ("stages", i), cfg.stage_fields(i), {"model": prev, "logits": "teacher_logits"})
        prev = name

    for i, b in enumerate(cfg.baselines):
        own = b.model_dump(exclude_unset=True, by_alias=True)
        for k in ("name", "kind", "from", "distill"):
            own.pop(k, None)
        if b.kind == "one_stage":
            fields = cfg.stage_fields(len(cfg.stages) - 1)
            fields["token_budget"] = sum(s.token_budget for s in cfg.stages)
            fields.update(own)
            add(b.name, "stage", ("baselines", i), fields, {"model": "teacher", "logits": "teacher_logits"})
        else:
            add(b.name, b.kind, ("baselines", i), own, {"model": b.from_ or "teacher", "data": "tokenize"})
        if b.distilled_name():  # the trimmed model gets a stage that distills without a further cut
            add(b.distilled_name(), "stage", ("baselines", i, "distill"), {**b.distill, "distill_only": True},
                {"model": b.name, "logits": "teacher_logits"})

    if cfg.evaluate is not None:
        ev = cfg.evaluate.model_dump(exclude_unset=True)
        models = ev.pop("models", None) or ["teacher", *names, *(n for b in cfg.baselines
                                                                  for n in (b.name, b.distilled_name()) if n)]
        for m in models:
            add(f"evaluate_{m}", "evaluate", ("evaluate",), ev,
                {"model": m, "tokens": "tokenize", "logits": "teacher_logits"})
    return nodes


def _injections(loaded: LoadedWorkflow) -> dict[str, tuple[Any, tuple]]:
    """Workflow-wide values a task config receives when it declares the field: value and YAML loc."""
    cfg = loaded.config
    out = {k: (v, ("resources", k)) for k, v in cfg.resources.model_dump().items()}
    if cfg.teacher is not None:
        out["trust_remote_code"] = (cfg.teacher.trust_remote_code, ("teacher", "trust_remote_code"))
    return out


def _resolve_node_config(loaded: LoadedWorkflow, node: Node, kind: NodeKind, problems: list[Problem]) -> None:
    try:
        cls = kind.resolve_config_class()
    except Exception as err:  # ImportError, or an error inside the task module
        problems.append(loaded.problem(node.section, f"node {node.name!r} (kind {kind.name!r}) cannot load its task "
                                                     f"config: {type(err).__name__}: {err}"))
        return
    resolved = dict(node.fields)
    injected: dict[str, tuple] = {}
    renamed: dict[str, str] = {}
    if cls is not None:
        declared = set(cls.model_fields)
        for alias, target in kind.field_aliases.items():
            if alias in resolved and alias not in declared and target in declared and target not in resolved:
                resolved[target] = resolved.pop(alias)
                renamed[target] = alias
        if "name" in declared and "name" not in resolved:
            resolved["name"] = node.name
        for k, (v, loc) in _injections(loaded).items():
            k = kind.field_aliases.get(k, k)
            if k in declared and k not in resolved:
                resolved[k] = v
                injected[k] = loc
    node.config = resolved
    if cls is None:
        node.task_config = dict(resolved)
        return
    try:
        node.task_config = cls.model_validate(resolved)
    except ValidationError as err:
        for e in err.errors(include_url=False):
            loc = tuple(e.get("loc", ()))
            if loc and loc[0] in renamed:
                loc = (renamed[loc[0]],) + loc[1:]
            where = injected[loc[0]] + loc[1:] if loc and loc[0] in injected else node.section + loc
            msg = describe_error(e, cls)
            problems.append(loaded.problem(where, f"{msg} (node {node.name!r}, {cls.__module__}.{cls.__name__})"))


def _keyed_config(node: Node, kind: NodeKind) -> dict:
    if isinstance(node.task_config, BaseModel):
        # Only what the config sets, normalised by the model (1e-3 and 0.001 hash alike); a new field
        # with a default does not change old keys (a changed meaning bumps the kind's version).
        d = node.task_config.model_dump(mode="json", exclude_unset=True)
    else:
        d = dict(node.config)
    return {k: v for k, v in d.items() if k not in kind.key_ignore and k != "name"}


def _teacher_checks(loaded: LoadedWorkflow, node: Node, problems: list[Problem]) -> Optional[dict]:
    """The external teacher exists and is a model directory; return its config.json (or None)."""
    path = Path(node.external_path)
    loc = ("teacher", "path")
    if not path.is_dir():
        problems.append(loaded.problem(loc, f"teacher directory {path} does not exist; point teacher.path at a "
                                            "Hugging Face model directory"))
        return None
    if not (path / "config.json").is_file():
        problems.append(loaded.problem(loc, f"teacher directory {path} has no config.json; it is not a Hugging Face "
                                            "model directory"))
        return None
    from slimmoe.tasks.fingerprint import model_fingerprint, tokenizer_fingerprint

    try:
        node.facets = {"model": model_fingerprint(path), "tokenizer": tokenizer_fingerprint(path)}
    except (FileNotFoundError, OSError) as err:
        problems.append(loaded.problem(loc, str(err)))
        return None
    try:
        return json.loads((path / "config.json").read_text())
    except ValueError as err:
        problems.append(loaded.problem(loc, f"{path / 'config.json'} is not valid JSON: {err}"))
        return None


def _size_checks(loaded: LoadedWorkflow, teacher_sizes: tuple[Optional[int], Optional[int]], problems: list[Problem]):
    """The first stage (and a one-stage baseline) must shrink the teacher."""
    cfg = loaded.config
    size, kv = teacher_sizes
    targets = [(("stages", 0), cfg.stages[0].expert_intermediate_size, cfg.stages[0].num_key_value_heads)]
    for i, b in enumerate(cfg.baselines):
        if b.kind == "one_stage":
            targets.append((("baselines", i), b.expert_intermediate_size or cfg.stages[-1].expert_intermediate_size,
                            b.num_key_value_heads))
    for loc, t, t_kv in targets:
        if size is not None and t >= size:
            problems.append(loaded.problem(loc + ("expert_intermediate_size",),
                                           f"expert_intermediate_size={t} is not smaller than the teacher's {size}; "
                                           "a stage must shrink the experts"))
        if kv is not None and t_kv is not None and t_kv > kv:
            problems.append(loaded.problem(loc + ("num_key_value_heads",),
                                           f"num_key_value_heads={t_kv} is larger than the teacher's {kv}"))


def _teacher_sizes_from_json(cfg_json: dict, loc, loaded, problems) -> tuple[Optional[int], Optional[int]]:
    from slimmoe.tasks.adapters import get_adapter

    ns = SimpleNamespace(**cfg_json)
    try:
        adapter = get_adapter(ns)
    except ValueError as err:
        problems.append(loaded.problem(loc, str(err)))
        return None, None
    return getattr(ns, adapter.expert_size_key, None), getattr(ns, "num_key_value_heads", None)


def build_dag(source, overrides: dict | None = None, check_env: bool = True, check_storage: bool = True) -> Dag:
    """Validate a workflow completely and return its DAG with every key computed.

    Raises WorkflowConfigError listing every problem (schema, task configs, teacher, storage)
    before any work is done. `check_env=False` skips what needs the teacher and storage (keys of
    nodes after an external teacher are then placeholders): for checking a config on another machine."""
    loaded, problems = load_workflow_collecting(source, overrides)
    cfg = loaded.config
    nodes = _nodes_from_config(loaded)

    for node in nodes.values():
        if node.is_external:
            continue
        try:
            kind = get_node_kind(node.kind)
        except KeyError as err:
            if node.role not in cfg.kinds:  # a mapped kind that is unknown is reported by check_structure
                problems.append(loaded.problem(node.section, str(err.args[0])))
            continue
        _resolve_node_config(loaded, node, kind, problems)

    teacher = nodes["teacher"]
    teacher_sizes: tuple = (None, None)
    if teacher.is_external and check_env:
        cfg_json = _teacher_checks(loaded, teacher, problems)
        if cfg_json is not None:
            teacher_sizes = _teacher_sizes_from_json(cfg_json, ("teacher", "path"), loaded, problems)
    elif not teacher.is_external and teacher.task_config is not None:
        tc = teacher.task_config
        get = tc.get if isinstance(tc, dict) else (lambda k, d=None: getattr(tc, k, d))
        teacher_sizes = (get("expert_size"), get("num_kv_heads"))
    _size_checks(loaded, teacher_sizes, problems)

    try:
        store = Store(cfg.storage)
    except StorageError as err:
        problems.append(loaded.problem(("storage",), str(err)))
        store = None
    if store is not None and check_env and check_storage:
        try:
            store.check_writable(store.join(cfg.name))
        except StorageError as err:
            problems.append(loaded.problem(("storage",), str(err)))
    if problems:
        raise WorkflowConfigError(problems)

    for node in nodes.values():
        if node.is_external:
            node.key = _hash(node.facets) if node.facets else "unchecked"
            continue
        kind = get_node_kind(node.kind)
        inputs = {}
        for role, name in sorted(node.inputs.items()):
            parent = nodes[name]
            inputs[role] = parent.facets.get(role, parent.key)  # tokenize depends on the teacher's tokenizer only
        node.key = _hash({"kind": kind.name, "version": kind.version, "config": _keyed_config(node, kind),
                          "inputs": inputs})
    return Dag(loaded, nodes, store)


def validate_workflow(source, overrides: dict | None = None, check_storage: bool = True) -> Dag:
    """Everything `run` checks before it starts: raises WorkflowConfigError naming each problem."""
    return build_dag(source, overrides, check_env=True, check_storage=check_storage)


__all__ = ["Dag", "Node", "build_dag", "validate_workflow", "WorkflowConfigError"]
