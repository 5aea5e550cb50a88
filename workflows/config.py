"""The workflow config: one YAML file, validated with messages that name the file, line and field.

The workflow-level sections (name, storage, teacher, resources, the list of stages and baselines)
are checked here. The task sections (data, logits, each stage's training settings, evaluate, ...)
pass through to the task's own config class (a pydantic model in `slimmoe.tasks.*`), which the DAG
builder applies per node; its errors are mapped back to the same YAML lines.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .fsio import is_uri

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Node names the DAG builder uses itself; stages and baselines may not take them.
RESERVED_NAMES = {"teacher", "tokenize", "teacher_logits"}
# Roles a config may map to another registered node kind with `kinds:`.
KIND_ROLES = ("pretrain_teacher", "tokenize", "teacher_logits", "stage", "evaluate", "trim", "quantize")


class Problem:
    """One thing wrong with a config: where (field path and YAML line) and what."""

    def __init__(self, loc: tuple, message: str, line: int | None = None, source: str | None = None):
        self.loc, self.message, self.line, self.source = tuple(loc), message, line, source

    @property
    def field(self) -> str:
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or "(top level)"

    def __str__(self) -> str:
        where = self.source or "config"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.field}: {self.message}"


class WorkflowConfigError(ValueError):
    """A workflow config that cannot run; lists every problem found, each with its line and field."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [str(p) for p in problems]
        head = "invalid workflow config" + (f" ({len(problems)} problems)" if len(problems) > 1 else "")
        super().__init__(head + ":\n  " + "\n  ".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSection(_Strict):
    path: str = Field(description="a local Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    trust_remote_code: bool = False


class ResourcesSection(_Strict):
    """Cluster resources; each value goes to every task config that declares a field of that name."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers per stage")
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    actor_pool_size: int = Field(1, ge=1, description="teacher actors for the logits pass")


class StageEntry(BaseModel):
    """One SlimMoE stage. The targets and budget are checked here (they must shrink stage after stage);
    every other field passes through to `slimmoe.tasks.stage.StageConfig`."""

    model_config = ConfigDict(extra="allow")
    name: Optional[str] = Field(None, pattern=NAME_PATTERN)
    expert_intermediate_size: int = Field(gt=0)
    num_key_value_heads: Optional[int] = Field(None, gt=0)
    token_budget: int = Field(gt=0)


class BaselineEntry(BaseModel):
    """An extra model built beside the stages: `one_stage` (one stage from the teacher straight to
    the final targets with the stages' summed token budget, unless overridden), `trim` or `quantize`
    (applied to the model named by `from`, default the teacher). Other fields go to the task config."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["one_stage", "trim", "quantize"]
    from_: Optional[str] = Field(None, alias="from")
    token_budget: Optional[int] = Field(None, gt=0)
    expert_intermediate_size: Optional[int] = Field(None, gt=0)
    num_key_value_heads: Optional[int] = Field(None, gt=0)
    # trim: then distill the trimmed model (no further cut) as a stage with these settings, e.g.
    # {token_budget: ...}; its node is `<name>_distilled`.
    distill: Optional[dict[str, Any]] = None

    def distilled_name(self) -> Optional[str]:
        return f"{self.name}_distilled" if self.distill is not None else None


class EvaluateSection(BaseModel):
    """`models` lists the models to evaluate (default: the teacher, every stage and baseline);
    every other field goes to `slimmoe.tasks.evaluate.EvaluateConfig`."""

    model_config = ConfigDict(extra="allow")
    models: Optional[list[str]] = None


class WorkflowConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="the workflow's directory under storage")
    storage: str = Field(description="a local directory or a URI such as s3://bucket/prefix")
    cache_dir: Optional[str] = Field(None, description="local cache for inputs downloaded from URI storage")
    plugins: list[str] = Field(default_factory=list, description="modules or .py files that register node kinds")
    kinds: dict[str, str] = Field(default_factory=dict, description="use another registered node kind for a role")
    teacher: Optional[TeacherSection] = None
    pretrain_teacher: Optional[dict[str, Any]] = None
    data: dict[str, Any]
    logits: dict[str, Any] = Field(default_factory=dict)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    stages: list[StageEntry] = Field(min_length=1)
    baselines: list[BaselineEntry] = Field(default_factory=list)
    evaluate: Optional[EvaluateSection] = None

    def stage_names(self) -> list[str]:
        return [s.name or f"stage_{i + 1}" for i, s in enumerate(self.stages)]

    def stage_fields(self, i: int) -> dict[str, Any]:
        """The stage's settings for its task config (without the workflow-only `name`)."""
        d = self.stages[i].model_dump(exclude_unset=True)
        d.pop("name", None)
        return d


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


def yaml_line(root, loc: tuple) -> int | None:
    """The 1-based line of the deepest part of `loc` present in the composed YAML tree."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


@dataclass
class LoadedWorkflow:
    """A schema-checked workflow config plus what is needed to point at its lines."""

    config: WorkflowConfig
    path: Optional[Path] = None
    base_dir: Path = field(default_factory=Path.cwd)
    yaml_root: Any = None
    raw: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "config"

    def problem(self, loc: tuple, message: str) -> Problem:
        return Problem(loc, message, yaml_line(self.yaml_root, loc), self.source)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names of the (sub)model that `loc` points into, to list them for an unknown key."""
    import typing

    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(cur)
            cur = args[0] if args else None
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        f = cur.model_fields.get(part) or next((f for f in cur.model_fields.values() if f.alias == part), None)
        if f is None:
            return None
        cur = f.annotation
        # unwrap Optional[...] / list[...]
        while typing.get_origin(cur) is typing.Union:
            cur = next(a for a in typing.get_args(cur) if a is not type(None))
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return [f.alias or n for n, f in cur.model_fields.items()]
    return None


def describe_error(err: dict, model: type[BaseModel] | None = None) -> str:
    """A pydantic error as a sentence a user can act on."""
    kind, loc = err.get("type"), tuple(err.get("loc", ()))
    if kind == "extra_forbidden":
        known = _fields_at(model, loc[:-1]) if model is not None else None
        msg = f"unknown field {loc[-1]!r}" if loc else "unknown field"
        return msg + (f"; valid fields here: {', '.join(sorted(known))}" if known else "")
    if kind == "missing":
        return "required field is missing"
    msg = err.get("msg", "invalid value")
    if "input" in err and kind not in ("model_type", "dict_type", "list_type"):
        got = err["input"]
        if not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
    return msg


def problems_from_validation(err: ValidationError, loaded: "LoadedWorkflow", prefix: tuple = (),
                             model: type[BaseModel] | None = None) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        loc = prefix + tuple(e.get("loc", ()))
        out.append(loaded.problem(loc, describe_error(e, model)))
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def expand_vars(value: str) -> str:
    """${VAR} from the environment; ${PYTHON_STDLIB} is this Python's standard library directory
    (text every Python installation carries: the embedded demo's corpus)."""
    if "$" not in value:
        return value
    import sysconfig

    env = dict(os.environ)
    env.setdefault("PYTHON_STDLIB", sysconfig.get_paths()["stdlib"])
    import string

    return string.Template(value).safe_substitute(env)


def _resolve_local(value: str, base_dir: Path, must_exist: bool = False) -> str:
    """A relative local path resolved against the config's directory (URIs are left alone)."""
    if not isinstance(value, str):
        return value
    value = expand_vars(value)
    if is_uri(value):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = (base_dir / p).resolve()
    if must_exist and not (candidate.exists() or any(ch in value for ch in "*?[")):
        return value  # not a path after all (e.g. a data set name): leave it to the task
    return str(candidate)


def _resolve_paths(cfg: WorkflowConfig, base_dir: Path) -> None:
    cfg.storage = _resolve_local(cfg.storage, base_dir)
    if cfg.cache_dir:
        cfg.cache_dir = _resolve_local(cfg.cache_dir, base_dir)
    if cfg.teacher is not None:
        cfg.teacher.path = _resolve_local(cfg.teacher.path, base_dir)
    for key in ("source", "data", "path", "source_dir"):
        if isinstance(cfg.data.get(key), str):
            cfg.data[key] = _resolve_local(cfg.data[key], base_dir, must_exist=True)
    if cfg.pretrain_teacher and isinstance(cfg.pretrain_teacher.get("source_dir"), str):
        cfg.pretrain_teacher["source_dir"] = _resolve_local(cfg.pretrain_teacher["source_dir"], base_dir, must_exist=True)


def import_plugin(entry: str, base_dir: Path):
    """Import a plugin: a module name, or a .py file (relative to the config's directory)."""
    if entry.endswith(".py") or "/" in entry or "\\" in entry:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else (base_dir / path)
        path = path.resolve()
        if not path.is_file():
            raise FileNotFoundError(f"plugin file {path} does not exist")
        name = f"slimmoe_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        try:
            # Ray workers cannot import a module loaded from a file path: ship its functions by value.
            from ray import cloudpickle

            cloudpickle.register_pickle_by_value(module)
        except ImportError:
            pass
        return module
    return importlib.import_module(entry)


def _parse_yaml(text: str, source: str):
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise WorkflowConfigError([Problem((), f"not valid YAML: {getattr(err, 'problem', err)}", line, source)]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WorkflowConfigError([Problem((), "the config must be a YAML mapping (key: value lines)", 1, source)])
    return root, raw


def load_workflow(source, overrides: dict | None = None) -> LoadedWorkflow:
    """Read and schema-check a workflow config; import its plugins. Raises WorkflowConfigError.

    `source` is a path to a YAML file, a dict, a WorkflowConfig or a LoadedWorkflow. `overrides`
    are deep-merged into the raw config first (e.g. {"storage": "/tmp/run"}). Relative paths in
    the config are relative to the config file's directory."""
    loaded, problems = load_workflow_collecting(source, overrides)
    if problems:
        raise WorkflowConfigError(problems)
    return loaded


def load_workflow_collecting(source, overrides: dict | None = None) -> tuple[LoadedWorkflow, list[Problem]]:
    """Like load_workflow, but structural problems (everything after the schema) are returned, so a
    caller can add its own checks and report all problems at once. Schema errors still raise."""
    if isinstance(source, LoadedWorkflow) and not overrides:
        return source, check_structure(source)
    path, root, base_dir = None, None, Path.cwd()
    if isinstance(source, LoadedWorkflow):
        raw, path, base_dir, root = source.raw, source.path, source.base_dir, source.yaml_root
    elif isinstance(source, WorkflowConfig):
        raw = source.model_dump(by_alias=True, exclude_unset=True)
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise WorkflowConfigError([Problem((), f"config file {path} does not exist", None, str(path))])
        path = path.resolve()
        base_dir = path.parent
        root, raw = _parse_yaml(path.read_text(), str(path))
    if overrides:
        raw = _deep_merge(raw, overrides)
    loaded = LoadedWorkflow(config=None, path=path, base_dir=base_dir, yaml_root=root, raw=raw)  # type: ignore[arg-type]
    try:
        cfg = WorkflowConfig.model_validate(raw)
    except ValidationError as err:
        raise WorkflowConfigError(problems_from_validation(err, loaded, model=WorkflowConfig)) from None
    _resolve_paths(cfg, base_dir)
    loaded.config = cfg

    problems: list[Problem] = []
    env_plugins = [e.strip() for e in os.environ.get("SLIMMOE_PLUGINS", "").split(",") if e.strip()]
    for loc, entry, where in [(("plugins", i), e, base_dir) for i, e in enumerate(cfg.plugins)] + \
            [((), e, Path.cwd()) for e in env_plugins]:
        try:
            import_plugin(entry, where)
        except Exception as err:
            origin = "" if loc else " (from SLIMMOE_PLUGINS)"
            problems.append(loaded.problem(loc, f"cannot import plugin {entry!r}{origin}: {type(err).__name__}: {err}"))
    problems += check_structure(loaded)
    return loaded, problems


def check_structure(loaded: LoadedWorkflow) -> list[Problem]:
    """Cross-field rules: one teacher, unique names, stage targets that shrink, known references."""
    cfg, P = loaded.config, loaded.problem
    out: list[Problem] = []
    if (cfg.teacher is None) == (cfg.pretrain_teacher is None):
        out.append(P(("teacher",), "set exactly one of `teacher` (a model directory) and `pretrain_teacher`"))

    names = cfg.stage_names()
    seen: dict[str, tuple] = {}
    for i, name in enumerate(names):
        loc = ("stages", i, "name")
        if name in RESERVED_NAMES or name.startswith(("evaluate_", "_")):
            out.append(P(loc, f"stage name {name!r} is reserved; choose another"))
        elif name in seen:
            out.append(P(loc, f"stage name {name!r} is used twice"))
        seen[name] = loc

    prev_size, prev_kv = None, None
    for i, st in enumerate(cfg.stages):
        if prev_size is not None and st.expert_intermediate_size >= prev_size:
            out.append(P(("stages", i, "expert_intermediate_size"),
                         f"expert_intermediate_size={st.expert_intermediate_size} is not smaller than the previous "
                         f"stage's {prev_size}; each stage must shrink the experts further"))
        if st.num_key_value_heads is not None and prev_kv is not None and st.num_key_value_heads > prev_kv:
            out.append(P(("stages", i, "num_key_value_heads"),
                         f"num_key_value_heads={st.num_key_value_heads} is larger than the previous stage's {prev_kv}; "
                         "KV heads can only stay or shrink"))
        prev_size = st.expert_intermediate_size
        prev_kv = st.num_key_value_heads if st.num_key_value_heads is not None else prev_kv

    models = ["teacher", *names]
    for i, b in enumerate(cfg.baselines):
        if b.name in RESERVED_NAMES or b.name in seen or b.name.startswith(("evaluate_", "_")):
            out.append(P(("baselines", i, "name"), f"baseline name {b.name!r} is already used or reserved; choose another"))
        seen[b.name] = ("baselines", i)
        if b.from_ is not None and b.from_ not in models:
            out.append(P(("baselines", i, "from"), f"unknown model {b.from_!r}; choose one of {', '.join(models)}"))
        if b.kind == "one_stage":
            if b.from_ not in (None, "teacher"):
                out.append(P(("baselines", i, "from"), "a one_stage baseline always starts from the teacher"))
        if b.distill is not None and b.kind != "trim":
            out.append(P(("baselines", i, "distill"), f"distill follows a trim baseline only (a {b.kind} baseline "
                                                      "cannot be distilled further); remove it"))
        models.append(b.name)
        if b.distilled_name():
            if b.distilled_name() in seen:
                out.append(P(("baselines", i, "name"), f"{b.distilled_name()!r} (this baseline's distilled node) is "
                                                       "already used; choose another name"))
            seen[b.distilled_name()] = ("baselines", i)
            models.append(b.distilled_name())

    if cfg.evaluate is not None and cfg.evaluate.models is not None:
        for i, m in enumerate(cfg.evaluate.models):
            if m not in models:
                out.append(P(("evaluate", "models", i), f"unknown model {m!r}; choose from {', '.join(models)}"))

    from .nodes import known_kinds

    for role, kind in cfg.kinds.items():
        if role not in KIND_ROLES:
            out.append(P(("kinds", role), f"unknown role {role!r}; roles are {', '.join(KIND_ROLES)}"))
        elif kind not in known_kinds():
            out.append(P(("kinds", role), f"unknown node kind {kind!r}; registered kinds: {', '.join(sorted(known_kinds()))} "
                                          "(a plugin listed under `plugins` can register more)"))
    return out
