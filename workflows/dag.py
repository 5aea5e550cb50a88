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

from slimmoe.tasks.slimming.config import (ModelSizes, SlimTargetError, StageConfig, check_score_loss, check_targets,
                                           gradual_cuts)

from .config import (WORKFLOW_FIELDS, LoadedWorkflow, Problem, WorkflowConfigError, load_workflow_collecting,
                     problems_from_validation)
from .nodes import NodeKind, get_node_kind
from .storage import MARKER, Store, StorageError
from .teacher_checks import demo_teacher_fit_checks, teacher_fit_checks

EXTERNAL = "external"


@dataclass
class Node:
    name: str
    kind: str  # teacher (external) | pretrain_teacher | tokenize | teacher_logits | stage | evaluate | trim | quantize
    section: tuple  # where its settings live in the YAML, for error messages
    task_config: Any = None  # the task config object the node runs with
    inputs: dict = field(default_factory=dict)  # input role -> node name
    key: str = ""
    facets: dict = field(default_factory=dict)  # external teacher: {"model": fp, "tokenizer": fp} (+ Hub "commit")
    external_path: Optional[str] = None
    hub: Optional[dict] = None  # a Hub teacher: repo_id, revision, the commit it resolved to, its snapshot path
    teacher_config: Optional[dict] = None  # an external teacher's config.json, as validation read it
    # An external teacher taken from the record of the last run (`status` away from the teacher's files):
    # when that run recorded it.
    recorded: Optional[str] = None
    # tokenize: each source of the blend as validation listed it (a DataSource; None where it could not
    # be listed), for the key (a URI source's listing) and the plan (the data's size); None: not listed.
    data: Optional[list] = None

    @property
    def role(self) -> str:
        return "teacher" if self.is_external else self.kind

    @property
    def is_external(self) -> bool:
        return self.kind == EXTERNAL

    @property
    def config(self) -> dict:
        """The task config as JSON-able values, without the fields that only place it in the workflow."""
        if not isinstance(self.task_config, BaseModel):
            return {}
        return {k: v for k, v in self.task_config.model_dump(mode="json").items() if k not in WORKFLOW_FIELDS}


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


SCHEDULE_FIELDS = ("carry_optimizer", "keep_optimizer_state", "early_stop_min_improvement", "early_stop_window_tokens",
                   "early_stop_min_tokens", "early_stop_rows", "cut_steps")


def _one_stage_config(loaded: LoadedWorkflow, i: int, problems: list[Problem]) -> Optional[StageConfig]:
    """A one_stage baseline's stage: the last stage's settings, the stages' summed budget, then the
    baseline's own fields on top."""
    cfg = loaded.config
    b = cfg.baselines[i]
    fields = cfg.stages[-1].written()
    # How the schedule's stages hand over (moments, unspent tokens) and cut in steps is theirs; the
    # baseline is one plain cut unless it sets these itself.
    for key in ("name", *SCHEDULE_FIELDS):
        fields.pop(key, None)
    # A target an earlier stage cut and the last one leaves alone (KV groups halved at stage 2 of
    # three) is still part of the schedule's final model: the baseline must reach it too.
    for key in ("num_key_value_heads", "shared_expert_intermediate_size"):
        earlier = [getattr(s, key) for s in cfg.stages if getattr(s, key) is not None]
        if fields.get(key) is None and earlier:
            fields[key] = earlier[-1]
    fields["token_budget"] = sum(s.token_budget for s in cfg.stages)
    fields.update(b.model_extra or {})
    fields["name"] = b.name
    try:
        return StageConfig.model_validate(fields)
    except ValidationError as err:
        problems.extend(problems_from_validation(err, loaded, ("baselines", i), StageConfig))
        return None


def _distill_config(loaded: LoadedWorkflow, i: int, problems: list[Problem]) -> Optional[StageConfig]:
    b = loaded.config.baselines[i]
    try:
        return StageConfig.model_validate({**b.distill, "distill_only": True, "name": b.distilled_name()})
    except ValidationError as err:
        problems.extend(problems_from_validation(err, loaded, ("baselines", i, "distill"), StageConfig))
        return None


def _stage_config(loaded: LoadedWorkflow, i: int, problems: list[Problem]) -> Optional[StageConfig]:
    """Stage i as the workflow runs it: named, and keeping its AdamW moments when the next stage
    carries them (validated like a written setting, so a stage that cannot keep them is refused here
    rather than after it trained)."""
    stages = loaded.config.stages
    stage, name = stages[i], stages[i].name
    if not (i + 1 < len(stages) and stages[i + 1].carry_optimizer) or stage.keep_optimizer_state:
        return stage
    try:
        return stage.with_changes(keep_optimizer_state=True)
    except ValidationError as err:
        # The rule's own fix ("remove keep_optimizer_state") names a field the user did not write.
        why = "; ".join(e["msg"].removeprefix("Value error, ").removesuffix("; remove keep_optimizer_state")
                        for e in err.errors(include_url=False))
        problems.append(loaded.problem(("stages", i + 1, "carry_optimizer"),
                                       f"carry_optimizer: true starts from the AdamW moments of {name}, which cannot "
                                       f"keep them: {why}; remove carry_optimizer here, or make {name} a ddp stage"))
        return None


def _nodes_from_config(loaded: LoadedWorkflow, problems: list[Problem]) -> dict[str, Node]:
    cfg = loaded.config
    nodes: dict[str, Node] = {}

    def add(name, kind, section, task_config, inputs):
        nodes[name] = Node(name, kind, section, task_config, dict(inputs))

    if cfg.teacher is not None:
        nodes["teacher"] = Node("teacher", EXTERNAL, ("teacher",), external_path=cfg.teacher.path)
    else:
        add("teacher", "pretrain_teacher", ("pretrain_teacher",), cfg.pretrain_teacher, {})
    add("tokenize", "tokenize", ("data",), cfg.data, {"tokenizer": "teacher"})
    add("teacher_logits", "teacher_logits", ("logits",), cfg.logits, {"teacher": "teacher", "tokens": "tokenize"})

    prev, names = "teacher", cfg.stage_names()
    for i, (name, stage) in enumerate(zip(names, cfg.stages)):
        add(name, "stage", ("stages", i), _stage_config(loaded, i, problems), {"model": prev, "logits": "teacher_logits"})
        prev = name

    for i, b in enumerate(cfg.baselines):
        if b.kind == "one_stage":
            add(b.name, "stage", ("baselines", i), _one_stage_config(loaded, i, problems),
                {"model": "teacher", "logits": "teacher_logits"})
            continue
        add(b.name, b.kind, ("baselines", i), b, {"model": b.from_ or "teacher", "data": "tokenize"})
        if b.distilled_name():  # the trimmed model gets a stage that distills without a further cut
            add(b.distilled_name(), "stage", ("baselines", i, "distill"), _distill_config(loaded, i, problems),
                {"model": b.name, "logits": "teacher_logits"})

    if cfg.evaluate is not None:
        models = cfg.evaluate.models or ["teacher", *names, *(n for b in cfg.baselines for n in
                                                              (b.name, b.distilled_name() if b.kind == "trim" else None)
                                                              if n)]
        for m in models:
            add(f"evaluate_{m}", "evaluate", ("evaluate",), cfg.evaluate,
                {"model": m, "tokens": "tokenize", "logits": "teacher_logits"})
        # An early-stopping stage must keep its held-out rows off the rows evaluate reports on: it checks
        # them against its cache when it runs (and validation, against a finished tokenize output).
        for node in nodes.values():
            if node.kind == "stage" and node.task_config is not None \
                    and node.task_config.early_stop_min_improvement is not None:
                node.task_config = node.task_config.with_changes(evaluated_rows=cfg.evaluate.max_rows or "all")
    return nodes


def _keyed_config(node: Node, kind: NodeKind) -> dict:
    # Only what the config sets, normalised by the model (1e-3 and 0.001 hash alike); a new field
    # with a default does not change old keys (a changed meaning bumps the kind's version).
    d = node.task_config.model_dump(mode="json", exclude_unset=True)
    return {k: v for k, v in d.items() if k not in kind.key_ignore and k not in WORKFLOW_FIELDS}


def _teacher_checks(loaded: LoadedWorkflow, node: Node, problems: list[Problem]) -> Optional[dict]:
    """The external teacher exists and is a model directory; return its config.json (or None). A Hub id
    is resolved to a commit and its snapshot downloaded here, once per run: every node (and worker)
    then reads that snapshot's path."""
    from slimmoe.tasks.core.hub import HubModelError, resolve_model

    teacher = loaded.config.teacher
    try:
        source = resolve_model(node.external_path, teacher.revision, trust_remote_code=teacher.trust_remote_code,
                               cache_dir=loaded.config.cache_dir)
    except HubModelError as err:
        problems.append(loaded.problem(("teacher", err.field), str(err)))
        return None
    if source.is_hub:
        node.external_path, node.hub = source.path, source.record()
    path = Path(node.external_path)
    loc = ("teacher", "path")
    if not path.is_dir():
        problems.append(loaded.problem(loc, f"teacher directory {path} does not exist; point teacher.path at a "
                                            "Hugging Face model directory, or at a Hub model id (org/name)"))
        return None
    if not (path / "config.json").is_file():
        problems.append(loaded.problem(loc, f"teacher directory {path} has no config.json; it is not a Hugging Face "
                                            "model directory"))
        return None
    from slimmoe.tasks.core.safetensors_files import BrokenCheckpointError, check_safetensors
    from slimmoe.tasks.core.fingerprint import model_fingerprint, tokenizer_fingerprint

    try:
        # Else a truncated shard is found only when the teacher_logits actors load it, and dies as ActorDiedError.
        check_safetensors(path)
        node.facets = {"model": model_fingerprint(path), "tokenizer": tokenizer_fingerprint(path)}
        if node.hub is not None:
            node.facets["commit"] = node.hub["commit"]
    except (BrokenCheckpointError, OSError) as err:
        problems.append(loaded.problem(loc, str(err)))
        return None
    try:
        node.teacher_config = json.loads((path / "config.json").read_text())
        return node.teacher_config
    except ValueError as err:
        problems.append(loaded.problem(loc, f"{path / 'config.json'} is not valid JSON: {err}"))
        return None


def _input_identity(parent: Node, role: str):
    """What a node's key takes from an input: an external teacher's facet for the role (tokenize depends
    on the teacher's tokenizer only), else the input's key."""
    identity = parent.facets.get(role, parent.key)
    # A Hub commit names the weights exactly, where the model fingerprint samples them: whatever reads
    # them is keyed on it too, so a moved branch never reuses an output. The tokenizer files are hashed
    # whole, so tokenize is re-run only when they change.
    if role == "model" and "commit" in parent.facets:
        identity = {"model": identity, "commit": parent.facets["commit"]}
    return identity


def _data_checks(loaded: LoadedWorkflow, tokenize: Node, problems: list[Problem]) -> None:
    """Every data source is found and readable now, not at tokenize after the teacher and Ray started:
    each is listed once (a URI too) and the first records of its files are read (of a URI's first
    files: `DataSource.checked_files`). The listings stay on the tokenize node for its key and the plan."""
    from slimmoe.tasks.data.sources import DataSourceError, check_source, detect_source, readable_text_files

    data = loaded.config.data
    tokenize.data = []
    for i, part in enumerate(data.blend()):
        source = None
        try:
            source = detect_source(part.path)
            checked, _ = readable_text_files(source, data.skip_unreadable)
            check_source(checked, data.text_field)
        except (DataSourceError, OSError, ValueError) as err:  # ValueError: e.g. a manifest.json that is not JSON
            problems.append(loaded.problem(data.source_loc(i), str(err)))
        tokenize.data.append(source)


def _lm_eval_checks(loaded: LoadedWorkflow, problems: list[Problem]) -> None:
    """lm-eval tasks need lm-eval (an extra) where evaluate runs, the driver's process: refused now
    rather than recorded as unavailable after the stages trained."""
    import importlib.util

    evaluate = loaded.config.evaluate
    if evaluate is None or not evaluate.lm_eval_tasks:
        return
    missing = [m for m in ("lm_eval", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        from slimmoe.tasks.evaluation.config import LM_EVAL_INSTALL_HINT

        problems.append(loaded.problem(("evaluate", "lm_eval_tasks"),
                                       f"lm-eval tasks need {' and '.join(missing)}, which this environment lacks: "
                                       f"{LM_EVAL_INSTALL_HINT}, or remove evaluate.lm_eval_tasks"))
        return
    from slimmoe.tasks.evaluation.lm_eval import LmEvalTaskError, check_include_tasks

    try:  # the include directory and the requested tasks' files in it (indexing it alone is quick)
        check_include_tasks(evaluate)
    except LmEvalTaskError as err:
        problems.append(loaded.problem(("evaluate", err.field), str(err)))


def _teacher_sizes(loaded: LoadedWorkflow, teacher: Node, check_env: bool, problems: list[Problem],
                   recorded: Optional[dict] = None) -> Optional[ModelSizes]:
    """The sizes the first stage cuts from: the external teacher's config.json (read, or `recorded` by
    the last run), or the demo teacher's config."""
    if teacher.is_external:
        if not check_env:
            return None
        if recorded is not None:
            _take_recorded_teacher(teacher, recorded)
            return _sizes_or_problem(loaded, SimpleNamespace(**recorded["config"]), ("teacher", "path"), problems)
        cfg_json = _teacher_checks(loaded, teacher, problems)
        if cfg_json is None:
            return None
        as_config, loc = SimpleNamespace(**cfg_json), ("teacher", "path")
    else:
        pt = teacher.task_config
        as_config, loc = SimpleNamespace(model_type="phimoe", intermediate_size=pt.expert_intermediate_size,
                                         num_local_experts=pt.num_experts, num_experts_per_tok=pt.experts_per_token,
                                         num_attention_heads=pt.num_attention_heads,
                                         num_key_value_heads=pt.num_key_value_heads), ("pretrain_teacher",)
    if teacher.is_external:
        teacher_fit_checks(loaded, Path(teacher.external_path), cfg_json, problems)
    else:
        demo_teacher_fit_checks(loaded, teacher.task_config, problems)
    return _sizes_or_problem(loaded, as_config, loc, problems)


def _sizes_or_problem(loaded: LoadedWorkflow, as_config, loc: tuple, problems: list[Problem]) -> Optional[ModelSizes]:
    try:
        return ModelSizes.of(as_config, "the teacher")
    except ValueError as err:
        problems.append(loaded.problem(loc, str(err)))
        return None


# -- the teacher as the last run recorded it ------------------------------------------------------------

TEACHER_RECORD = "_teacher.json"


def teacher_record(loaded: LoadedWorkflow, teacher: Node, when: str) -> dict:
    """What `status` needs of an external teacher to compute every key without its files: the model as
    the config names it (resolved, and as written: a copy of the config elsewhere resolves a relative
    path elsewhere), and what validation derived from its files."""
    cfg = loaded.config
    return {"path": cfg.teacher.path, "written": _written_teacher_path(loaded), "revision": cfg.teacher.revision,
            "facets": teacher.facets, "hub": teacher.hub, "external_path": teacher.external_path,
            "config": teacher.teacher_config, "recorded": when}


def _written_teacher_path(loaded: LoadedWorkflow) -> Optional[str]:
    teacher = loaded.raw.get("teacher") if isinstance(loaded.raw, dict) else None
    return teacher.get("path") if isinstance(teacher, dict) else None


def _recorded_teacher(loaded: LoadedWorkflow) -> Optional[dict]:
    """The last run's record of the teacher, when the config still names the model it recorded; else
    None (the teacher is then read as `run` reads it). Storage that cannot be read gives None too: the
    status read that follows reports it in one line."""
    cfg = loaded.config
    try:
        store = Store(cfg.storage)
        text = store.read_text(store.join(cfg.name, TEACHER_RECORD))
        record = json.loads(text) if text else None
    except (StorageError, OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record.get("facets") or not isinstance(record.get("config"), dict):
        return None
    same_model = cfg.teacher.path == record.get("path") or _written_teacher_path(loaded) == record.get("written")
    if not same_model or cfg.teacher.revision != record.get("revision"):
        return None
    return record


def _take_recorded_teacher(teacher: Node, record: dict) -> None:
    teacher.facets, teacher.hub = dict(record["facets"]), record.get("hub")
    teacher.external_path = record.get("external_path") or teacher.external_path
    teacher.teacher_config, teacher.recorded = record["config"], record["recorded"]


def _size_checks(loaded: LoadedWorkflow, nodes: dict[str, Node], teacher_sizes: Optional[ModelSizes],
                 problems: list[Problem]) -> None:
    """Every cut against the sizes it inherits: the teacher's for the first stage and a one-stage
    baseline, the previous stage's after that. Without the teacher (check_env=False), stages are
    still checked against each other."""

    def check(node: Node, sizes: Optional[ModelSizes], loc: tuple) -> Optional[ModelSizes]:
        cfg = node.task_config
        if sizes is None or cfg is None:
            return None
        try:
            check_targets(sizes, cfg.targets, dtype=cfg.train_dtype(), tensor_parallel=serve.tensor_parallel,
                          block_fp8=serve.block_fp8, llama_cpp=serve.llama_cpp)
        except SlimTargetError as err:
            problems.append(loaded.problem(loc + (err.field,), str(err)))
            return None
        except ValueError as err:  # the architecture cannot express the cut (e.g. KV pruning with MLA)
            problems.append(loaded.problem(loc, str(err)))
            return None
        if cfg.cut_steps > 1:  # the inner cuts' sizes (whether the stage has the steps for them needs the cache)
            try:
                gradual_cuts(cfg, sizes, total_steps=cfg.cut_steps, dtype=cfg.train_dtype())
            except ValueError as err:
                problems.append(loaded.problem(loc + ("cut_steps",), str(err)))
        return sizes.after(cfg.targets, node.name)

    cfg = loaded.config
    serve = cfg.serve
    for node in nodes.values():
        if node.kind == "stage" and node.task_config is not None:
            try:
                check_score_loss(node.task_config, cuts_the_teacher=node.inputs.get("model") == "teacher")
            except ValueError as err:
                problems.append(loaded.problem(node.section + ("score_loss",), str(err)))
    sizes = teacher_sizes
    for i, name in enumerate(cfg.stage_names()):
        node = nodes[name]
        if sizes is None and i > 0:  # no teacher to start from: the previous stage's targets, with no adapter
            prev = cfg.stages[i - 1]
            sizes = ModelSizes(None, prev.expert_intermediate_size, None, prev.num_key_value_heads, None,
                               cfg.stage_names()[i - 1], num_experts=prev.num_experts)
        sizes = check(node, sizes, ("stages", i))
    for i, b in enumerate(cfg.baselines):
        if b.kind == "one_stage" and nodes[b.name].task_config is not None:
            check(nodes[b.name], teacher_sizes, ("baselines", i))


def build_dag(source, overrides: dict | None = None, check_env: bool = True, check_storage: bool = True,
              check_plan: bool = False, teacher_from_record: bool = False) -> Dag:
    """Validate a workflow completely and return its DAG with every key computed.

    Raises WorkflowConfigError listing every problem (schema, structure, sizes, teacher, storage)
    before any work is done. `check_env=False` skips what needs the teacher and storage (keys of
    nodes after an external teacher are then placeholders): for checking a config on another machine.
    `check_plan` also refuses nodes the memory plan says do not fit (`slimmoe plan`; run and submit).
    `teacher_from_record` takes an external teacher as the last run recorded it in storage (when the
    config still names the same model), without reading its files: `status` from any machine."""
    loaded, problems = load_workflow_collecting(source, overrides)
    cfg = loaded.config
    nodes = _nodes_from_config(loaded, problems)
    for node in nodes.values():
        if not node.is_external:
            try:
                get_node_kind(node.kind)
            except KeyError as err:
                problems.append(loaded.problem(node.section, str(err.args[0])))

    recorded = _recorded_teacher(loaded) if teacher_from_record and check_env and nodes["teacher"].is_external else None
    teacher_sizes = _teacher_sizes(loaded, nodes["teacher"], check_env, problems, recorded)
    _size_checks(loaded, nodes, teacher_sizes, problems)
    data_problems: list[Problem] = []
    if check_env:
        _data_checks(loaded, nodes["tokenize"], data_problems)
        _lm_eval_checks(loaded, problems)

    try:
        store, store_problem = Store(cfg.storage), None
    except StorageError as err:
        store, store_problem = None, loaded.problem(("storage",), str(err))
    rows: dict[str, int] = {}
    row_problems: list[Problem] = []
    if not problems:  # every node is valid: its key, and what the finished data outputs already hold
        _compute_keys(nodes)
        if check_env and store is not None:
            try:
                rows = _output_rows(store, cfg.name, nodes)
            except OSError:
                rows = {}  # storage that does not answer is reported once: by the probe below, or by status's read
            _row_checks(loaded, nodes, rows, row_problems)
    refused = []
    if check_plan and not problems:  # the plan needs a config that is otherwise valid
        from .plan import plan_problems

        refused = plan_problems(loaded, nodes, rows.get("train"))
        problems.extend(refused)
    if store_problem is not None:
        problems.append(store_problem)
    # A refused plan leaves storage untouched (the probe creates the workflow's directory).
    if store is not None and check_env and check_storage and not refused:
        try:
            store.check_writable(store.join(cfg.name))
        except StorageError as err:
            problems.append(loaded.problem(("storage",), str(err)))
    if problems or row_problems:
        raise WorkflowConfigError(problems + row_problems + data_problems)

    # Once tokenized, the text is never read again: a run after the data was moved or deleted goes on.
    if data_problems and not _complete(store, cfg.name, nodes["tokenize"]):
        raise WorkflowConfigError(data_problems)
    return Dag(loaded, nodes, store)


def _compute_keys(nodes: dict[str, Node]) -> None:
    from slimmoe.tasks.data.sources import is_remote

    for node in nodes.values():
        if node.is_external:
            node.key = _hash(node.facets) if node.facets else "unchecked"
            continue
        kind = get_node_kind(node.kind)
        inputs = {}
        for role, name in sorted(node.inputs.items()):
            parent = nodes[name]
            inputs[role] = _input_identity(parent, role)
        identity = {"kind": kind.name, "version": kind.version, "config": _keyed_config(node, kind), "inputs": inputs}
        if node.data is not None and any(is_remote(part.path) for part in node.task_config.blend()):
            # A URI's content can change under the same path: its listing (paths, sizes, mtimes) is part of
            # the key, so a changed corpus is tokenized again. Local data stays keyed on its path (a run
            # after it was moved goes on); a URI that cannot be listed now cannot be matched to an output.
            identity["data"] = [s.fingerprint() if s is not None else None for s in node.data]
        node.key = _hash(identity)


def _output_rows(store: Store, workflow: str, nodes: dict[str, Node]) -> dict[str, int]:
    """The rows finished data outputs hold: {"validation": the tokenize output's validation rows,
    "train": the train logit cache's rows}, each where that node is complete (a fresh workflow has
    neither: its stages check the same against their inputs when they run)."""
    rows = {}
    for name, split, path in (("tokenize", "validation", ("manifest.json",)),
                              ("teacher_logits", "train", ("train", "manifest.json"))):
        node = nodes.get(name)
        if node is None or not _complete(store, workflow, node):
            continue
        try:
            manifest = json.loads(store.read_text(store.join(workflow, name, node.key, *path)) or "{}")
        except ValueError:
            continue
        n = manifest.get("splits", {}).get(split, {}).get("rows") if name == "tokenize" else manifest.get("rows")
        if isinstance(n, int):
            rows[split] = n
    return rows


def _row_checks(loaded: LoadedWorkflow, nodes: dict[str, Node], rows: dict[str, int], problems: list[Problem]) -> None:
    """What each stage refuses of the rows its finished inputs hold, now rather than when it starts: a
    train cache its micro-batches or budget do not fit, held-out rows that overlap evaluate's."""
    from slimmoe.tasks.slimming.adaptive import heldout_overlap
    from slimmoe.tasks.slimming.config import cache_rows_problem

    seq_len = loaded.config.data.seq_len
    for node in nodes.values():
        cfg = node.task_config
        if node.kind != "stage" or cfg is None:
            continue
        if "validation" in rows and cfg.early_stop_min_improvement is not None:
            overlap = heldout_overlap(cfg.early_stop_rows, cfg.evaluated_rows, rows["validation"])
            if overlap is not None:
                problems.append(loaded.problem(node.section + ("early_stop_rows",), overlap))
        if "train" in rows and (problem := cache_rows_problem(cfg, seq_len, rows["train"])) is not None:
            field = "micro_batch" if cfg.batches_per_epoch(rows["train"]) == 0 else "token_budget"
            problems.append(loaded.problem(node.section + (field,), problem))


def _complete(store: Store, workflow: str, node: Node) -> bool:
    text = store.read_text(store.join(workflow, node.name, node.key, MARKER))
    try:
        return text is not None and json.loads(text).get("key") == node.key
    except ValueError:
        return False


__all__ = ["Dag", "Node", "build_dag", "WorkflowConfigError"]
