"""The workflow config: one YAML file, parsed once into typed sections, with messages that name the
file, line and field.

Every task section is the task's own config class (`data` is a `TokenizeConfig`, each stage a
`StageConfig`, ...), so the YAML is validated by the same models the nodes run with, and the object
built here is the object a node (and a stage's Ray Train workers) receives. Workflow-wide values
(`resources`, the teacher's `trust_remote_code`) are filled into every section that declares a
field of that name and does not set it. Cross-section rules (names, references, sizes that shrink
from stage to stage) are checked in `check_structure` and by the DAG builder.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimmoe.tasks.core.hub import is_hub_id
from slimmoe.tasks.core.tracking import TrackingConfig
from slimmoe.tasks.data.config import TeacherLogitsConfig, TokenizeConfig
from slimmoe.tasks.evaluation.config import EvaluateConfig
from slimmoe.tasks.mcmoe.config import QuantizeConfig
from slimmoe.tasks.pretraining.config import PretrainTeacherConfig
from slimmoe.tasks.slimming.config import StageConfig
from slimmoe.tasks.trimming.config import TrimConfig

from .storage import is_uri

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Node names the DAG builder uses itself; stages and baselines may not take them.
RESERVED_NAMES = {"teacher", "tokenize", "teacher_logits"}
# Fields of a section that place it in the workflow rather than configure its task: never part of a
# node's key, ignored by the task.
WORKFLOW_FIELDS = frozenset({"name", "kind", "from_", "distill", "models"})


def default_stage_name(index: int) -> str:
    return f"stage_{index + 1}"


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
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherSection(_Strict):
    path: str = Field(description="a local Hugging Face model directory (config.json, *.safetensors, tokenizer), "
                                  "or a Hub model id (org/name) when no such directory exists")
    revision: Optional[str] = Field(None, description="a Hub model's branch, tag or commit (default main); the run "
                                                      "resolves it to one commit and keys every node on it")
    trust_remote_code: bool = False


class ResourcesSection(_Strict):
    """Cluster resources; each value goes to every task section that declares a field of that name."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers per stage")
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    actor_pool_size: int = Field(1, ge=1, description="teacher actors for the logits pass")
    # What `slimmoe plan` (and run / submit, before any node starts) checks each GPU node against.
    gpu_memory_gb: Optional[float] = Field(None, gt=0, description="memory of one GPU in GB (1e9 bytes); default: "
                                                                   "this machine's GPU, if it has one")


class ServeSection(_Strict):
    """How the outputs will be served: every cut must split over these tensor-parallel sizes (vLLM, SGLang)."""

    tensor_parallel: list[int] = Field(default_factory=list, description="GPUs per served model, e.g. [1, 2, 4, 8]")
    block_fp8: bool = Field(False, description="served with block-FP8 MoE kernels (128 rows per GPU and expert)")
    llama_cpp: bool = Field(False, description="served with llama.cpp (GGUF): refuse cuts it cannot load")

    @field_validator("tensor_parallel")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        bad = [v for v in value if v < 1]
        if bad:
            raise ValueError(f"tensor_parallel sizes are GPU counts >= 1, got {bad}")
        return sorted(set(value))


class OneStageBaseline(_Strict):
    """One stage from the teacher straight to the last stage's targets, with the stages' summed token
    budget unless set here; any other stage field set here overrides the last stage's."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["one_stage"]


class TrimBaseline(TrimConfig):
    """Expert / layer / block drop applied to the model named by `from` (default the teacher); with
    `distill`, the trimmed model is then distilled without a further cut (node `<name>_distilled`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["trim"]
    from_: Optional[str] = Field(None, alias="from")
    distill: Optional[dict[str, Any]] = None

    def distilled_name(self) -> Optional[str]:
        return f"{self.name}_distilled" if self.distill is not None else None


class QuantizeBaseline(QuantizeConfig):
    """MC-MoE PMQ applied to the model named by `from` (default the teacher)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["quantize"]
    from_: Optional[str] = Field(None, alias="from")
    distill: Optional[dict[str, Any]] = None  # refused by check_structure: only a trim may be distilled

    def distilled_name(self) -> Optional[str]:
        return None


Baseline = Annotated[Union[OneStageBaseline, TrimBaseline, QuantizeBaseline], Field(discriminator="kind")]


class EvaluateSection(EvaluateConfig):
    """`models` lists the models to evaluate (default: the teacher, every stage and baseline)."""

    models: Optional[list[str]] = None


# Task sections and the config class each is parsed into, for the resource fill-in below.
_SECTION_CLASSES = {"pretrain_teacher": PretrainTeacherConfig, "data": TokenizeConfig, "logits": TeacherLogitsConfig,
                    "evaluate": EvaluateSection}
_BASELINE_CLASSES = {"one_stage": StageConfig, "trim": TrimConfig, "quantize": QuantizeConfig}


def _fill_baseline(baseline: Any, fill) -> Any:
    """A baseline's own fields, and its `distill` stage's (a trim baseline distilled afterwards)."""
    if not isinstance(baseline, dict) or baseline.get("kind") not in _BASELINE_CLASSES:
        return baseline
    filled = fill(baseline, _BASELINE_CLASSES[baseline["kind"]])
    if isinstance(filled.get("distill"), dict):
        filled["distill"] = fill(filled["distill"], StageConfig)
    return filled


def workflow_values(raw: dict) -> dict:
    """The workflow-wide values sections receive: the resources, the tracking, and the teacher's
    trust_remote_code."""
    values = ResourcesSection.model_validate(raw.get("resources") or {}).model_dump()
    if isinstance(raw.get("tracking"), dict):
        values["tracking"] = TrackingConfig.model_validate(raw["tracking"])
    teacher = raw.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("trust_remote_code"), bool):
        values["trust_remote_code"] = teacher["trust_remote_code"]
    return values


def fill_workflow_values(section: Any, model: type[BaseModel], values: dict) -> Any:
    """`section` with each workflow-wide value that `model` declares and the section does not set."""
    if not isinstance(section, dict):
        return section
    return {**{k: v for k, v in values.items() if k in model.model_fields}, **section}


class WorkflowConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="the workflow's directory under storage")
    storage: str = Field(description="a local directory or a URI such as s3://bucket/prefix")
    cache_dir: Optional[str] = Field(None, description="local cache for inputs downloaded from URI storage")
    teacher: Optional[TeacherSection] = None
    pretrain_teacher: Optional[PretrainTeacherConfig] = None
    data: TokenizeConfig
    logits: TeacherLogitsConfig = Field(default_factory=TeacherLogitsConfig)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    stages: list[StageConfig] = Field(min_length=1)
    baselines: list[Baseline] = Field(default_factory=list)
    evaluate: Optional[EvaluateSection] = None
    serve: ServeSection = Field(default_factory=ServeSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _fill_workflow_values(cls, raw: Any) -> Any:
        """Resources and the teacher's trust_remote_code go into each section declaring the field."""
        if not isinstance(raw, dict):
            return raw
        try:
            values = workflow_values(raw)
        except ValidationError:
            return raw  # reported at resources.*, not once per section that would have received it
        raw = dict(raw)

        def fill(section, model: type[BaseModel]):
            return fill_workflow_values(section, model, values)

        for key, model in _SECTION_CLASSES.items():
            if key in raw or key == "logits":
                raw[key] = fill(raw.get(key, {}), model)
        if isinstance(raw.get("stages"), list):
            # A stage's node name (stage_<i> unless it names itself) is part of what the stage runs with.
            raw["stages"] = [fill({"name": default_stage_name(i), **s} if isinstance(s, dict) else s, StageConfig)
                             for i, s in enumerate(raw["stages"])]
        if isinstance(raw.get("baselines"), list):
            raw["baselines"] = [_fill_baseline(b, fill) for b in raw["baselines"]]
        return raw

    def stage_names(self) -> list[str]:
        return [s.name or default_stage_name(i) for i, s in enumerate(self.stages)]


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


def _close_to_missing(errors: list[dict]) -> dict[tuple, tuple]:
    """Pairs of an unknown key and a missing required field beside it whose names are close (a typo):
    the location of each, mapped to the location of the other."""
    unknown: dict[tuple, list[str]] = {}
    missing: dict[tuple, list[str]] = {}
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if loc and isinstance(loc[-1], str):
            group = unknown if e.get("type") == "extra_forbidden" else missing if e.get("type") == "missing" else None
            if group is not None:
                group.setdefault(loc[:-1], []).append(loc[-1])
    pairs: dict[tuple, tuple] = {}
    for parent, keys in unknown.items():
        left = list(missing.get(parent, ()))
        for key in keys:
            match = difflib.get_close_matches(key, left, n=1, cutoff=0.75)
            if match:
                left.remove(match[0])
                pairs[parent + (key,)] = parent + (match[0],)
                pairs[parent + (match[0],)] = parent + (key,)
    return pairs


def problems_from_validation(err: ValidationError, loaded: "LoadedWorkflow", prefix: tuple = (),
                             model: type[BaseModel] | None = None) -> list[Problem]:
    errors = err.errors(include_url=False)
    typos = _close_to_missing(errors)
    out = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        message = describe_error(e, model)
        other = typos.get(loc)
        if other is not None and e.get("type") == "extra_forbidden":
            # The list of every valid field buries the one the user meant.
            message = f"unknown field {loc[-1]!r}; did you mean {other[-1]}?"
        elif other is not None:
            line = yaml_line(loaded.yaml_root, prefix + _user_loc(other))
            message += f"; the unknown field {other[-1]!r}{f' (line {line})' if line else ''} looks like a typo of it"
        out.append(loaded.problem(prefix + _user_loc(loc), message))
    return out


def _user_loc(loc: tuple) -> tuple:
    """A pydantic location as a path in the user's YAML. A baseline is a union tagged by its `kind`;
    pydantic puts the tag into the location (baselines.1.trim.n)."""
    if len(loc) > 2 and loc[0] == "baselines" and isinstance(loc[1], int) and loc[2] in _BASELINE_CLASSES:
        return loc[:2] + loc[3:]
    return loc


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
    import string
    import sysconfig

    env = dict(os.environ)
    env.setdefault("PYTHON_STDLIB", sysconfig.get_paths()["stdlib"])
    return string.Template(value).safe_substitute(env)


def _resolve_local(value: str, base_dir: Path, must_exist: bool = False, hub_id: bool = False) -> str:
    """A relative local path resolved against the config's directory (URIs are left alone; with `hub_id`,
    so is a Hub model id that is not a directory there)."""
    if not isinstance(value, str):
        return value
    value = expand_vars(value)
    if is_uri(value):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = (base_dir / p).resolve()
    if hub_id and not candidate.exists() and is_hub_id(value):
        return value  # resolved to a snapshot by tasks/core/hub.resolve_model
    if must_exist and not (candidate.exists() or any(ch in value for ch in "*?[")):
        return value  # not a path after all (e.g. a data set name): leave it to the task
    return str(candidate)


# Local paths in the raw config, resolved against the config file's directory before validation
# (True: may also be a data set name, "hub": may also be a Hub model id).
_PATH_FIELDS = ((("storage",), False), (("cache_dir",), False), (("teacher", "path"), "hub"),
                (("data", "source"), True), (("pretrain_teacher", "source_dir"), True),
                (("evaluate", "lm_eval_include_path"), False))


def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    raw = copy.deepcopy(raw)
    for loc, may_be_a_name in _PATH_FIELDS:
        parent = raw
        for part in loc[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(loc[-1]), str):
            parent[loc[-1]] = _resolve_local(parent[loc[-1]], base_dir, must_exist=may_be_a_name is True,
                                             hub_id=may_be_a_name == "hub")
    data = raw.get("data")
    blend = data.get("sources") if isinstance(data, dict) else None
    for part in blend if isinstance(blend, list) else ():  # data.sources[i].path, like data.source
        if isinstance(part, dict) and isinstance(part.get("path"), str):
            part["path"] = _resolve_local(part["path"], base_dir, must_exist=True)
    return raw


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
    """Read and validate a workflow config. Raises WorkflowConfigError listing every problem.

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
        loaded.config = WorkflowConfig.model_validate(_resolve_paths(raw, base_dir))
    except ValidationError as err:
        raise WorkflowConfigError(problems_from_validation(err, loaded, model=WorkflowConfig)) from None
    return loaded, check_structure(loaded)


def check_structure(loaded: LoadedWorkflow) -> list[Problem]:
    """Cross-field rules: one teacher, unique names, known references. (Whether each stage's targets
    fit the model it cuts is checked by the DAG builder, against the sizes the stage inherits.)"""
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
        if i == 0 and cfg.stages[i].carry_optimizer:
            out.append(P(("stages", i, "carry_optimizer"), "the first stage cuts the teacher, which has no optimizer "
                                                           "state to carry; remove carry_optimizer here (later stages "
                                                           "may set it)"))
        if cfg.stages[i].distill_only:
            out.append(P(("stages", i, "distill_only"), "a stage of the schedule must cut; distill_only belongs "
                                                        "to a trim baseline's `distill` section"))

    models = ["teacher", *names]
    for i, b in enumerate(cfg.baselines):
        if b.name in RESERVED_NAMES or b.name in seen or b.name.startswith(("evaluate_", "_")):
            out.append(P(("baselines", i, "name"), f"baseline name {b.name!r} is already used or reserved; choose another"))
        seen[b.name] = ("baselines", i)
        origin = getattr(b, "from_", None)
        if b.kind == "one_stage":
            if (b.model_extra or {}).get("from") not in (None, "teacher"):
                out.append(P(("baselines", i, "from"), "a one_stage baseline always starts from the teacher"))
            if (b.model_extra or {}).get("carry_optimizer"):
                out.append(P(("baselines", i, "carry_optimizer"), "a one_stage baseline cuts the teacher, which has no "
                                                                  "optimizer state to carry; remove carry_optimizer"))
        elif origin is not None and origin not in models:
            out.append(P(("baselines", i, "from"), f"unknown model {origin!r}; choose one of {', '.join(models)}"))
        if getattr(b, "distill", None) is not None and b.kind != "trim":
            out.append(P(("baselines", i, "distill"), f"distill follows a trim baseline only (a {b.kind} baseline "
                                                      "cannot be distilled further); remove it"))
        models.append(b.name)
        distilled = b.distilled_name() if b.kind == "trim" else None
        if distilled:
            if distilled in seen:
                out.append(P(("baselines", i, "name"), f"{distilled!r} (this baseline's distilled node) is "
                                                       "already used; choose another name"))
            seen[distilled] = ("baselines", i)
            models.append(distilled)

    if cfg.evaluate is not None and cfg.evaluate.models is not None:
        for i, m in enumerate(cfg.evaluate.models):
            if m not in models:
                out.append(P(("evaluate", "models", i), f"unknown model {m!r}; choose from {', '.join(models)}"))
    return out
