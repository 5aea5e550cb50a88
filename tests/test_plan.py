"""`slimmoe plan` and the same check in run / submit: the shipped paper-scale workflows fit 8 x 8
A100-80GB, parameter counts are the meta-device counts, an infeasible teacher pass is refused with
its fix before any node starts, and --allow-infeasible lets it through."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from standins import write_weights

CONFIGS = Path(__file__).resolve().parents[1] / "workflows" / "configs"
GB = 10**9
# Phi-3.5-MoE-instruct's config.json values that shape the model.
PHI_35_MOE = dict(
    model_type="phimoe", vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
    attention_bias=True, lm_head_bias=True, tie_word_embeddings=False, max_position_embeddings=131072,
    torch_dtype="bfloat16",
)


def phi_teacher(path: Path, weights: bool = False) -> Path:
    """Phi-3.5-MoE as far as the plan reads it: config.json (and, for run's checks, a stand-in shard)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(PHI_35_MOE))
    if weights:
        write_weights(path / "model.safetensors")
        (path / "tokenizer.json").write_text('{"stand-in": true}')
    return path


def meta_counts(config) -> dict:
    from slimmoe.tasks.core.params import count_parameters_from_config

    return count_parameters_from_config(config)


def phi_config():
    import transformers

    return transformers.PhimoeConfig(**{k: v for k, v in PHI_35_MOE.items() if k not in ("model_type", "torch_dtype")})


def plan_of(name: str, teacher: Path, **changes):
    from slimmoe.workflows.driver import plan_workflow
    from slimmoe.workflows.plan import PlanOptions

    overrides = {"teacher": {"path": str(teacher)}, **changes}
    return plan_workflow(CONFIGS / f"{name}.yaml", PlanOptions(gpu="a100"), overrides=overrides)


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory):
    return phi_teacher(tmp_path_factory.mktemp("phi") / "Phi-3.5-MoE-instruct")


def test_phi_mini_plans_feasible_with_the_meta_device_counts(phi_dir):
    from slimmoe.tasks.slimming.config import SlimTargets
    from slimmoe.tasks.slimming.surgery import slimmed_config

    plan = plan_of("phi-mini-moe", phi_dir)
    assert plan.feasible, plan.format()
    assert plan.gpu_memory_bytes == 80 * GB and plan.cluster_gpus == 64
    nodes = {n.name: n for n in plan.nodes}
    teacher = meta_counts(phi_config())
    assert nodes["teacher_logits"].params_before == {"total": teacher["total"], "active": teacher["active"]}
    assert round(teacher["total"] / 1e9, 2) == 41.87
    expected, before = {}, teacher
    config = phi_config()
    for stage, size in (("stage_1", 3200), ("stage_2", 1600), ("stage_3", 960)):
        config = slimmed_config(config, SlimTargets(size))
        after = meta_counts(config)
        assert nodes[stage].params_before["total"] == before["total"]
        assert nodes[stage].params_after == {"total": after["total"], "active": after["active"]}
        expected[stage], before = round(after["total"] / 1e9, 2), after
    assert expected == {"stage_1": 21.74, "stage_2": 11.67, "stage_3": 7.65}
    # Every GPU node was checked against 80 GB and fits; the teacher pass is split over 2 GPUs.
    for node in plan.nodes:
        if node.device == "gpu":
            assert node.fits is True and node.memory.total <= 80 * GB, (node.name, node.memory.as_dict())
    tl = nodes["teacher_logits"]
    assert tl.devices == 64 and tl.memory.weights == -(-teacher["total"] * 2 // 2)
    totals = plan.totals()
    assert totals["gpu_hours"] > 0 and totals["cache_bytes"] == tl.cache_bytes > 0
    assert plan.as_dict()["verdict"].startswith("feasible")


@pytest.mark.parametrize("name", ["phi-tiny-moe", "qwen3-moe"])
def test_the_other_shipped_workflows_plan_feasible(name, tmp_path, phi_dir):
    teacher = phi_dir
    if name == "qwen3-moe":
        import transformers

        teacher = tmp_path / "Qwen3-30B-A3B"
        teacher.mkdir()
        transformers.Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            max_position_embeddings=40960, tie_word_embeddings=False).to_json_file(teacher / "config.json")
    plan = plan_of(name, teacher)
    assert plan.feasible, plan.format()
    assert all(n.fits for n in plan.nodes if n.device == "gpu")
    if name == "phi-tiny-moe":
        tiny = {n.name: n for n in plan.nodes}["stage_4"].params_after["total"]
        assert round(tiny / 1e9, 2) == 3.76


def test_one_gpu_per_teacher_actor_on_80_gb_is_refused_with_the_fix(phi_dir):
    plan = plan_of("phi-mini-moe", phi_dir, logits={"gpus_per_actor": 1}, resources={"actor_pool_size": 64})
    assert not plan.feasible
    bad = {n.name: n for n in plan.nodes if n.fits is False}
    assert list(bad) == ["teacher_logits"]
    node = bad["teacher_logits"]
    assert node.memory.weights == meta_counts(phi_config())["total"] * 2 > 80 * GB
    assert "83.7 GB in bf16" in node.fix and "set logits.gpus_per_actor: 2 (or auto)" in node.fix
    text = plan.format()
    assert "infeasible" in text and "gpus_per_actor: 2" in text


def test_gpus_per_actor_auto_and_a_pool_larger_than_the_cluster(phi_dir):
    from slimmoe.tasks.planning.memory import teacher_actor_gpus

    auto = plan_of("phi-mini-moe", phi_dir, logits={"gpus_per_actor": "auto"})
    assert auto.feasible and {n.name: n for n in auto.nodes}["teacher_logits"].devices == 64
    assert teacher_actor_gpus(phi_config(), 8, 4096, 8, 80 * GB) == 2
    assert teacher_actor_gpus(phi_config(), 8, 4096, 8, 141 * GB) == 1
    with pytest.raises(ValueError, match=r"41.87B parameters are 83.7 GB"):
        teacher_actor_gpus(phi_config(), 8, 4096, 8, 40 * GB, max_gpus=2)
    crowded = plan_of("phi-mini-moe", phi_dir, resources={"actor_pool_size": 64})
    assert not crowded.feasible
    assert "set resources.actor_pool_size: 32" in {n.name: n for n in crowded.nodes}["teacher_logits"].fix


def _runnable_phi(tmp_path: Path, **changes) -> tuple[Path, Path]:
    """phi-mini-moe with local storage, data and teacher (config.json and a stand-in shard): every check
    of `run` passes except the plan's."""
    teacher = phi_teacher(tmp_path / "teacher", weights=True)
    (tmp_path / "data.txt").write_text("hello\n")
    raw = yaml.safe_load((CONFIGS / "phi-mini-moe.yaml").read_text())
    raw.update(storage=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    raw["teacher"]["path"] = str(teacher)
    raw["data"]["source"] = str(tmp_path / "data.txt")
    for section, values in changes.items():
        raw[section].update(values)
    path = tmp_path / "phi.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, tmp_path / "store"


INFEASIBLE = {"logits": {"gpus_per_actor": 1}, "resources": {"actor_pool_size": 64}}


def test_run_refuses_an_infeasible_workflow_before_any_node_and_writes_nothing(tmp_path, monkeypatch):
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.driver import Driver, run_workflow

    def no_node(*args, **kwargs):
        raise AssertionError("a node started")

    monkeypatch.setattr(Driver, "_execute", no_node)
    config, store = _runnable_phi(tmp_path, **INFEASIBLE)
    with pytest.raises(WorkflowConfigError) as err:
        run_workflow(config, log=lambda line: None)
    message = str(err.value)
    assert "teacher_logits" in message and "set logits.gpus_per_actor: 2 (or auto)" in message
    assert f"{config}:" in message and "--allow-infeasible" in message  # at its YAML line, with the override
    assert not store.exists()


def test_allow_infeasible_lets_validation_pass(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app
    from slimmoe.workflows.dag import build_dag
    from slimmoe.workflows.driver import Driver

    config, _ = _runnable_phi(tmp_path, **INFEASIBLE)
    dag = build_dag(config, check_plan=False)  # what `run --allow-infeasible` validates
    assert "teacher_logits" in dag.nodes
    started = []
    monkeypatch.setattr(Driver, "run", lambda self, **kw: started.append(self.dag.name) or {})
    refused = CliRunner().invoke(app, ["run", str(config)])
    assert refused.exit_code == 2 and "gpus_per_actor: 2" in refused.output and not started
    allowed = CliRunner().invoke(app, ["run", str(config), "--allow-infeasible"])
    assert allowed.exit_code == 0, allowed.output
    assert started == ["phi-mini-moe"]


def test_submit_refuses_before_uploading_unless_allowed(tmp_path):
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.submit import prepare_submission

    config, _ = _runnable_phi(tmp_path, **INFEASIBLE)
    with pytest.raises(WorkflowConfigError, match=r"gpus_per_actor: 2"):
        prepare_submission(config, "http://10.1.2.3:8265")
    sub = prepare_submission(config, "http://10.1.2.3:8265", allow_infeasible=True)
    try:
        assert sub.entrypoint[:3] == ["slimmoe", "run", "--allow-infeasible"]
    finally:
        sub.cleanup()


def test_plan_cli_json_parses_and_a_gpu_workflow_needs_its_gpu_memory(tmp_path, phi_dir, monkeypatch):
    from typer.testing import CliRunner

    from slimmoe.workflows import plan as plan_module
    from slimmoe.workflows.cli import app

    raw = yaml.safe_load((CONFIGS / "phi-mini-moe.yaml").read_text())
    raw["teacher"]["path"] = str(phi_dir)
    path = tmp_path / "phi.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = CliRunner().invoke(app, ["plan", str(path), "--json", "--gpu", "h100", "--mfu", "0.5"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["feasible"] is True and doc["peak_tflops"] == 989.0 and doc["mfu"] == 0.5
    assert {n["name"] for n in doc["nodes"]} >= {"teacher_logits", "stage_1", "stage_2", "stage_3"}
    assert doc["totals"]["gpu_hours"] > 0
    assert doc["links"] == {"intra_node_gb_per_s": 450.0, "inter_node_gb_per_s": 400.0}  # p5
    stage = {n["name"]: n for n in doc["nodes"]}["stage_3"]
    assert stage["comm_bytes_per"] == "rank and optimizer step" and stage["comm_bytes_inter"] > 0
    assert 0 < stage["effective_mfu"] <= 0.5 and set(stage["comm"]) == {"score", "train"}  # p5 hides it all

    # The links are overridable: a slower network leaves the bytes as they are and costs time.
    slow = CliRunner().invoke(app, ["plan", str(path), "--json", "--gpu", "h100", "--mfu", "0.5",
                                    "--inter-node-gb-per-s", "12.5"])
    assert slow.exit_code == 0, slow.output
    slow_stage = {n["name"]: n for n in json.loads(slow.stdout)["nodes"]}["stage_3"]
    assert slow_stage["comm_bytes_inter"] == stage["comm_bytes_inter"]
    assert slow_stage["exposed_comm_seconds"] > stage["exposed_comm_seconds"]
    assert slow_stage["effective_mfu"] < stage["effective_mfu"]

    del raw["resources"]["gpu_memory_gb"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setattr(plan_module, "local_gpu_memory_bytes", lambda: None)  # this machine: no GPU
    missing = CliRunner().invoke(app, ["plan", str(path)])
    assert missing.exit_code == 2 and "--gpu-memory-gb" in missing.output
    given = CliRunner().invoke(app, ["plan", str(path), "--gpu-memory-gb", "141"])
    assert given.exit_code == 0 and "feasible" in given.output


def test_the_demo_plans_feasible_on_this_machine():
    from slimmoe.workflows.driver import plan_workflow

    plan = plan_workflow(CONFIGS / "demo.yaml")
    assert plan.feasible and not plan.use_gpu
    assert plan.cpu_memory_bytes and all(n.fits for n in plan.nodes if n.memory is not None)


def test_the_rayjob_embedded_workflow_plans_feasible(tmp_path, phi_dir):
    from slimmoe.workflows.driver import plan_workflow
    from slimmoe.workflows.plan import PlanOptions

    docs = [d for d in yaml.safe_load_all((CONFIGS.parents[1] / "cluster" / "rayjob-a100.yaml").read_text()) if d]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    path = tmp_path / "workflow.yaml"
    path.write_text(config_map["data"]["workflow.yaml"])
    plan = plan_workflow(path, PlanOptions(gpu="a100"), overrides={"teacher": {"path": str(phi_dir)}})
    assert plan.feasible, plan.format()


@pytest.mark.parametrize("use_gpu", [True, False])
@pytest.mark.parametrize("gpus_per_actor", [1, "auto"])
def test_the_plan_and_the_nodes_resolve_the_same_settings(phi_dir, monkeypatch, use_gpu, gpus_per_actor):
    """Every setting the plan reports is what the node derives from the same facts: the plan passes the
    workflow's resources, the node reads the cluster; both call the config's own methods."""
    import slimmoe.tasks.nodes.teacher_logits as teacher_node
    from slimmoe.tasks.core.kernels import GPU_CAPABILITY
    from slimmoe.tasks.data.config import PassFacts
    from slimmoe.workflows.dag import build_dag

    changes = {"resources": {"use_gpu": use_gpu, "num_workers": 8, "gpu_memory_gb": 80},
               "logits": {"gpus_per_actor": gpus_per_actor}}
    plan = plan_of("phi-mini-moe", phi_dir, **changes)
    planned = {n.name: n.settings for n in plan.nodes}
    dag = build_dag(CONFIGS / "phi-mini-moe.yaml", overrides={"teacher": {"path": str(phi_dir)}, **changes},
                    check_env=False, check_storage=False)

    # The teacher pass as the node resolves it on a cluster with these facts (an actor adds its GPU's
    # capability, which the plan takes from --gpu a100).
    a100 = GPU_CAPABILITY["a100"] if use_gpu else None
    facts = PassFacts(cluster_has_gpus=use_gpu, gpu_memory_bytes=80 * GB if use_gpu else None, gpus_per_node=8,
                      gpu_capability=a100)
    monkeypatch.setattr(teacher_node, "pass_facts", lambda cfg: facts)
    monkeypatch.setattr(teacher_node, "_biggest_node_gpus", lambda: 8)
    node = teacher_node.resolve_teacher_pass(dag.nodes["teacher_logits"].task_config, phi_config(), 4096)
    assert planned["teacher_logits"] == asdict(node)
    assert node.experts_kernel == ("eager" if use_gpu else "grouped_mm")  # sm80 has no native grouped GEMM
    assert node.device == ("cuda" if use_gpu else "cpu")
    assert node.gpus_per_actor == (0 if not use_gpu else 2 if gpus_per_actor == "auto" else 1)

    for name, n in dag.nodes.items():
        cfg = n.task_config
        if n.kind == "stage":
            assert planned[name] == {"strategy": cfg.resolved_strategy(), "dtype": cfg.train_dtype(),
                                     "world": cfg.world(), "shard_group": cfg.shard_group(8),
                                     "experts_kernel": cfg.experts_kernel(use_gpu, a100)}
            assert planned[name]["dtype"] == ("bfloat16" if use_gpu else "float32")
        elif n.kind == "evaluate":  # the node: cfg.run_device(torch.cuda.is_available()) on its own process
            device = cfg.run_device(use_gpu)
            assert planned[name] == {"device": device, "dtype": cfg.weights_dtype(device)}
            assert planned[name]["dtype"] == ("bfloat16" if use_gpu else "float32")


def test_a_fix_is_proposed_only_when_the_stage_accepts_it(phi_dir):
    """A ddp stage that keeps its optimizer moments for the next one cannot become fsdp: the plan must
    not propose it."""
    from slimmoe.tasks.slimming.config import StageConfig
    from slimmoe.tasks.planning.memory import model_shape
    from slimmoe.tasks.slimming.surgery import slimmed_config
    from slimmoe.workflows.plan import _stage_fix

    shape_in = model_shape(phi_config())
    shape_out = model_shape(slimmed_config(phi_config(), StageConfig(expert_intermediate_size=3200,
                                                                     token_budget=10).targets))
    fixes = {}
    for keep in (False, True):
        cfg = StageConfig(expert_intermediate_size=3200, token_budget=10, use_gpu=True, num_workers=64,
                          strategy="ddp", micro_batch=1, keep_optimizer_state=keep)
        fixes[keep] = _stage_fix(shape_in, shape_out, cfg, 4096, 8, True, 80 * GB)
    # fsdp shards over the 8 GPUs of a node by default (HSDP): 1/8 of the 21.7B student per GPU fits
    # beside the chunked loss's logits.
    assert fixes[False] == "strategy: fsdp"
    assert fixes[True] is None or "fsdp" not in fixes[True]


# ---------------------------------------------------------------------------------------------
# Communication


def _phi_with_stages(tmp_path: Path, teacher: Path, **stage_changes) -> Path:
    """phi-mini-moe with the teacher here and `stage_changes` applied to every stage."""
    raw = yaml.safe_load((CONFIGS / "phi-mini-moe.yaml").read_text())
    raw["teacher"]["path"] = str(teacher)
    for stage in raw["stages"]:
        stage.update(stage_changes)
    path = tmp_path / "phi.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_phi_mini_plan_reports_communication_per_stage(phi_dir):
    plan = plan_of("phi-mini-moe", phi_dir)
    assert plan.feasible and plan.links is not None and (plan.links.intra_gb_s, plan.links.inter_gb_s) == (300, 50)
    nodes = {n.name: n for n in plan.nodes}
    for name in ("stage_1", "stage_2", "stage_3"):
        node = nodes[name]
        assert node.settings["shard_group"] == 8  # the default: HSDP within each node of 8 GPUs
        score, train = node.comm["score"], node.comm["train"]
        # Scoring stays inside the shard group (NVLink only); training adds one all-reduce between nodes per step.
        assert score.intra_bytes > 0 and score.inter_bytes == 0 and score.unit == "calibration batch"
        assert train.intra_bytes > 0 and train.inter_bytes > 0 and train.unit == "optimizer step"
        assert train.node_inter_bytes == 8 * train.inter_bytes
        assert not node.bound_by_communication and node.comm_fix is None
        assert 0 < node.effective_mfu < plan.mfu
        as_json = node.as_dict()
        assert as_json["comm_bytes_intra"] == train.intra_bytes and as_json["comm_bytes_inter"] == train.inter_bytes
        assert as_json["comm_seconds"] > 0 and as_json["effective_mfu"] == node.effective_mfu
    # stage_1 trains its 21.74B student at 8 x 2 bytes of gathers and 4 of reduce-scatter per parameter
    # and micro-batch, 16 micro-batches a step, inside a node of 8.
    student = nodes["stage_1"].params_after["total"]
    train = nodes["stage_1"].comm["train"]
    assert train.intra_bytes == pytest.approx(16 * 8 * student * 7 / 8)
    assert train.inter_bytes == pytest.approx(2 * 4 * student / 8 * 7 / 8)  # the all-reduce of 1/8, 8 replicas
    text = plan.format()
    assert "communication: bytes per rank and unit" in text and "effective MFU" in text
    assert "bound by communication (" not in text
    totals = plan.totals()
    assert totals["effective_mfu"] < plan.mfu and not totals["nodes_bound_by_communication"]


def test_full_sharding_over_eight_nodes_is_bound_by_communication_and_hsdp_is_the_fix(tmp_path, phi_dir):
    from slimmoe.workflows.driver import plan_workflow
    from slimmoe.workflows.plan import PlanOptions

    full = plan_workflow(_phi_with_stages(tmp_path, phi_dir, shard_group_size=64), PlanOptions(gpu="a100"))
    default = plan_of("phi-mini-moe", phi_dir)
    f, d = ({n.name: n for n in p.nodes}["stage_1"] for p in (full, default))
    assert f.settings["shard_group"] == 64 and d.settings["shard_group"] == 8
    assert f.bound_by_communication and f.exposed_comm_seconds > f.compute_seconds
    assert f.comm_fix.startswith("set shard_group_size: 8 (HSDP within each node): ")
    assert "stage_1" in full.totals()["nodes_bound_by_communication"]
    text = full.format()
    assert "bound by communication (exposed communication exceeds compute):" in text
    assert "stage_1: " in text.split("bound by communication (")[1] and "shard_group_size: 8" in text
    assert d.effective_mfu > f.effective_mfu and d.seconds < f.seconds
    assert d.comm["train"].inter_bytes < f.comm["train"].inter_bytes / 10
    assert default.totals()["gpu_hours"] < full.totals()["gpu_hours"]
    # Memory under fsdp is per shard group: 1/8 of the student per GPU, not 1/64.
    gap = d.phases["train"].optimizer - f.phases["train"].optimizer
    assert gap == pytest.approx(8 * f.params_after["total"] * (1 / 8 - 1 / 64), rel=1e-6)


def test_the_byte_formulas_on_a_hand_computed_case():
    from slimmoe.tasks.planning import comm as C

    p = 1e9
    # fsdp over 4 ranks of one node, per micro-batch: bf16 all-gather twice, float32 reduce-scatter,
    # each rank sending 3/4 of the tensor.
    assert C.fsdp_micro_batch(p, 4, 8) == C.Traffic(intra=(2 * 2 + 4) * p * 3 / 4, inter=0)
    assert C.fsdp_micro_batch(p, 4, 8).intra == 6e9
    # The same over 8 ranks on 2 nodes of 4: 7/8 of 8 bytes per parameter; a quarter of it leaves the
    # node from each rank, so each node's adapters carry it once.
    full = C.fsdp_micro_batch(p, 8, 4)
    assert full.intra + full.inter == pytest.approx(7e9) and full.inter == pytest.approx(7e9 / 4)
    links = C.Links(intra_gb_s=300, inter_gb_s=50)
    assert links.seconds(full, 4) == pytest.approx(7e9 / 50e9)  # the network, not NVLink, sets the pace
    # HSDP: groups of 4 in each of 2 nodes; per step every rank all-reduces its float32 quarter with
    # its one replica: 2 x 4 x P/4 x 1/2 = 1 GB, all between nodes, 4 GB on each node's adapters.
    assert C.hsdp_all_reduce(p, 4, 2, 4) == C.Traffic(intra=0, inter=1e9)
    hsdp = C.stage_step_traffic("fsdp", p, 8, 4, 4, on_gpu=True)
    assert hsdp.each == C.fsdp_micro_batch(p, 4, 4) and hsdp.last == C.Traffic(inter=1e9)
    # ddp over 4 ranks: a float32 all-reduce, 2 x 4 x P x 3/4, once per step.
    assert C.stage_step_traffic("ddp", p, 4, 1, 8, on_gpu=True).last == C.Traffic(intra=6e9)
    # ZeRO-2 in bf16: a reduce-scatter after every backward, the parameters gathered after the step.
    zero = C.stage_step_traffic("deepspeed", p, 4, 1, 8, on_gpu=True)
    assert zero.each == C.Traffic(intra=2 * p * 3 / 4) and zero.after == C.Traffic(intra=2 * p * 3 / 4)
    # Two micro-batches of 0.1 s compute: 0.14 s of network each, 0.04 s of it exposed each time.
    phase = C.step_time("train", "optimizer step", 1, 2, 0.1, C.StepTraffic(each=full), links, 4, 0.4)
    assert phase.comm_s == pytest.approx(0.28) and phase.exposed_s == pytest.approx(0.08)
    assert phase.effective_mfu == pytest.approx(0.4 * 0.2 / 0.28) and phase.bound_by_communication is False
    # A teacher on 2 GPUs hands one [8 x 4096, 4096] bf16 tensor over per batch.
    assert C.split_teacher_batch(8 * 4096, 4096, 2) == C.Traffic(intra=8 * 4096 * 4096 * 2)
    assert C.links_for("a100") == C.Links(300, 50) and C.links_for("h100", inter_gb_s=100) == C.Links(450, 100)
    assert C.links_for(None) is None


def test_the_communication_fix_is_one_that_fits(tmp_path, phi_dir):
    """Sharded over 64 ranks stage_1 is bound by the network; the fix proposed for it (a shard group per
    node, with whatever the memory then needs) is one under which the stage fits and is no longer bound."""
    from slimmoe.workflows.driver import plan_workflow
    from slimmoe.workflows.plan import PlanOptions

    plan = plan_workflow(_phi_with_stages(tmp_path, phi_dir, shard_group_size=64, activation_checkpointing=False),
                         PlanOptions(gpu="a100"))
    stage = {n.name: n for n in plan.nodes}["stage_1"]
    assert stage.fits and stage.bound_by_communication
    assert stage.comm_fix.startswith("set shard_group_size: 8 (HSDP within each node)"), stage.comm_fix
    checkpointing = "activation_checkpointing: true" in stage.comm_fix
    fixed = plan_workflow(_phi_with_stages(tmp_path, phi_dir, shard_group_size=8,
                                           activation_checkpointing=checkpointing), PlanOptions(gpu="a100"))
    after = {n.name: n for n in fixed.nodes}["stage_1"]
    assert after.fits and not after.bound_by_communication and after.effective_mfu > stage.effective_mfu


# ---------------------------------------------------------------------------------------------
# Serving shapes


def test_a_cut_vllm_cannot_split_at_the_served_tensor_parallel_is_refused_at_its_line(tmp_path, phi_dir):
    """6 KV heads can neither be split over 8 GPUs nor replicated on them; 8 can. Checked without the
    teacher's weights (this one is a config.json), so the first stage, which inherits the teacher's
    sizes, is not checked; the second inherits the first's."""
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.dag import build_dag

    def check(path, **serve):
        build_dag(path, overrides={"serve": serve}, check_env=False, check_storage=False)

    six = _phi_with_stages(tmp_path, phi_dir, num_key_value_heads=6)
    with pytest.raises(WorkflowConfigError) as refused:
        check(six, tensor_parallel=[8])
    message = str(refused.value)
    line = [i for i, text in enumerate(six.read_text().splitlines(), 1) if "num_key_value_heads: 6" in text][1]
    assert f"phi.yaml:{line}: stages[1].num_key_value_heads: serve.tensor_parallel [8]" in message, message
    assert "choose num_key_value_heads from [1, 2, 4]" in message
    check(six, tensor_parallel=[1, 2])
    # `slimmoe plan` reads the teacher's config.json, so it checks the first stage too, with the head counts
    from slimmoe.workflows.driver import plan_workflow
    from slimmoe.workflows.plan import PlanError, PlanOptions

    raw = yaml.safe_load(six.read_text())
    for stage in raw["stages"][1:]:
        stage["num_key_value_heads"] = 2  # these pass; only stage_1 (6 of the teacher's 8) cannot be served
    first_only = tmp_path / "first_only.yaml"
    first_only.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(PlanError, match=r"stage_1: serve.tensor_parallel \[8\].*choose num_key_value_heads from "
                                        r"\[2, 4, 8\]"):
        plan_workflow(first_only, PlanOptions(gpu="a100"), overrides={"serve": {"tensor_parallel": [8]}})

    eight = _phi_with_stages(tmp_path, phi_dir, num_key_value_heads=8)
    check(eight, tensor_parallel=[8])
    with pytest.raises(WorkflowConfigError) as refused:
        check(eight, tensor_parallel=[16], block_fp8=True)
    message = str(refused.value)
    # 1600 / 16 = 100 rows per GPU; block-FP8 kernels take multiples of 128 (and 960 has nothing below 1600)
    assert "stages[1].expert_intermediate_size: serve.tensor_parallel [16]" in message and "block-FP8" in message
    assert "choose expert_intermediate_size 2048" in message
    assert "no expert_intermediate_size up to stage_2's 1600 splits that way" in message, message


def test_the_plan_says_at_which_tensor_parallel_sizes_each_output_serves(tmp_path, phi_dir):
    from slimmoe.workflows.driver import plan_workflow
    from slimmoe.workflows.plan import PlanOptions

    plan = plan_workflow(_phi_with_stages(tmp_path, phi_dir, num_key_value_heads=6), PlanOptions(gpu="a100"))
    nodes = {n.name: n for n in plan.nodes}
    # 6 KV heads, 24 query heads; expert sizes 3200 / 1600 / 960 all divide by 16
    assert nodes["stage_1"].serves_at_tp == [1, 2] and nodes["stage_1"].as_dict()["serves_at_tensor_parallel"] == [1, 2]
    # a PhiMoE with fewer query heads: llama.cpp builds its attention at hidden x hidden
    assert "serves at tensor_parallel 1, 2 (vLLM, SGLang); llama.cpp would not load it (fewer query heads)" \
        in nodes["stage_1"].notes
    assert nodes["teacher_logits"].serves_at_tp is None


def test_slim_refuses_a_cut_it_cannot_serve_before_writing(tiny_model_dir, tmp_path):
    from slimmoe.tasks.nodes.slim import run_slim
    from slimmoe.tasks.slimming.config import SlimConfig, SlimTargetError

    # the tiny PhiMoE: 4 query heads over 2 KV heads; one KV group leaves 2 query heads, which 4 GPUs cannot split
    with pytest.raises(SlimTargetError, match=r"cannot serve this cut at 4 GPUs \(2 query heads do not divide"):
        run_slim(SlimConfig(expert_intermediate_size=16, num_key_value_heads=1, tensor_parallel=[4]), tiny_model_dir,
                 tmp_path / "out", log=lambda _: None)
    # llama.cpp builds PhiMoE's attention at hidden x hidden: fewer query heads convert but do not load
    with pytest.raises(SlimTargetError, match="serve.llama_cpp: llama.cpp builds phimoe's attention"):
        run_slim(SlimConfig(expert_intermediate_size=16, num_key_value_heads=1, llama_cpp=True), tiny_model_dir,
                 tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
