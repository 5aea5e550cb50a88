"""Streaming surgery: a checkpoint cut tensor by tensor on disk equals the in-memory cut, in every family
and both checkpoint layouts (the model's fused names, and the per-expert layout of the Hub)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from slimmoe.tasks.core.adapters import get_adapter
from slimmoe.tasks.core.safetensors_files import CheckpointTensors
from slimmoe.tasks.slimming.config import SlimTargets
from slimmoe.tasks.slimming.scores import Scores, magnitude_scores
from slimmoe.tasks.slimming.streaming import CheckpointLayoutError, stream_slim, streaming_magnitude_scores
from slimmoe.tasks.slimming.surgery import KeepPlan, keep_plan, slim_model
from slimmoe.workflows.cli import app
from tiny import FAMILIES, checkpoint_tensors, save_fused, tiny_model

runner = CliRunner()


def _random_scores(model, seed: int = 0) -> Scores:
    """Random scores of the right shapes, so that the kept indices are scattered, not a prefix."""
    shapes = magnitude_scores(model, with_heads=True)
    g = torch.Generator().manual_seed(seed)
    return Scores(**{kind: {i: torch.rand(t.shape, generator=g) for i, t in getattr(shapes, kind).items()}
                     for kind in ("experts", "shared", "kv_groups")})


def _targets(model) -> SlimTargets:
    adapter = get_adapter(model)
    return SlimTargets(adapter.expert_size(model.config) // 2,
                       num_key_value_heads=1 if adapter.head_pruning else None,
                       shared_expert_intermediate_size=24 if adapter.shared_expert_size_key else None)


def save_per_expert_by_hand(model, out: Path) -> Path:
    """PhiMoE / Mixtral as their Hub checkpoints store them: `block_sparse_moe.experts.<e>.w1|w3|w2.weight`
    (gate, up, down), and PhiMoE's router as `block_sparse_moe.gate.weight`."""
    model.save_pretrained(out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    tensors = {}
    for name, t in model.state_dict().items():
        hub = name.replace(".mlp.", ".block_sparse_moe.").replace(".router.weight", ".gate.weight")
        if name.endswith(".experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                tensors[hub.replace("gate_up_proj", f"{e}.w1.weight")] = t[e, :inter].clone()
                tensors[hub.replace("gate_up_proj", f"{e}.w3.weight")] = t[e, inter:].clone()
        elif name.endswith(".experts.down_proj"):
            for e in range(t.shape[0]):
                tensors[hub.replace("down_proj", f"{e}.w2.weight")] = t[e].clone()
        else:
            tensors[hub] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("layout", ["fused", "saved"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_cut_equals_the_in_memory_cut(family, layout, tmp_path):
    """`saved` is what save_pretrained writes (transformers 5: per expert, except GPT-OSS which stays
    fused); the stream must write exactly what save_pretrained writes for the in-memory cut."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    scores, targets = _random_scores(model), _targets(model)
    src = tmp_path / "src"
    save_fused(model, src) if layout == "fused" else model.save_pretrained(src)
    slim = slim_model(model, scores, targets).eval()
    report = stream_slim(src, tmp_path / "out", keep_plan(model.config, scores, targets))
    got = checkpoint_tensors(tmp_path / "out")
    if layout == "fused":
        want = slim.state_dict()
    else:
        slim.save_pretrained(tmp_path / "want")
        want = checkpoint_tensors(tmp_path / "want")
    assert sorted(got) == sorted(want) == sorted(checkpoint_tensors(src))  # no tensor added, none dropped, none renamed
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert report["tensors"] == len(want) and report["cut"] > 0
    assert report["expert_layouts"] == (["fused"] if layout == "fused" or family == "gpt_oss" else ["per-expert"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg[adapter.expert_size_key] == targets.expert_intermediate_size
    assert cfg["num_key_value_heads"] == slim.config.num_key_value_heads
    assert cfg["num_attention_heads"] == slim.config.num_attention_heads
    assert (tmp_path / "out" / "generation_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, slim(x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["phimoe", "mixtral"])
def test_a_hub_per_expert_checkpoint_gives_what_the_fused_one_gives(family, tmp_path):
    model = tiny_model(family)
    scores, targets = _random_scores(model, seed=3), _targets(model)
    plan = keep_plan(model.config, scores, targets)
    hub = save_per_expert_by_hand(model, tmp_path / "hub")
    model.save_pretrained(tmp_path / "saved")  # the by-hand layout is the one transformers writes
    assert sorted(checkpoint_tensors(hub)) == sorted(checkpoint_tensors(tmp_path / "saved"))
    fused = save_fused(model, tmp_path / "fused")
    stream_slim(hub, tmp_path / "hub_out", plan)
    stream_slim(fused, tmp_path / "fused_out", plan)
    hub_out, fused_out = checkpoint_tensors(tmp_path / "hub_out"), checkpoint_tensors(tmp_path / "fused_out")
    assert sorted(hub_out) == sorted(checkpoint_tensors(hub))  # written back in the layout it came in
    k = targets.expert_intermediate_size
    gate_up = fused_out["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 2 * k, 32)
    assert torch.equal(hub_out["model.layers.1.block_sparse_moe.experts.2.w1.weight"], gate_up[2, :k])
    assert torch.equal(hub_out["model.layers.1.block_sparse_moe.experts.2.w3.weight"], gate_up[2, k:])
    assert torch.equal(hub_out["model.layers.1.block_sparse_moe.experts.3.w2.weight"],
                       fused_out["model.layers.1.mlp.experts.down_proj"][3])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "hub_out").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "fused_out").state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_small_shards_split_with_an_index_and_still_load(tmp_path):
    model = tiny_model("qwen2_moe")
    scores, targets = _random_scores(model), _targets(model)
    model.save_pretrained(tmp_path / "src")
    limit = 20_000
    report = stream_slim(tmp_path / "src", tmp_path / "out", keep_plan(model.config, scores, targets),
                         max_shard_bytes=limit)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 3 and files == sorted(report["files"])
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    got = checkpoint_tensors(tmp_path / "out")
    assert sorted(index["weight_map"]) == sorted(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values()) == report["bytes"]
    for f in files:
        with safe_open(str(tmp_path / "out" / f), "pt") as h:
            sizes = [h.get_tensor(k).numel() * 4 for k in h.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1, (f, sizes)
    slim = slim_model(model, scores, targets)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    want = slim.state_dict()
    assert all(torch.equal(reloaded.state_dict()[n], want[n]) for n in want)


def test_a_write_that_fails_midway_leaves_no_output(tmp_path, monkeypatch):
    model = tiny_model("phimoe")
    scores, targets = _random_scores(model), _targets(model)
    model.save_pretrained(tmp_path / "src")
    calls = []
    real_read = CheckpointTensors.read

    def failing_read(self, name, key=None):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk read failed")
        return real_read(self, name, key)

    monkeypatch.setattr(CheckpointTensors, "read", failing_read)
    with pytest.raises(OSError, match="disk read failed"):
        stream_slim(tmp_path / "src", tmp_path / "out", keep_plan(model.config, scores, targets), max_shard_bytes=4096)
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no half-written sibling


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_magnitude_scores_are_the_in_memory_ones(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "saved")
    want = magnitude_scores(model, with_heads=True)
    for src in (tmp_path / "saved", save_fused(model, tmp_path / "fused")):
        got = streaming_magnitude_scores(src, with_heads=True)
        assert got.method == "magnitude"
        for kind in ("experts", "shared", "kv_groups"):
            w, g = getattr(want, kind), getattr(got, kind)
            assert sorted(g) == sorted(w), (kind, src.name)
            for layer in w:
                assert g[layer].dtype == torch.float32 and torch.equal(g[layer], w[layer]), (kind, layer, src.name)
    assert not streaming_magnitude_scores(tmp_path / "saved", with_heads=False).kv_groups


@pytest.mark.parametrize("family", ["phimoe", "gpt_oss"])
def test_at_most_about_one_tensor_is_held_at_a_time(family, tmp_path):
    model = tiny_model(family, vocab_size=16)  # so the fused expert tensors are the largest
    scores, targets = _random_scores(model), _targets(model)
    save_fused(model, tmp_path / "src")
    report = stream_slim(tmp_path / "src", tmp_path / "out", keep_plan(model.config, scores, targets))
    src = {k: v.numel() * v.element_size() for k, v in checkpoint_tensors(tmp_path / "src").items()}
    out = {k: v.numel() * v.element_size() for k, v in checkpoint_tensors(tmp_path / "out").items()}
    largest = max(src, key=src.get)
    assert largest.endswith("gate_up_proj") and report["largest_source_tensor_bytes"] == src[largest]
    assert 0 < report["peak_tensor_bytes"] <= src[largest] + out[largest]
    # the fused tensors were read and written expert by expert: one expert's kept slice at a time
    assert report["peak_tensor_bytes"] == out[largest] // 4 < src[largest]


def test_large_copied_tensors_are_copied_in_chunks(tmp_path, monkeypatch):
    from slimmoe.tasks.slimming import streaming

    model = tiny_model("mixtral")
    scores, targets = _random_scores(model), _targets(model)
    model.save_pretrained(tmp_path / "src")
    monkeypatch.setattr(streaming, "PIECE_BYTES", 1000)  # the embedding [96, 32] goes in 7-row chunks
    reads = []
    real_read = CheckpointTensors.read
    monkeypatch.setattr(CheckpointTensors, "read",
                        lambda self, name, key=None: reads.append(name) or real_read(self, name, key))
    report = stream_slim(tmp_path / "src", tmp_path / "out", keep_plan(model.config, scores, targets))
    assert reads.count("model.embed_tokens.weight") == 14 and reads.count("lm_head.weight") == 14
    assert report["peak_tensor_bytes"] < 96 * 32 * 4
    want = slim_model(model, scores, targets).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_tied_embeddings_write_no_tensor_the_source_lacks(tmp_path):
    model = tiny_model("qwen3_moe", tie_word_embeddings=True)
    scores, targets = _random_scores(model), _targets(model)
    model.save_pretrained(tmp_path / "src")
    assert "lm_head.weight" not in checkpoint_tensors(tmp_path / "src")
    stream_slim(tmp_path / "src", tmp_path / "out", keep_plan(model.config, scores, targets))
    assert sorted(checkpoint_tensors(tmp_path / "out")) == sorted(checkpoint_tensors(tmp_path / "src"))
    slim = slim_model(model, scores, targets).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(3, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, slim(x).logits, rtol=0, atol=1e-6)


def _with_changes(src: Path, out: Path, add: dict | None = None, drop: tuple = ()) -> Path:
    import shutil

    shutil.copytree(src, out)
    tensors = {k: v for k, v in checkpoint_tensors(src).items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("case, match", [
    ("quantized experts", r"model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks \(4, 96, 2, 16\) belongs to layer 0's "
                          r"routed experts, which this cut shrinks, but it is not a tensor"),
    ("missing expert", r"layer 1's routed experts: .*not exactly one complete layout of fused .* or per-expert"),
    ("wrong shape", r"experts\.1\.w1\.weight has shape \(40, 32\) in the checkpoint, but its config\.json implies "
                    r"\(48, 32\)"),
])
def test_a_layout_it_cannot_cut_is_one_clear_error_and_writes_nothing(case, match, tmp_path):
    family = "gpt_oss" if case == "quantized experts" else "mixtral"
    model = tiny_model(family)
    scores, targets = _random_scores(model), _targets(model)
    model.save_pretrained(tmp_path / "src")
    if case == "quantized experts":  # as GPT-OSS ships on the Hub: MXFP4 blocks and scales beside the rest
        changes = {"add": {"model.layers.0.mlp.experts.gate_up_proj_blocks": torch.zeros(4, 96, 2, 16, dtype=torch.uint8)}}
    elif case == "missing expert":
        changes = {"drop": ("model.layers.1.block_sparse_moe.experts.3.w2.weight",)}
    else:
        changes = {"add": {"model.layers.0.block_sparse_moe.experts.1.w1.weight": torch.zeros(40, 32)}}
    src = _with_changes(tmp_path / "src", tmp_path / "bad", **changes)
    with pytest.raises(CheckpointLayoutError, match=match):
        stream_slim(src, tmp_path / "out", keep_plan(model.config, scores, targets))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "src"]


def test_keep_plan_roundtrips_and_refuses_scores_of_another_model(tmp_path):
    model = tiny_model("qwen2_moe")
    scores, targets = _random_scores(model), _targets(model)
    plan = keep_plan(model.config, scores, targets)
    plan.save(tmp_path / "plan.safetensors")
    back = KeepPlan.load(tmp_path / "plan.safetensors")
    assert back.targets == targets
    for kind in ("experts", "shared", "kv_groups"):
        assert sorted(getattr(back, kind)) == sorted(getattr(plan, kind)) == [0, 1]
        assert all(torch.equal(getattr(back, kind)[i], getattr(plan, kind)[i]) for i in (0, 1))
    assert plan.experts[0].shape == (4, 12) and plan.shared[0].shape == (24,) and plan.kv_groups[0].shape == (1,)
    other = tiny_model("qwen2_moe", moe_intermediate_size=32)
    with pytest.raises(ValueError, match=r"layer 0 experts have shape \(4, 32\), but this model needs \(4, 24\)"):
        keep_plan(model.config, _random_scores(other), targets)


def test_cli_slim_with_scores_cuts_without_loading_the_model(tiny_model_dir, tmp_path, monkeypatch):
    from slimmoe.tasks.core.checkpoint import load_model

    teacher = load_model(tiny_model_dir).eval()
    scores = _random_scores(teacher, seed=5)
    scores.method = "taylor"
    scores.save(tmp_path / "scores.safetensors")

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("slimmoe.tasks.nodes.slim.load_model", no_load)
    out = tmp_path / "slim"
    result = runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "24", "--kv-heads", "1",
                                 "--scores", str(tmp_path / "scores.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["scores"] == "taylor" and report["after"]["total"] < report["before"]["total"]
    want = slim_model(teacher, scores, SlimTargets(24, num_key_value_heads=1)).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert (out / "tokenizer.json").exists()
    # without data or scores: magnitudes streamed from the files, the model still never loaded
    result = runner.invoke(app, ["slim", str(tiny_model_dir), str(tmp_path / "mag"), "--expert-size", "24"])
    assert result.exit_code == 0, result.output
    want = slim_model(teacher, magnitude_scores(teacher), SlimTargets(24)).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "mag").state_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_cli_slim_refuses_scores_with_data(tiny_model_dir, tmp_path):
    out = tmp_path / "slim"
    result = runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "24",
                                 "--scores", str(tmp_path / "s.safetensors"), "--data", "x.txt"])
    assert result.exit_code == 2, result.output
    assert "give --scores (cut with saved scores) or --data (score on calibration data), not both" in result.output
    assert "Traceback" not in result.output and not out.exists()
