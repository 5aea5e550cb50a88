"""The fsdp strategy: sharded loading, sharded Taylor scores, the gathered save in the Hub layout, the stage end
to end, resume after SIGKILL (under HSDP: test_hsdp.py)."""

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from slimmoe.tasks.nodes.stage import run_stage
from slimmoe.tasks.slimming.scores import Scores, next_token_score_loss, taylor_scores
from slimmoe.tasks.slimming.surgery import keep_plan
from stage_helpers import SEQ, held_out_kl, stage_cfg
from tiny import FAMILIES, checkpoint_tensors, tiny_model

SCORE_FAMILIES = ["phimoe", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]
WORLD = 2
BF16_SAVE_FAMILY = "phimoe"  # renames modules on disk as well as splitting the experts


def _calibration(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (2, 12), generator=g) for _ in range(3)]


def _sharded_worker(rank: int, root: str):
    """Every family sharded over two gloo ranks: its Taylor scores (SCORE_FAMILIES) and its gathered save."""
    import torch.distributed as dist

    from slimmoe.tasks.slimming import fsdp

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        for family in FAMILIES:
            model = fsdp.sharded_model_from(Path(root) / family, torch.device("cpu"))
            if family in SCORE_FAMILIES:
                full = sum(p.numel() * p.element_size() for p in model.parameters())
                with_heads = family != "deepseek_v3"
                scores = fsdp.sharded_taylor_scores(model, _calibration(), next_token_score_loss, with_heads=with_heads)
                scores.save(Path(root) / f"{family}.rank{rank}.safetensors")
                (Path(root) / f"{family}.rank{rank}.json").write_text(
                    json.dumps({"local": fsdp.local_param_bytes(model), "full": full}))
            written = fsdp.save_sharded_model(model, Path(root) / f"{family}.saved", config_from=Path(root) / family)
            assert (written is None) == (rank != 0)
            if family == BF16_SAVE_FAMILY:
                fsdp.save_sharded_model(model, Path(root) / f"{family}.saved_bf16", config_from=Path(root) / family,
                                        dtype=torch.bfloat16)
        # Recomputing activations in backward must run each layer twice and give the same gradients.
        result = {}
        for recompute in (False, True):
            model = fsdp.sharded_model_from(Path(root) / "mixtral", torch.device("cpu"), activation_checkpointing=recompute)
            model.train()  # checkpointing acts in training mode only
            calls = []
            # inside the checkpoint (its recompute stops once the saved tensors backward needs are back: after attention)
            model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
            next_token_score_loss(model, _calibration()[0]).backward()
            grad = fsdp.local_tensor(model.model.layers[0].mlp.experts.down_proj.grad)
            result[str(recompute)] = {"calls": len(calls), "grad": grad.flatten()[:64].tolist()}
        (Path(root) / f"recompute.rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """One two-rank spawn for the tests below (each spawn costs seconds)."""
    root = tmp_path_factory.mktemp("sharded")
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / family)  # as transformers 5 saves: experts one by one
    mp.spawn(_sharded_worker, args=(str(root),), nprocs=WORLD)
    return root


def test_sharded_hook_scores_equal_unsharded_full_gradient_scores(sharded_run):
    tmp_path = sharded_run
    for family in SCORE_FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / family)
        want = taylor_scores(model, _calibration(), next_token_score_loss, with_heads=family != "deepseek_v3")
        for rank in range(WORLD):
            got = Scores.load(tmp_path / f"{family}.rank{rank}.safetensors")
            assert got.batches == want.batches and sorted(got.experts) == sorted(want.experts)
            a, b = want.flat(), got.flat()
            assert a.shape == b.shape and a.abs().sum() > 0, family
            rel = float((a - b).abs().max() / a.abs().max())
            assert rel <= 1e-5, (family, rank, rel)
            if family in ("qwen2_moe", "deepseek_v3"):
                assert got.shared, family  # shared experts scored too
            memory = json.loads((tmp_path / f"{family}.rank{rank}.json").read_text())
            assert memory["local"] <= 0.6 * memory["full"], (family, memory)
    for rank in range(WORLD):
        recompute = json.loads((tmp_path / f"recompute.rank{rank}.json").read_text())
        assert recompute["False"]["calls"] == 1 and recompute["True"]["calls"] == 2, recompute
        assert torch.allclose(torch.tensor(recompute["True"]["grad"]), torch.tensor(recompute["False"]["grad"]),
                              rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sharded_save_writes_what_save_pretrained_writes(family, sharded_run, tmp_path):
    """Two ranks: the Hub layout (per-expert tensors under the family's names), not the model's fused names."""
    model = AutoModelForCausalLM.from_pretrained(sharded_run / family)
    model.save_pretrained(tmp_path / "want")
    outputs = [("saved", torch.float32, tmp_path / "want")]
    if family == BF16_SAVE_FAMILY:
        model.to(torch.bfloat16).save_pretrained(tmp_path / "want_bf16")
        outputs.append(("saved_bf16", torch.bfloat16, tmp_path / "want_bf16"))
    for out, dtype, want_dir in outputs:
        want, got = checkpoint_tensors(want_dir), checkpoint_tensors(sharded_run / f"{family}.{out}")  # safe_open
        assert sorted(got) == sorted(want), (family, out, sorted(set(got) ^ set(want)))
        for name, t in want.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, (family, out, name)
            assert torch.equal(got[name], t), (family, out, name)
        assert {t.dtype for t in got.values() if t.is_floating_point()} == {dtype}, (family, out)


def test_the_gathered_save_writes_hugging_face_files_that_load_shards_reads_back(tmp_path):
    """World 1, no process group: the unsharded path of the same functions (the fsdp stage below covers 2 ranks)."""
    from slimmoe.tasks.slimming import fsdp

    model = tiny_model("mixtral")
    want = model.state_dict()
    model.save_pretrained(tmp_path / "src")  # per-expert, as transformers 5 saves
    fresh = AutoModelForCausalLM.from_config(model.config)
    fsdp.load_shards(fresh, tmp_path / "src")
    assert all(torch.equal(fresh.state_dict()[n], t) for n, t in want.items())

    fsdp.save_sharded_model(model, tmp_path / "one", config_from=tmp_path / "src", tokenizer_from=None)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    fsdp.save_sharded_model(model, tmp_path / "many", config_from=tmp_path / "src", dtype=torch.bfloat16,
                            max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(checkpoint_tensors(tmp_path / "src"))  # save_pretrained's names
    assert sorted(checkpoint_tensors(tmp_path / "one")) == sorted(index["weight_map"])
    tokens = _calibration()[0]
    with torch.no_grad():
        logits = model(tokens).logits
    for out, dtype in (("one", torch.float32), ("many", torch.bfloat16)):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=dtype)
        got = loaded.state_dict()
        assert all(got[n].dtype == dtype and torch.equal(got[n], t.to(dtype)) for n, t in want.items()), out
        if dtype == torch.float32:
            with torch.no_grad():
                assert torch.equal(loaded(tokens).logits, logits)


def _kept(scores_file: Path, model_dir: Path, targets):
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    plan = keep_plan(config, Scores.load(scores_file), targets)
    return {k: {layer: t.tolist() for layer, t in getattr(plan, k).items()} for k in ("experts", "kv_groups")}


def test_fsdp_stage_makes_the_ddp_cut_and_distills_as_well(pipeline, ddp_stage, tmp_path):
    ddp_cfg, ddp_out, ddp_headline = ddp_stage
    assert ddp_cfg.strategy == "ddp"
    cfg = ddp_cfg.with_changes(strategy="fsdp")
    fsdp_out = tmp_path / "fsdp"
    run_stage(cfg, pipeline["teacher"], pipeline["logits"], fsdp_out, tmp_path / "work",
              teacher_fingerprint=pipeline["fp"], name="fsdp")
    # The same neurons and KV groups survive (scores summed over the same calibration batches).
    assert _kept(ddp_out / "scores.safetensors", pipeline["teacher"], cfg.targets) == \
        _kept(fsdp_out / "scores.safetensors", pipeline["teacher"], cfg.targets)
    ddp_kl, fsdp_kl = held_out_kl(ddp_out, pipeline["logits"]), held_out_kl(fsdp_out, pipeline["logits"])
    assert abs(fsdp_kl - ddp_kl) <= 0.05 * ddp_kl, (ddp_kl, fsdp_kl)
    assert fsdp_kl < held_out_kl(fsdp_out / "pruned", pipeline["logits"])
    # A standard Hugging Face directory: the tiny student fits one file, so model.safetensors and no index.
    assert (fsdp_out / "model.safetensors").exists() and not (fsdp_out / "model.safetensors.index.json").exists()
    student = AutoModelForCausalLM.from_pretrained(fsdp_out)
    assert student.config.intermediate_size == 16 and student.config.num_key_value_heads == 1
    metrics = json.loads((fsdp_out / "metrics.json").read_text())
    assert metrics["steps_done"] == ddp_headline["steps"] == 40
    assert metrics["params_after"]["total"] == sum(p.numel() for p in student.parameters())
    memory = metrics["memory_per_rank"]
    assert [m["rank"] for m in memory] == [0, 1]
    for m in memory:  # no rank held more than its shard of the teacher or of the student
        assert m["input_local_param_bytes"] <= 0.6 * m["input_param_bytes"], m
        assert m["student_local_param_bytes"] <= 0.6 * m["student_param_bytes"], m


def test_activation_checkpointing_needs_fsdp_and_zero3_points_at_it():
    with pytest.raises(ValueError, match="activation_checkpointing.*strategy: fsdp"):
        stage_cfg(strategy="ddp", activation_checkpointing=True)
    with pytest.raises(ValueError, match="ZeRO-3.*strategy: fsdp"):
        stage_cfg(strategy="deepspeed", zero_stage=3)
    assert stage_cfg(use_gpu=True, num_workers=2).strategy == "fsdp"
    assert stage_cfg(use_gpu=False, num_workers=2).strategy == "ddp"


def test_an_fsdp_stage_drops_experts_and_slims_them_in_one_cut(pipeline, tmp_path):
    """Two gloo ranks, 4 experts kept down to 2 (top-2 stays): the router's rows go with the kept experts,
    the student distills, and the output loads with plain from_pretrained."""
    out = tmp_path / "out"
    cfg = stage_cfg(strategy="fsdp", num_experts=2, token_budget=6 * 8 * SEQ * 2, checkpoint_interval=100)
    run_stage(cfg, pipeline["teacher"], pipeline["logits"], out, tmp_path / "work", teacher_fingerprint=pipeline["fp"],
              name="fsdp_experts")
    teacher = AutoModelForCausalLM.from_pretrained(pipeline["teacher"])
    student = AutoModelForCausalLM.from_pretrained(out)
    assert (student.config.num_local_experts, student.config.num_experts_per_tok) == (2, 2)
    assert student.config.intermediate_size == 16
    kept = Scores.load(out / "scores.safetensors")
    plan = keep_plan(teacher.config, kept, cfg.targets)
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert plan.expert_ids and all(len(ids) == 2 for ids in plan.expert_ids.values())
    for layer, ids in plan.expert_ids.items():
        router = f"model.layers.{layer}.mlp.router.weight"
        assert torch.equal(pruned.state_dict()[router], teacher.state_dict()[router][ids.tolist()]), layer
    assert held_out_kl(out, pipeline["logits"]) < held_out_kl(out / "pruned", pipeline["logits"])
