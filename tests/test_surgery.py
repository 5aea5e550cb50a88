"""Model adapters, Taylor scoring and slimming surgery across the covered MoE families."""

import json

from dataclasses import asdict

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from slimmoe.tasks.core.adapters import UnsupportedModelError, UnsupportedOperationError, get_adapter
from slimmoe.tasks.slimming.losses import next_token_loss
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.slimming.scores import Scores, magnitude_scores, taylor_scores
from slimmoe.tasks.slimming.scores import next_token_score_loss
from slimmoe.tasks.nodes.slim import run_slim
from slimmoe.tasks.slimming.config import SlimConfig
from slimmoe.tasks.slimming.config import SlimTargetError, SlimTargets
from slimmoe.tasks.slimming.surgery import slim_model
from tiny import FAMILIES, HEAD_PRUNABLE, stdlib_texts, tiny_model, train_tokenizer

VOCAB = 96


def _inputs(seed=1, batch=2, length=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _half_targets(model):
    adapter = get_adapter(model)
    return SlimTargets(
        expert_intermediate_size=adapter.expert_size(model.config) // 2,
        num_key_value_heads=1 if adapter.head_pruning else None,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_identity(family):
    model = tiny_model(family, vocab_size=VOCAB)
    scores = taylor_scores(model, [_inputs(2)], next_token_score_loss)
    adapter = get_adapter(model)
    keep_all = SlimTargets(expert_intermediate_size=adapter.expert_size(model.config),
                           num_key_value_heads=model.config.num_key_value_heads if adapter.head_pruning else None)
    same = slim_model(model, scores, keep_all, strict=False).eval()
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(same(x).logits, model(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_slimmed_checkpoint_reloads_with_plain_from_pretrained(family, tmp_path):
    model = tiny_model(family, vocab_size=VOCAB)
    targets = _half_targets(model)
    slim = slim_model(model, magnitude_scores(model), targets).eval()
    x = _inputs()
    with torch.no_grad():
        before = slim(x).logits
    slim.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    adapter = get_adapter(model)
    assert cfg[adapter.expert_size_key] == targets.expert_intermediate_size
    assert "auto_map" not in cfg
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, before, atol=1e-5, rtol=0)
    for block in (b for _, b in adapter.moe_blocks(reloaded)):
        assert block.experts.down_proj.shape[adapter.down_axis()] == targets.expert_intermediate_size
    if targets.num_key_value_heads:
        assert reloaded.config.num_key_value_heads == 1
        assert reloaded.config.num_attention_heads == model.config.num_attention_heads // 2


def _zero_expert_neurons(model, adapter, layer, expert, neurons):
    block = dict(adapter.moe_blocks(model))[layer]
    inter = adapter.expert_size(model.config)
    rows = adapter.neuron_rows(torch.tensor(neurons), inter)
    with torch.no_grad():
        gu, down = block.experts.gate_up_proj, block.experts.down_proj
        if adapter.transposed_experts:
            gu[expert][:, rows] = 0
            down[expert][neurons, :] = 0
        else:
            gu[expert][rows, :] = 0
            down[expert][:, neurons] = 0


@pytest.mark.parametrize("family", ["phimoe", "qwen2_moe", "gpt_oss"])
def test_zeroed_neurons_score_zero_and_are_pruned_first(family):
    model = tiny_model(family, vocab_size=VOCAB)
    adapter = get_adapter(model)
    dead = [1, 5, 7]
    if getattr(model.model.layers[0].mlp.experts, "gate_up_proj_bias", None) is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.experts.gate_up_proj_bias.zero_()
    _zero_expert_neurons(model, adapter, layer=0, expert=2, neurons=dead)
    scores = taylor_scores(model, [_inputs(s) for s in range(3)], next_token_score_loss)
    s = scores.experts[0][2]
    assert torch.all(s[dead] == 0)
    alive = torch.ones_like(s, dtype=torch.bool)
    alive[dead] = False
    assert torch.all(s[alive] > 0)
    inter = adapter.expert_size(model.config)
    slim = slim_model(model, scores, SlimTargets(expert_intermediate_size=inter - len(dead)))
    # The surviving expert 2 of layer 0 must be exactly the live neurons of the original.
    kept = dict(adapter.moe_blocks(slim))[0].experts.down_proj[2]
    orig = dict(adapter.moe_blocks(model))[0].experts.down_proj[2]
    axis = adapter.down_axis() - 1
    torch.testing.assert_close(kept, orig.index_select(axis, alive.nonzero().squeeze(1)))


def test_scores_are_deterministic_and_accumulate_over_batches():
    model = tiny_model("mixtral", vocab_size=VOCAB)
    batches = [_inputs(s) for s in range(2)]
    a = taylor_scores(model, batches, next_token_score_loss)
    b = taylor_scores(model, batches, next_token_score_loss)
    one = taylor_scores(model, batches[:1], next_token_score_loss)
    assert torch.equal(a.flat(), b.flat())
    assert a.batches == 2 and one.batches == 1
    assert torch.all(a.flat() >= one.flat())
    assert a.flat().dtype == torch.float32


def test_scores_roundtrip_through_safetensors(tmp_path):
    model = tiny_model("qwen2_moe", vocab_size=VOCAB)
    scores = taylor_scores(model, [_inputs()], next_token_score_loss)
    scores.save(tmp_path / "scores.safetensors")
    back = Scores.load(tmp_path / "scores.safetensors")
    assert torch.equal(back.flat(), scores.flat()) and back.batches == 1 and set(back.shared) == {0, 1}


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny PhiMoE trained 100 steps on standard-library source, so that its neurons differ in
    importance, plus held-out batches (at 100 steps Taylor-pruning beats every random cut by about twice
    the spread of the random cuts' losses, as at 250)."""
    texts = stdlib_texts(max_files=60, max_chars=6000)
    tok = train_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=320)
    ids = []
    for t in texts:
        ids.extend(tok(t)["input_ids"] + [tok.eos_token_id])
    data = torch.tensor(ids[: (len(ids) // 64) * 64]).view(-1, 64)
    train, held = data[:-24], data[-24:]
    torch.manual_seed(0)
    model = tiny_model("phimoe", vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_local_experts=4)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(100):
        batch = train[torch.randint(0, len(train), (16,), generator=g)]
        loss = next_token_loss(model(input_ids=batch).logits, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return model, train[:64], held


def _held_loss(model, held):
    with torch.no_grad():
        return float(next_token_loss(model(input_ids=held).logits, held))


def test_taylor_pruning_beats_random_pruning(trained_tiny):
    model, calib, held = trained_tiny
    base = _held_loss(model, held)
    scores = taylor_scores(model, calib.split(16), next_token_score_loss, with_heads=False)
    target = SlimTargets(expert_intermediate_size=16)
    by_score = _held_loss(slim_model(model, scores, target), held)
    random_losses = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        rand = Scores(experts={k: torch.rand(v.shape, generator=g) for k, v in scores.experts.items()})
        random_losses.append(_held_loss(slim_model(model, rand, target), held))
    assert base < by_score, "pruning 75% of expert width must cost something"
    assert by_score < min(random_losses), (by_score, random_losses)


@pytest.mark.parametrize(
    "targets, match",
    [
        (SlimTargets(expert_intermediate_size=48), "not smaller"),
        (SlimTargets(expert_intermediate_size=64), "not smaller"),
        (SlimTargets(expert_intermediate_size=0), "positive"),
        (SlimTargets(expert_intermediate_size=24, num_key_value_heads=0), "positive"),
        (SlimTargets(expert_intermediate_size=24, num_key_value_heads=3), "larger than"),
    ],
)
def test_bad_targets_fail_clearly_and_write_nothing(tmp_path, targets, match):
    src = tmp_path / "src"
    tiny_model("phimoe", vocab_size=VOCAB).save_pretrained(src)
    out = tmp_path / "out"
    with pytest.raises(SlimTargetError, match=match):
        # model_construct: run_slim's own check, not the schema's (which refuses 0 already)
        run_slim(SlimConfig.model_construct(**asdict(targets)), src, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_heads_not_dividing_evenly_fail_clearly():
    model = tiny_model("phimoe", vocab_size=VOCAB, num_attention_heads=6, num_key_value_heads=4, hidden_size=48)
    with pytest.raises(SlimTargetError, match="not a multiple"):
        slim_model(model, magnitude_scores(model, with_heads=False), SlimTargets(24, num_key_value_heads=2))


@pytest.mark.parametrize("family", ["deepseek_v3", "olmoe"])
def test_head_pruning_refused_where_it_cannot_be_expressed(family):
    model = tiny_model(family, vocab_size=VOCAB)
    with pytest.raises(UnsupportedOperationError, match="not supported"):
        slim_model(model, magnitude_scores(model), SlimTargets(12, num_key_value_heads=1))


def test_unknown_and_dense_architectures_name_the_supported_ones():
    llama = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match="phimoe.*qwen3_moe"):
        get_adapter(llama)


def test_parameter_counts_match_a_hand_count():
    model = tiny_model("phimoe", vocab_size=VOCAB)
    c = count_parameters(model)
    h, i, e, k, layers, v = 32, 48, 4, 2, 2, VOCAB
    head_dim, n_q, n_kv = 8, 4, 2
    attn = h * n_q * head_dim * 2 + h * n_kv * head_dim * 2  # q, o + k, v (no biases in this config)
    experts = e * (2 * i * h + h * i)
    per_layer = attn + h * e + experts + 4 * h  # + router, two LayerNorms with bias
    total = v * h * 2 + layers * per_layer + 2 * h
    assert c["total"] == total
    assert c["active"] == total - layers * experts * (e - k) // e
    assert c["embedding"] == 2 * v * h


def test_parameter_counts_drop_after_slimming():
    model = tiny_model("qwen2_moe", vocab_size=VOCAB)
    slim = slim_model(model, magnitude_scores(model), SlimTargets(12, num_key_value_heads=1))
    before, after = count_parameters(model), count_parameters(slim)
    assert after["routed_experts"] == before["routed_experts"] // 2
    assert after["total"] < before["total"] and after["active"] < before["active"]


@pytest.mark.parametrize("family", HEAD_PRUNABLE)
def test_a_silenced_kv_group_scores_zero_and_pruning_it_leaves_the_logits_unchanged(family):
    """Through `_slice_attention`: the o_proj columns of KV group 0's query heads are zeroed in every
    layer, so the group contributes nothing; its Taylor score must be 0, it must be the group cut, and
    the slimmed model must compute what the original did."""
    model = tiny_model(family, vocab_size=VOCAB).eval()
    adapter = get_adapter(model)
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim, group = adapter.head_dim(model.config), n_heads // n_kv
    with torch.no_grad():
        for layer in adapter.decoder_layers(model):
            adapter.attention(layer).o_proj.weight[:, : group * head_dim] = 0
    scores = taylor_scores(model, [_inputs(s) for s in range(2)], next_token_score_loss)
    for layer_scores in scores.kv_groups.values():
        assert layer_scores[0] == 0 and torch.all(layer_scores[1:] > 0)
    slim = slim_model(model, scores, SlimTargets(expert_intermediate_size=adapter.expert_size(model.config),
                                                 num_key_value_heads=n_kv - 1), strict=False).eval()
    assert slim.config.num_key_value_heads == n_kv - 1 and slim.config.num_attention_heads == n_heads - group
    ids = _inputs(7)
    with torch.no_grad():
        torch.testing.assert_close(slim(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
