"""Sharding past one node, simulated with four gloo ranks: expert tensors sharded along their rows
(no rank holds a whole expert's padding when there are more ranks than experts), hybrid sharding on a
(2, 2) mesh whose groups score their own calibration batches, and the cross-group all-reduce once
per optimizer step."""

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from slimmoe.tasks.slimming.scores import Scores, next_token_score_loss, taylor_scores
from slimmoe.tasks.slimming.surgery import keep_plan
from slimmoe.tasks.slimming.config import SlimTargets
from tiny import tiny_model

WORLD, GROUP = 4, 2
FAMILIES = {"phimoe": {"num_local_experts": 2}, "gpt_oss": {"num_local_experts": 2},
            "qwen2_moe": {"num_experts": 2},
            # 2I = 90 rows do not divide by 4 ranks (FSDP2 refuses uneven shards off dim 0): its gate_up_proj
            # is sharded along the hidden columns instead. Eager: grouped_mm needs 16-byte rows.
            "mixtral": {"num_local_experts": 2, "intermediate_size": 45}}
KERNEL = {"mixtral": "eager"}
GRAD_ACCUM = 3


def _batches(seed: int = 0) -> list[torch.Tensor]:
    """Every rank's calibration batches, rank 0's first (two each)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (2, 12), generator=g) for _ in range(2 * WORLD)]


def _expert_bytes(model, measure) -> int:
    from slimmoe.tasks.core.adapters import get_adapter

    adapter = get_adapter(model)
    experts = [block.experts for _, block in adapter.moe_blocks(model)]
    return sum(measure(e) for e in experts)


def _worker(rank: int, root: str):
    import torch.distributed as dist

    from slimmoe.tasks.core.adapters import get_adapter
    from slimmoe.tasks.slimming import fsdp
    from slimmoe.tasks.slimming.config import StageConfig
    from slimmoe.tasks.slimming.engines import FSDPEngine

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    out = {}
    try:
        train_mesh, score_mesh = fsdp.stage_meshes(torch.device("cpu"), GROUP)
        batches = _batches()
        for family in FAMILIES:
            src = Path(root) / family
            full = fsdp.sharded_model_from(src, torch.device("cpu"), KERNEL.get(family))
            out[family] = {"expert_shard_dims": sorted({fsdp.shard_span(p)[0] for _, b in
                                                        get_adapter(full).moe_blocks(full) for p in b.experts.parameters()
                                                        if p.dim() >= 2}),
                           "allocated_expert_bytes": _expert_bytes(full, fsdp.allocated_param_bytes),
                           "whole_expert_bytes": _expert_bytes(full, lambda m: sum(
                               p.numel() * p.element_size() for p in m.parameters())),
                           "largest_expert_row_bytes": _expert_bytes(full, lambda m: max(
                               p.numel() // p.shape[1] * p.element_size() for p in m.parameters() if p.dim() >= 2))}
            fsdp.sharded_taylor_scores(full, batches, next_token_score_loss).save(Path(root) / f"{family}.full{rank}")
            del full
            hybrid = fsdp.sharded_model_from(src, torch.device("cpu"), KERNEL.get(family), mesh=score_mesh)
            group = rank // GROUP
            mine = batches[group * GROUP * 2:(group + 1) * GROUP * 2]  # this group's ranks' batches
            scores = fsdp.sharded_taylor_scores(hybrid, mine, next_token_score_loss, replicas=WORLD // GROUP)
            scores.save(Path(root) / f"{family}.hsdp{rank}")
            out[family]["hsdp_batches"] = scores.batches
            del hybrid

        # Training on the (replicate, shard) mesh: count the all-reduces between the groups per micro-batch.
        model = fsdp.sharded_model_from(Path(root) / "phimoe", torch.device("cpu"), mesh=train_mesh)
        cfg = StageConfig(expert_intermediate_size=16, token_budget=10**6, strategy="fsdp", num_workers=WORLD,
                          shard_group_size=GROUP, grad_accum=GRAD_ACCUM, micro_batch=2)
        engine = FSDPEngine(model, cfg, torch.device("cpu"), total_steps=10)
        replicate = train_mesh.get_group("replicate")
        counts, real = [], dist.all_reduce

        def counting(tensor, *args, group=None, **kwargs):
            if group is replicate:
                counts[-1] += 1
            return real(tensor, *args, group=group, **kwargs)

        dist.all_reduce = counting
        try:
            for step in range(2):
                for micro in range(GRAD_ACCUM):
                    counts.append(0)
                    loss = next_token_score_loss(engine.model, batches[rank * 2 + micro % 2])
                    engine.backward(loss, last_micro=micro == GRAD_ACCUM - 1)
                engine.step()
        finally:
            dist.all_reduce = real
        out["all_reduces_per_micro_batch"] = counts
        # After a step every replica holds the same shard: the groups' gradients were summed.
        shard = fsdp.local_tensor(model.model.layers[0].mlp.experts.gate_up_proj).detach().clone()
        others = [torch.empty_like(shard) for _ in range(WORLD)]
        dist.all_gather(others, shard)
        out["replicas_equal"] = torch.equal(others[rank], others[(rank + GROUP) % WORLD])
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hsdp")
    for family, experts in FAMILIES.items():
        tiny_model(family, **experts).save_pretrained(root / family)
    mp.spawn(_worker, args=(str(root),), nprocs=WORLD)
    return root


def _unsharded(root: Path, family: str):
    kernel = {"experts_implementation": KERNEL[family]} if family in KERNEL else {}
    model = AutoModelForCausalLM.from_pretrained(root / family, **kernel)
    return model, taylor_scores(model, _batches(), next_token_score_loss)


def _as_lists(plan) -> dict:
    return {k: {layer: t.tolist() for layer, t in getattr(plan, k).items()} for k in ("experts", "shared", "kv_groups")}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_more_ranks_than_experts_allocate_a_quarter_of_the_expert_bytes(run, family):
    dims = json.loads((run / "rank0.json").read_text())[family]["expert_shard_dims"]
    assert dims == ([1, 2] if family == "mixtral" else [1]), dims  # never the expert axis
    for rank in range(WORLD):
        got = json.loads((run / f"rank{rank}.json").read_text())[family]
        assert got["allocated_expert_bytes"] <= got["whole_expert_bytes"] / WORLD + got["largest_expert_row_bytes"], got


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_and_hybrid_sharded_scores_equal_the_unsharded_ones_and_cut_alike(run, family):
    model, want = _unsharded(run, family)
    targets = SlimTargets(expert_intermediate_size=16)
    kept = _as_lists(keep_plan(model.config, want, targets))
    for layout in ("full", "hsdp"):
        for rank in range(WORLD):
            got = Scores.load(run / f"{family}.{layout}{rank}")
            for idx, expected in want.experts.items():
                assert _max_rel(got.experts[idx], expected) <= 1e-5, (layout, rank, idx)
            for idx, expected in want.kv_groups.items():
                assert _max_rel(got.kv_groups[idx], expected) <= 1e-5, (layout, rank, idx)
            for idx, expected in want.shared.items():
                assert _max_rel(got.shared[idx], expected) <= 1e-5, (layout, rank, idx)
            assert _as_lists(keep_plan(model.config, got, targets)) == kept
    assert json.loads((run / "rank0.json").read_text())[family]["hsdp_batches"] == len(_batches())


def test_hybrid_sharding_all_reduces_between_groups_once_per_optimizer_step(run):
    for rank in range(WORLD):
        got = json.loads((run / f"rank{rank}.json").read_text())
        counts = got["all_reduces_per_micro_batch"]
        assert len(counts) == 2 * GRAD_ACCUM
        for step in range(2):
            per_micro = counts[step * GRAD_ACCUM:(step + 1) * GRAD_ACCUM]
            assert per_micro[:-1] == [0] * (GRAD_ACCUM - 1) and per_micro[-1] > 0, counts
        assert got["replicas_equal"]


def test_an_hsdp_stage_makes_the_ddp_cut_and_resumes_after_a_worker_is_killed(pipeline, tmp_path):
    """Four workers on a (2, 2) mesh: the cut is the one a ddp stage of four ranks makes (scores over
    every rank's calibration batches, here computed unsharded), and a SIGKILL of rank 1 mid-distillation
    resumes from the last checkpoint to the planned step."""
    from slimmoe.tasks.data.readers import open_logit_cache
    from slimmoe.tasks.slimming.fsdp import every_rank_batches
    from slimmoe.tasks.slimming.student import CALIBRATION_SEED_OFFSET, scoring_loss
    from stage_helpers import SEQ, run_stage_killing_rank1, stage_cfg

    work, out = tmp_path / "work", tmp_path / "out"
    # Half a CPU per worker: the session's Ray cluster has 4 CPUs, and Ray Data actors of earlier tests may
    # still hold some; a worker group that cannot be placed would wait instead of training.
    cfg = stage_cfg(strategy="fsdp", num_workers=WORLD, shard_group_size=GROUP, token_budget=24 * 8 * SEQ * WORLD,
                    checkpoint_interval=8, log_interval=4, max_failures=2, cpus_per_worker=0.5)
    killed, committed = run_stage_killing_rank1(cfg, pipeline, out, work)
    assert killed is not None, "the stage finished before a checkpoint could be observed"
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps_done"] == 24 and m["resumed_from_step"] is not None and m["resumed_from_step"] >= committed
    assert {r["shard_group"] for r in m["memory_per_rank"]} == {GROUP}

    teacher = AutoModelForCausalLM.from_pretrained(pipeline["teacher"])
    cache = open_logit_cache(pipeline["logits"] / "train")
    batches = list(every_rank_batches(cache, cfg.micro_batch, WORLD, cfg.calibration_batches,
                                      cfg.seed + CALIBRATION_SEED_OFFSET))
    want = taylor_scores(teacher, batches, scoring_loss(cfg, cuts_the_teacher=True)[1])
    got = Scores.load(out / "scores.safetensors")
    for idx, expected in want.experts.items():
        assert _max_rel(got.experts[idx], expected) <= 1e-4, idx
    assert _as_lists(keep_plan(teacher.config, got, cfg.targets)) == _as_lists(keep_plan(teacher.config, want, cfg.targets))
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.intermediate_size == 16
