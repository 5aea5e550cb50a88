"""ODP: online dynamic pruning of the second expert, with protected tokens and calibrated betas."""

import pytest
import torch

from slimmoe.tasks.core.adapters import get_adapter
from slimmoe.tasks.mcmoe.odp import apply_dynamic_pruning, calibrate_betas
from tiny import FAMILIES, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(seed, batch=2, seq=64):
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _first(store, key, value):
    """Keep the first value seen under `key`; returns None so a forward hook leaves outputs alone."""
    store.setdefault(key, value)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_beta_zero_is_the_identity(family):
    model = tiny_model(family)
    ids = _ids(0)
    impl = model.config._attn_implementation
    reference = _logits(model, ids)
    model.set_attn_implementation("eager")
    eager = _logits(model, ids)
    model.set_attn_implementation(impl)
    handle = apply_dynamic_pruning(model, beta=0.0)
    out = _logits(model, ids)
    stats = handle.stats()
    handle.remove()
    assert torch.equal(out, eager)  # bit for bit the unpruned model (protection runs on eager attention)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    assert stats["share"] == 0 and stats["pruned_calls"] == 0 and stats["expert_calls"] == 2 * ids.numel() * len(stats["per_layer"])
    assert model.config._attn_implementation == impl  # restored
    assert torch.equal(_logits(model, ids), reference)


def _expected_protected(model, ids, protect_top):
    """Top `protect_top` tokens per sequence by attention received x L1 norm of the MoE input,
    computed independently from output_attentions and a pre-hook on each MoE block."""
    adapter = get_adapter(model)
    blocks = list(adapter.moe_blocks(model))
    inputs = {}
    handles = [block.register_forward_pre_hook(lambda m, a, i=idx: inputs.__setitem__(i, a[0].detach()))
               for idx, block in blocks]
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    model.set_attn_implementation(impl)
    for h in handles:
        h.remove()
    out = {}
    n = int(protect_top * ids.shape[1])
    for idx, _ in blocks:
        received = attentions[idx].sum(dim=2).mean(dim=1)
        importance = received * inputs[idx].abs().sum(-1)
        mask = torch.zeros_like(importance, dtype=torch.bool)
        mask.scatter_(1, importance.topk(n, dim=1).indices, True)
        out[idx] = mask.reshape(-1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_large_beta_prunes_every_second_expert_except_protected_tokens(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = _ids(1)
    protect_top = 0.05  # 3 of 64 tokens per sequence
    expected = _expected_protected(model, ids, protect_top)
    handle = apply_dynamic_pruning(model, beta=1e6, protect_top=protect_top)
    seen = {}
    hooks = [adapter.router(block).register_forward_hook(lambda m, a, o, i=idx: seen.__setitem__(i, o[1].detach()))
             for idx, block in adapter.moe_blocks(model)]
    _logits(model, ids)
    stats = handle.stats()
    for h in hooks:
        h.remove()
    handle.remove()
    n_tokens = ids.numel()
    for idx, weights in seen.items():
        kept = (weights != 0).sum(dim=-1)
        assert torch.equal(kept == 2, expected[idx]), f"layer {idx}: the protected tokens are not the ones kept whole"
        assert bool((kept >= 1).all())
    n_protected = int(sum(m.sum() for m in expected.values()))
    assert n_protected == 2 * 3 * len(seen)
    assert stats["protected_tokens"] == n_protected
    assert stats["pruned_calls"] == len(seen) * n_tokens - n_protected
    assert stats["share"] == pytest.approx((len(seen) * n_tokens - n_protected) / (2 * n_tokens * len(seen)))


@pytest.mark.parametrize("family", ["phimoe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_dropping_removes_exactly_the_second_experts_term(family):
    """Without protection, the block output changes by exactly the dropped experts' weighted outputs;
    the kept expert's weight is not renormalised (PhiMoE's sparsemixer included)."""
    from slimmoe.tasks.mcmoe.experts import canonical_experts, expert_output

    model = tiny_model(family)
    adapter = get_adapter(model)
    idx, block = next(adapter.moe_blocks(model))
    ids = _ids(2, batch=1, seq=32)
    record = {}

    def grab(name):
        def hook(m, a, o):
            record[name] = o[0] if isinstance(o, tuple) else o
        return hook

    router_out = {}
    h1 = adapter.router(block).register_forward_hook(lambda m, a, o: _first(router_out, "x", (a[0], o)))
    h2 = block.register_forward_hook(grab("full"))
    _logits(model, ids)
    h2.remove()
    handle = apply_dynamic_pruning(model, beta=1e6, protect_top=0.0)
    h3 = block.register_forward_hook(grab("pruned"))
    _logits(model, ids)
    h3.remove()
    h1.remove()
    handle.remove()
    x, (logits, weights, index) = router_out["x"]
    x = x.reshape(-1, x.shape[-1])
    if family == "phimoe":
        score = torch.softmax(logits.float(), -1).gather(1, index)
    else:
        score = weights.float()
    top = score.argmax(dim=-1)
    gu, down = canonical_experts(adapter, block.experts)
    dropped = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(x.shape[0]):
            for slot in range(index.shape[1]):
                if slot != int(top[t]):
                    e = int(index[t, slot])
                    dropped[t] += weights[t, slot] * expert_output(block.experts, e, x[t:t + 1], gu[e], down[e])[0]
    diff = (record["full"] - record["pruned"]).reshape(-1, x.shape[-1])
    torch.testing.assert_close(diff, dropped, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["phimoe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_calibrated_betas_reach_the_target_share(family):
    model = tiny_model(family)
    batches = [_ids(10 + i, batch=2, seq=64) for i in range(3)]
    target = 0.15
    betas = calibrate_betas(model, batches, target)
    assert len(betas) == 2 and all(0 < b <= 1 for b in betas)
    handle = apply_dynamic_pruning(model, per_layer_betas=betas)
    for b in batches:
        _logits(model, b)
    stats = handle.stats()
    handle.remove()
    calls = stats["per_layer"][0]["expert_calls"]
    for layer in stats["per_layer"]:
        assert abs(layer["share"] - target) <= 1 / calls + 1e-12, layer
    assert stats["score"] == ("probs" if family == "phimoe" else "weights")
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_betas(model, batches, 0.6)  # top-2: at most half the calls can go


def test_phimoe_sparsemixer_weights_cannot_rank_tokens():
    """Why PhiMoE's rule uses softmax(router logits): its output multipliers are almost all 1.0."""
    model = tiny_model("phimoe", num_local_experts=8)
    adapter = get_adapter(model)
    _, block = next(adapter.moe_blocks(model))
    out = {}
    h = adapter.router(block).register_forward_hook(lambda m, a, o: _first(out, "w", o[1].detach()))
    _logits(model, _ids(3, batch=4))
    h.remove()
    w = out["w"]
    assert float((w[:, 1] == w[:, 0]).float().mean()) > 0.5


def test_renormalize_keeps_the_weight_sum_and_errors_are_clear():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    _, block = next(adapter.moe_blocks(model))
    seen = {}
    handle = apply_dynamic_pruning(model, beta=1e6, protect_top=0.0, renormalize=True)
    h = adapter.router(block).register_forward_hook(lambda m, a, o: _first(seen, "w", o[1].detach()))
    _logits(model, _ids(4))
    h.remove()
    handle.remove()
    torch.testing.assert_close(seen["w"].sum(-1), torch.ones(seen["w"].shape[0]))  # Mixtral renormalises top-2
    assert bool(((seen["w"] != 0).sum(-1) == 1).all())
    with pytest.raises(ValueError, match="per_layer_betas has 3 values"):
        apply_dynamic_pruning(model, per_layer_betas=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="exactly one"):
        apply_dynamic_pruning(model)
    assert model.config._attn_implementation == "sdpa"  # refused calls leave the model untouched


def test_odp_stacks_on_a_quantized_checkpoint(tmp_path):
    from slimmoe.tasks.mcmoe.packed import load_quantized, save_quantized
    from slimmoe.tasks.mcmoe.config import QuantizeConfig
    from slimmoe.tasks.mcmoe.pipeline import quantize_model

    model = tiny_model("phimoe")
    batches = [_ids(20 + i, batch=2, seq=32) for i in range(2)]
    result = quantize_model(model, batches, QuantizeConfig(avg_bits=3, group_size=16), log=lambda _m: None)
    save_quantized(model, result.entries, tmp_path, torch.float16, {})
    quantized = load_quantized(tmp_path)
    betas = calibrate_betas(quantized, batches, 0.15)
    handle = apply_dynamic_pruning(quantized, per_layer_betas=betas)
    for b in batches:
        _logits(quantized, b)
    share = handle.stats()["share"]
    handle.remove()
    assert share == pytest.approx(0.15, abs=2 / (2 * 64))
