"""A cut that drops whole experts and slims the rest in one go (`num_experts` beside the widths): in memory,
streamed and sharded alike, the router's rows going with their experts, every family's routing rules
checked, and a cut that keeps every expert exactly today's cut."""

import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from slimmoe.tasks.core.adapters import get_adapter
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.planning.memory import model_shape
from slimmoe.tasks.slimming.config import (ModelSizes, SlimTargetError, SlimTargets, StageConfig, check_targets,
                                           gradual_cuts)
from slimmoe.tasks.slimming.moments import slice_moments
from slimmoe.tasks.slimming.scores import Scores, magnitude_scores, next_token_score_loss, taylor_scores
from slimmoe.tasks.slimming.streaming import stream_slim
from slimmoe.tasks.slimming.surgery import keep_plan, slim_model, slimmed_config
from slimmoe.tasks.trimming.scores import collect_stats
from tiny import FAMILIES, checkpoint_tensors, save_fused, tiny_model

KEPT = 3  # of the tiny models' 4 experts: the dropped one differs by layer


def _scores(model, seed: int = 0) -> Scores:
    """Random scores of the right shapes (kept indices scattered, not a prefix), experts ranked too."""
    shapes = magnitude_scores(model, with_heads=True)
    g = torch.Generator().manual_seed(seed)
    scores = Scores(**{kind: {i: torch.rand(t.shape, generator=g) for i, t in getattr(shapes, kind).items()}
                       for kind in ("experts", "shared", "kv_groups")})
    scores.expert_importance = {i: torch.rand(t.shape[0], generator=g) for i, t in shapes.experts.items()}
    return scores


def _targets(model, num_experts: int | None = KEPT) -> SlimTargets:
    adapter = get_adapter(model)
    return SlimTargets(adapter.expert_size(model.config) // 2,
                       num_key_value_heads=1 if adapter.head_pruning else None,
                       shared_expert_intermediate_size=24 if adapter.shared_expert_size_key else None,
                       num_experts=num_experts)


def _router_rows_follow(teacher, student, kept: dict[int, torch.Tensor]) -> None:
    """Every per-expert tensor of each router (weight, GPT-OSS's bias, DeepSeek-V3's e_score_correction_bias)
    is the teacher's at the kept experts, in order."""
    adapter = get_adapter(teacher)
    t_blocks, s_blocks = dict(adapter.moe_blocks(teacher)), dict(adapter.moe_blocks(student))
    assert sorted(kept) == sorted(t_blocks)
    for idx, ids in kept.items():
        t_router, s_router = adapter.router(t_blocks[idx]).state_dict(), adapter.router(s_blocks[idx]).state_dict()
        assert sorted(t_router) == sorted(s_router) and t_router
        for name, t in t_router.items():
            assert torch.equal(s_router[name], t[ids]), (idx, name)


@pytest.mark.parametrize("layout", ["saved", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_combined_cut_is_the_same_in_memory_and_streamed_and_loads(family, layout, tmp_path):
    teacher = tiny_model(family)
    adapter = get_adapter(teacher)
    scores, targets = _scores(teacher), _targets(teacher)
    plan = keep_plan(teacher.config, scores, targets)
    assert {len(ids) for ids in plan.expert_ids.values()} == {KEPT}
    assert any(ids.tolist() != list(range(KEPT)) for ids in plan.expert_ids.values())  # not just a prefix
    slim = slim_model(teacher, scores, targets).eval()
    _router_rows_follow(teacher, slim, plan.expert_ids)
    save_fused(teacher, tmp_path / "src") if layout == "fused" else teacher.save_pretrained(tmp_path / "src")
    stream_slim(tmp_path / "src", tmp_path / "out", plan)
    got = checkpoint_tensors(tmp_path / "out")
    if layout == "fused":
        want = slim.state_dict()
    else:
        slim.save_pretrained(tmp_path / "want")
        want = checkpoint_tensors(tmp_path / "want")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    cfg = reloaded.config  # (Qwen3-MoE writes the adapter's num_experts as num_local_experts)
    assert adapter.num_experts(cfg) == KEPT and adapter.top_k(cfg) == adapter.top_k(teacher.config)
    assert adapter.expert_size(cfg) == targets.expert_intermediate_size
    _router_rows_follow(teacher, reloaded, plan.expert_ids)
    # the kept experts' neurons are the teacher expert's own rows (down_proj: its columns)
    idx, ids = next(iter(plan.expert_ids.items()))
    t_down = dict(adapter.moe_blocks(teacher))[idx].experts.down_proj
    s_down = dict(adapter.moe_blocks(reloaded))[idx].experts.down_proj
    axis = adapter.down_axis()
    for j, e in enumerate(ids.tolist()):
        assert torch.equal(s_down[j], t_down[e].index_select(axis - 1, plan.experts[idx][j]))
    x = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, slim(x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_that_keeps_every_expert_is_todays_cut_byte_for_byte(family, tmp_path):
    teacher = tiny_model(family)
    scores = _scores(teacher)
    every = get_adapter(teacher).num_experts(teacher.config)
    today, keep_all = _targets(teacher, num_experts=None), _targets(teacher, num_experts=every)
    assert not keep_plan(teacher.config, scores, keep_all).expert_ids
    a, b = slim_model(teacher, scores, today), slim_model(teacher, scores, keep_all)
    assert a.config.to_dict() == b.config.to_dict()
    assert sorted(a.state_dict()) == sorted(b.state_dict())
    assert all(torch.equal(t, b.state_dict()[n]) for n, t in a.state_dict().items())
    teacher.save_pretrained(tmp_path / "src")
    for name, targets in (("today", today), ("keep_all", keep_all)):
        stream_slim(tmp_path / "src", tmp_path / name, keep_plan(teacher.config, scores, targets))
    files = sorted(p.name for p in (tmp_path / "today").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "keep_all").iterdir()) and "model.safetensors" in files
    for f in files:
        assert (tmp_path / "today" / f).read_bytes() == (tmp_path / "keep_all" / f).read_bytes(), f


def test_deepseek_v3_keeps_the_same_count_in_every_routing_group(tmp_path):
    teacher = tiny_model("deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)
    scores = _scores(teacher)
    # The four best experts overall all sit in group 0; the cut must still keep two of each group.
    scores.expert_importance = {i: torch.tensor([8.0, 7, 6, 5, 1, 2, 4, 3]) for i in scores.expert_importance}
    targets = SlimTargets(12, num_experts=4)
    plan = keep_plan(teacher.config, scores, targets)
    assert {tuple(ids.tolist()) for ids in plan.expert_ids.values()} == {(0, 1, 6, 7)}
    teacher.save_pretrained(tmp_path / "src")
    stream_slim(tmp_path / "src", tmp_path / "out", plan)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _router_rows_follow(teacher, reloaded, plan.expert_ids)
    assert reloaded.config.n_group == 2 and reloaded.config.n_routed_experts == 4
    x = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, slim_model(teacher, scores, targets).eval()(x).logits,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_planners_counts_are_the_cut_models(family):
    teacher = tiny_model(family)
    scores = _scores(teacher)
    slim = slim_model(teacher, scores, _targets(teacher))
    planned = model_shape(slimmed_config(teacher.config, _targets(teacher)))
    counted = count_parameters(slim)
    assert (planned.total, planned.active, planned.num_experts) == (counted["total"], counted["active"], KEPT)
    narrower = count_parameters(slim_model(teacher, scores, _targets(teacher, num_experts=None)))
    # dropping experts costs memory, not what a token touches: only the dropped router rows leave the active count
    adapter = get_adapter(teacher)
    every = adapter.num_experts(teacher.config)
    router_rows = sum(p.numel() // every * (every - KEPT) for _, block in adapter.moe_blocks(teacher)
                      for p in adapter.router(block).parameters())
    assert counted["total"] < narrower["total"] and narrower["active"] - counted["active"] == router_rows > 0


def _refusal(family: str, targets: SlimTargets, **overrides) -> SlimTargetError:
    with pytest.raises(SlimTargetError) as err:
        check_targets(ModelSizes.of(tiny_model(family, **overrides).config), targets)
    assert err.value.field == "num_experts"
    return err.value


@pytest.mark.parametrize("family, targets, overrides, match", [
    ("mixtral", SlimTargets(24, num_experts=1), {}, r"num_experts=1 keeps fewer experts than the 2 .*at least 2"),
    ("gpt_oss", SlimTargets(24, num_experts=5), {}, r"more than the model's num_local_experts=4"),
    ("qwen3_moe", SlimTargets(12, num_experts=0), {}, "positive"),
    ("deepseek_v3", SlimTargets(12, num_experts=3), dict(n_routed_experts=8, n_group=2),
     r"does not divide by the model's n_group=2.*choose 2 or 4"),
    ("deepseek_v3", SlimTargets(12, num_experts=2), dict(n_routed_experts=8, n_group=2, num_experts_per_tok=1),
     r"leaves 1 expert per routing group.*at least 4"),
    ("deepseek_v3", SlimTargets(12, num_experts=8), dict(n_routed_experts=16, n_group=4, topk_group=1,
                                                         num_experts_per_tok=4),
     r"1 selectable groups .* x 2 experts = 2 candidates per token, fewer than num_experts_per_tok=4.*at least 16"),
])
def test_routing_rules_refuse_a_count_naming_the_field_and_the_fix(family, targets, overrides, match):
    err = _refusal(family, targets, **overrides)
    assert re.search(match, str(err)), str(err)


def test_a_later_stage_inherits_the_expert_count_and_the_stage_config_carries_it():
    sizes = ModelSizes.of(tiny_model("mixtral").config)
    after = sizes.after(SlimTargets(24, num_experts=3), "stage_1")
    assert after.num_experts == 3
    with pytest.raises(SlimTargetError, match="more than stage_1's num_local_experts=3"):
        check_targets(after, SlimTargets(12, num_experts=4))
    cfg = StageConfig(expert_intermediate_size=24, num_experts=3, token_budget=100)
    assert cfg.targets.num_experts == 3 and cfg.scored_experts() == cfg.expert_score
    assert StageConfig(expert_intermediate_size=24, token_budget=100).scored_experts() is None
    with pytest.raises(ValueError, match="distill_only: true keeps every size; remove num_experts"):
        StageConfig(distill_only=True, num_experts=3, token_budget=100)
    # a gradual stage steps the count down as it steps the widths
    gradual = StageConfig(expert_intermediate_size=16, num_experts=2, cut_steps=2, token_budget=100)
    eight = ModelSizes.of(tiny_model("mixtral", num_local_experts=8, intermediate_size=32).config)
    assert [c.targets.num_experts for c in gradual_cuts(gradual, eight, total_steps=10)] == [5, 2]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_the_calibration_pass_ranks_experts_as_the_trimming_statistics_do(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 96, (2, 12), generator=g) for _ in range(2)]
    trim = collect_stats(model, batches, reconstruction=True)
    ranked = {kind: taylor_scores(model, batches, next_token_score_loss, with_heads=False, expert_score=kind)
              for kind in ("taylor", "frequency", "reconstruction")}
    for layer, expected in trim.expert_scores("frequency").items():
        got = ranked["frequency"].expert_importance[layer]
        torch.testing.assert_close(got.double(), trim.expert_weight_sum[layer], rtol=1e-6, atol=0)
        assert torch.equal(torch.argsort(got, stable=True), torch.argsort(expected.float(), stable=True))
        torch.testing.assert_close(ranked["reconstruction"].expert_importance[layer].double().sqrt(),
                                   trim.expert_scores("reconstruction")[layer], rtol=1e-5, atol=0)
        torch.testing.assert_close(ranked["taylor"].expert_importance[layer], ranked["taylor"].experts[layer].sum(1))
    # the neuron scores do not depend on what ranks the experts
    assert all(torch.equal(ranked["frequency"].experts[i], ranked["taylor"].experts[i]) for i in ranked["taylor"].experts)


def test_adamw_moments_are_cut_with_the_experts():
    model = tiny_model("gpt_oss")
    scores, targets = _scores(model), _targets(model)
    plan = keep_plan(model.config, scores, targets)
    moments = {k: {n: torch.randn_like(p) for n, p in model.named_parameters()} for k in ("exp_avg", "exp_avg_sq")}
    moments["step"] = {}
    sliced = slice_moments(model, plan, moments)
    student = slim_model(model, scores, targets)
    for n, p in student.named_parameters():
        assert sliced["exp_avg"][n].shape == p.shape and sliced["exp_avg_sq"][n].shape == p.shape, n
    router = "model.layers.0.mlp.router.weight"
    assert torch.equal(sliced["exp_avg"][router], moments["exp_avg"][router][plan.expert_ids[0]])


# -- the fsdp stage's cut: sharded scores, then the streamed cut ---------------------------------------------

WORLD = 2
SHARDED = ("deepseek_v3",)  # a router with a per-expert buffer, and shared experts the cut leaves whole
# Routing statistics are whole on every rank (unlike the Taylor sums of each rank's slices); the
# reconstruction score also runs the experts inside the sharded layer's forward.
SHARDED_KINDS = ("reconstruction",)


def _calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 96, (2, 12), generator=g) for _ in range(2)]


def _sharded_worker(rank: int, root: str):
    import torch.distributed as dist

    from slimmoe.tasks.slimming import fsdp

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        for family in SHARDED:
            model = fsdp.sharded_model_from(Path(root) / family, torch.device("cpu"))
            for kind in SHARDED_KINDS:
                scores = fsdp.sharded_taylor_scores(model, _calibration(), next_token_score_loss, with_heads=False,
                                                    expert_score=kind)
                scores.save(Path(root) / f"{family}.{kind}.rank{rank}.safetensors")
            del model
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's teardown, which has aborted a gloo rank here
    # ("terminate called without an active exception") once in several runs on a loaded machine.
    os._exit(0)


def test_the_sharded_pass_ranks_experts_as_the_whole_model_does_and_its_cut_streams(tmp_path):
    for family in SHARDED:
        tiny_model(family).save_pretrained(tmp_path / family)
    mp.spawn(_sharded_worker, args=(str(tmp_path),), nprocs=WORLD)
    for family in SHARDED:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        for kind in SHARDED_KINDS:
            whole = taylor_scores(model, _calibration(), next_token_score_loss, with_heads=False, expert_score=kind)
            for rank in range(WORLD):
                got = Scores.load(tmp_path / f"{family}.{kind}.rank{rank}.safetensors")
                assert sorted(got.expert_importance) == sorted(whole.expert_importance)
                for layer, v in whole.expert_importance.items():
                    torch.testing.assert_close(got.expert_importance[layer], v, rtol=1e-5, atol=1e-9)
        # what cut_sharded does on rank 0: the plan from the sharded scores, streamed from the input
        targets = SlimTargets(12, num_experts=2)
        got = Scores.load(tmp_path / f"{family}.reconstruction.rank0.safetensors")
        plan = keep_plan(model.config, got, targets)
        stream_slim(tmp_path / family, tmp_path / f"{family}.out", plan)
        want = slim_model(model, whole, targets)  # the whole model's reconstruction ranking
        out = AutoModelForCausalLM.from_pretrained(tmp_path / f"{family}.out").state_dict()
        assert sorted(out) == sorted(want.state_dict())
        assert all(torch.equal(out[n], t) for n, t in want.state_dict().items())
