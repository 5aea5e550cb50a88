"""Expert trimming: expert drop, layer drop, block drop on tiny models of several families."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimmoe.tasks.core.adapters import UnsupportedOperationError, get_adapter
from slimmoe.tasks.nodes.trim import REPORT_NAME, run_trim
from slimmoe.tasks.trimming.config import TrimConfig
from slimmoe.tasks.trimming.scores import collect_stats
from slimmoe.tasks.trimming.surgery import (
    TrimTargetError, block_drop, check_expert_drop, choose_experts, expert_drop, layer_drop,
)
from tiny import stdlib_texts, tiny_model

torch.manual_seed(0)
BATCHES = [torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
PROBE = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(99))


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reload(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


# -- making structures useless on purpose ----------------------------------------------------------

@torch.no_grad()
def never_route(model, expert: int) -> None:
    """Make `expert` never selected in any MoE layer.

    Routers with a bias get a huge negative bias. Bias-free routers get an input channel that is
    constant and positive: with a LayerNorm that has a bias (PhiMoE), channel 0's weight 0 and
    bias 1; with an RMSNorm, embedding channel 0 set large (it dominates the residual stream, so it
    stays positive after the norm while the other channels keep their spread). The other experts
    ignore that channel and `expert` weights it by -1000."""
    adapter = get_adapter(model)
    for idx, block in adapter.moe_blocks(model):
        router = adapter.router(block)
        if getattr(router, "e_score_correction_bias", None) is not None:
            router.e_score_correction_bias[expert] = -1e4
            continue
        if getattr(router, "bias", None) is not None:
            router.bias[expert] = -1e4
            continue
        norm = model.model.layers[idx].post_attention_layernorm
        if getattr(norm, "bias", None) is not None:
            norm.weight[0], norm.bias[0] = 0.0, 1.0
        else:
            model.model.embed_tokens.weight[:, 0] = 10.0
        router.weight[:, 0] = 0.0
        router.weight[expert, 0] = -1000.0


@torch.no_grad()
def make_moe_block_zero(model, layer: int) -> None:
    """The MoE block of `layer` outputs exactly zero (routed and shared experts)."""
    block = getattr(model.model.layers[layer], get_adapter(model).moe_attr)
    block.experts.down_proj.zero_()
    if getattr(block.experts, "down_proj_bias", None) is not None:
        block.experts.down_proj_bias.zero_()
    shared = get_adapter(model).shared_expert(block)
    if shared is not None:
        shared.down_proj.weight.zero_()


@torch.no_grad()
def make_layer_identity(model, layer: int) -> None:
    """Decoder layer `layer` passes the residual stream through unchanged."""
    attn = model.model.layers[layer].self_attn
    attn.o_proj.weight.zero_()
    if getattr(attn.o_proj, "bias", None) is not None:
        attn.o_proj.bias.zero_()
    make_moe_block_zero(model, layer)


# -- expert drop --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["phimoe", "qwen2_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("score", ["frequency", "reconstruction"])
def test_expert_drop_removes_the_never_routed_expert_first(family, score, tmp_path):
    model = tiny_model(family)
    never_route(model, expert=2)
    stats = collect_stats(model, BATCHES, reconstruction=score == "reconstruction")
    for layer, counts in stats.expert_counts.items():
        assert counts[2] == 0 and counts.sum() == stats.tokens * model.config.num_experts_per_tok, (layer, counts)
    removed = choose_experts(model.config, stats.expert_scores(score), 1)
    assert removed == {0: [2], 1: [2]}
    trimmed = expert_drop(model, removed)
    # The expert never ran and never took routing mass that the others now get: same outputs.
    torch.testing.assert_close(logits(trimmed), logits(model), atol=1e-5, rtol=1e-5)
    loaded = reload(trimmed, tmp_path)
    adapter = get_adapter(loaded)
    assert adapter.num_experts(loaded.config) == 3
    assert adapter.top_k(loaded.config) == 2
    for _, block in adapter.moe_blocks(loaded):
        assert adapter.router(block).weight.shape[0] == 3
        assert block.experts.gate_up_proj.shape[0] == 3 and block.experts.down_proj.shape[0] == 3
        for name, t in adapter.router(block).state_dict().items():  # GPT-OSS bias, DeepSeek correction bias
            assert t.shape[0] == 3, name
    torch.testing.assert_close(logits(loaded), logits(trimmed), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["phimoe", "qwen2_moe"])
def test_dropping_zero_structures_is_the_identity(family):
    model = tiny_model(family, num_hidden_layers=3)
    ref = logits(model)
    blocks = [i for i, _ in get_adapter(model).moe_blocks(model)]
    for trimmed in (expert_drop(model, {i: [] for i in blocks}), block_drop(model, []), layer_drop(model, [])):
        torch.testing.assert_close(logits(trimmed), ref, atol=1e-5, rtol=1e-5)
        assert trimmed.config.num_hidden_layers == 3


def test_expert_drop_keeps_top_k_or_refuses():
    model = tiny_model("phimoe")  # 4 experts, top-2
    check_expert_drop(model.config, 2)
    with pytest.raises(TrimTargetError, match="num_experts_per_tok=2"):
        check_expert_drop(model.config, 3)
    with pytest.raises(TrimTargetError, match="every expert"):
        check_expert_drop(model.config, 4)


def test_deepseek_expert_drop_keeps_routing_groups(tmp_path):
    model = tiny_model("deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)
    never_route(model, expert=5)
    with pytest.raises(TrimTargetError, match="n_group=2"):
        check_expert_drop(model.config, 1)
    stats = collect_stats(model, BATCHES)
    removed = choose_experts(model.config, stats.expert_scores("frequency"), 2)
    for layer_removed in removed.values():  # one from each group of 4, the never-routed one from group 1
        assert 5 in layer_removed and len(layer_removed) == 2 and layer_removed[0] < 4
    trimmed = expert_drop(model, removed)
    loaded = reload(trimmed, tmp_path)
    assert loaded.config.n_routed_experts == 6 and loaded.config.n_group == 2
    torch.testing.assert_close(logits(loaded), logits(trimmed), atol=1e-6, rtol=1e-6)


# -- layer drop ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the zero-width MLP, on reload
def test_layer_drop_removes_the_idle_moe_block_first(tmp_path):
    model = tiny_model("qwen2_moe", num_hidden_layers=3)
    make_moe_block_zero(model, 1)
    stats = collect_stats(model, BATCHES)
    change = stats.moe_change()
    assert change[1] == pytest.approx(0.0, abs=1e-6) and min(change[0], change[2]) > 1e-6
    from slimmoe.tasks.trimming.selection import choose

    removal = choose(TrimConfig(method="layer-drop", n=1), model.config, stats)
    assert removal == {"layers": [1]}
    trimmed = layer_drop(model, removal["layers"])
    torch.testing.assert_close(logits(trimmed), logits(model), atol=1e-5, rtol=1e-5)
    loaded = reload(trimmed, tmp_path)
    assert loaded.config.mlp_only_layers == [1] and loaded.config.intermediate_size == 0
    assert sum(p.numel() for p in loaded.model.layers[1].mlp.parameters()) == 0
    assert [i for i, _ in get_adapter(loaded).moe_blocks(loaded)] == [0, 2]
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["phimoe", "gpt_oss", "deepseek_v3"])
def test_layer_drop_refused_where_the_config_cannot_express_it(family):
    model = tiny_model(family)
    with pytest.raises(UnsupportedOperationError, match=f"{family}.*block-drop"):
        layer_drop(model, [0])


def test_layer_drop_refused_next_to_real_dense_layers():
    model = tiny_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[0])
    with pytest.raises(UnsupportedOperationError, match="dense-MLP layers"):
        layer_drop(model, [1])


# -- block drop ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["phimoe", "qwen2_moe", "gpt_oss"])
def test_block_drop_removes_the_identity_layer_first(family, tmp_path):
    model = tiny_model(family, num_hidden_layers=3)
    make_layer_identity(model, 1)
    stats = collect_stats(model, BATCHES)
    cos = stats.layer_cosine()
    assert cos[1] == pytest.approx(1.0, abs=1e-5) and max(cos[0], cos[2]) < 1 - 1e-4
    from slimmoe.tasks.trimming.selection import choose

    removal = choose(TrimConfig(method="block-drop", n=1), model.config, stats)
    assert removal == {"layers": [1]}
    trimmed = block_drop(model, [1])
    torch.testing.assert_close(logits(trimmed), logits(model), atol=1e-5, rtol=1e-5)
    loaded = reload(trimmed, tmp_path)
    assert loaded.config.num_hidden_layers == 2 and len(loaded.model.layers) == 2
    if family == "gpt_oss":  # per-layer attention kinds follow their layers
        assert loaded.config.layer_types == [model.config.layer_types[0], model.config.layer_types[2]]
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


def test_block_drop_renumbers_per_layer_settings():
    model = tiny_model("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2)  # layers 1, 3 are MoE
    trimmed = block_drop(model, [0])
    assert trimmed.config.decoder_sparse_step == 1 and trimmed.config.mlp_only_layers == [1]
    assert [i for i, _ in get_adapter(trimmed).moe_blocks(trimmed)] == [0, 2]
    ds = tiny_model("deepseek_v3", num_hidden_layers=4, first_k_dense_replace=2)
    assert block_drop(ds, [1]).config.first_k_dense_replace == 1


# -- the task and the CLI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("trim_data")
    (d / "corpus.txt").write_text("\n".join(stdlib_texts(max_files=12)))
    return d / "corpus.txt"


def test_run_trim_writes_a_loadable_checkpoint_and_report(tiny_model_dir, text_data, tmp_path):
    cfg = TrimConfig(method="expert-drop", n=1, expert_score="reconstruction", calibration_batches=2, batch_size=2, seq_len=32)
    out = tmp_path / "out"
    metrics = run_trim(cfg, tiny_model_dir, text_data, out, log=lambda _m: None)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_local_experts == 3
    assert metrics["total_params"] == sum(p.numel() for p in loaded.parameters()) < metrics["before"]["total"]
    assert metrics["calibration"]["tokens"] == 2 * 2 * 32
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["removed"]["experts"].keys() == {"0", "1"} and "Frobenius" in report["note"]
    assert (out / "tokenizer.json").exists()


def test_run_trim_refuses_before_any_work(tiny_model_dir, text_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedOperationError, match="phimoe"):
        run_trim(TrimConfig(method="layer-drop", n=1), tiny_model_dir, text_data, out)
    with pytest.raises(TrimTargetError, match="num_hidden_layers=2"):
        run_trim(TrimConfig(method="block-drop", n=2), tiny_model_dir, text_data, out)
    with pytest.raises(ValueError, match="matches no files"):
        run_trim(TrimConfig(method="block-drop", n=1), tiny_model_dir, tmp_path / "missing", out)
    assert not out.exists()
    # The ranking is still available for a method the architecture cannot express.
    cfg = TrimConfig(method="layer-drop", n=1, scores_only=True, calibration_batches=1, batch_size=1, seq_len=32)
    metrics = run_trim(cfg, tiny_model_dir, text_data, out, log=lambda _m: None)
    assert metrics["scores_only"] and len(metrics["removed"]["layers"]) == 1
    report = json.loads((out / REPORT_NAME).read_text())
    assert sorted(report["scores"]["moe_block_change"]) == ["0", "1"] and report["removed"] == metrics["removed"]
    assert not (out / "config.json").exists()


def test_run_trim_refuses_token_data_of_another_tokenizer(tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    ids = [[5000 + i] * 32 for i in range(4)]  # ids beyond the tiny model's vocabulary
    pq.write_table(pa.table({"row_id": pa.array(range(4), pa.int64()), "input_ids": pa.array(ids, pa.list_(pa.int32()))}),
                   shards / "part-0.parquet")
    from slimmoe.tasks.data.formats import TokenShardsManifest

    TokenShardsManifest(seq_len=32, rows=4, tokens=128, tokenizer_fingerprint="another-tokenizer", eos_token_id=2,
                        files=[{"path": "part-0.parquet", "rows": 4,
                                "bytes": (shards / "part-0.parquet").stat().st_size}]).write(shards)
    cfg = TrimConfig(method="block-drop", n=1, calibration_batches=1, batch_size=2, seq_len=32)
    with pytest.raises(ValueError, match="another tokenizer"):
        run_trim(cfg, tiny_model_dir, shards, tmp_path / "a")
    with pytest.raises(ValueError, match="beyond the model's vocab_size"):
        run_trim(cfg.with_changes(check_tokenizer=False), tiny_model_dir, shards, tmp_path / "b", log=lambda _m: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_trim(tiny_model_dir, text_data, tmp_path):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app

    out = tmp_path / "cli_out"
    args = ["trim", str(tiny_model_dir), str(out), "--method", "block-drop", "--n", "1", "--data", str(text_data),
            "--calibration-batches", "1", "--batch-size", "1", "--seq-len", "32", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # progress bars go to stderr; stdout is the JSON alone
    assert report["after"]["total"] < report["before"]["total"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    bad_args = ["trim", str(tiny_model_dir), str(tmp_path / "refused"), "--method", "layer-drop"] + args[5:]
    bad = CliRunner().invoke(app, bad_args)
    assert bad.exit_code == 2 and "block-drop" in bad.output
