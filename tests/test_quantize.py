"""PMQ: allocation solver, quantizer, packed format and loader, the quantize task and CLI."""

import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from slimmoe.tasks.core.adapters import get_adapter
from slimmoe.tasks.mcmoe.allocation import AllocationError, allocate_bits, budget_total
from slimmoe.tasks.mcmoe.experts import canonical_experts, expert_output
from slimmoe.tasks.mcmoe.packed import WEIGHTS_FILE, QuantizedFormatError, load_quantized, save_quantized
from slimmoe.tasks.mcmoe.packing import pack_codes, unpack_codes
from slimmoe.tasks.mcmoe.quantizer import dequantize_codes, quantize_gptq, quantize_rtn
from slimmoe.tasks.mcmoe.config import QuantizeConfig
from slimmoe.tasks.mcmoe.pipeline import quantize_model
from slimmoe.tasks.nodes.quantize import run_quantize
from tiny import FAMILIES, stdlib_texts, tiny_model, train_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many tiny ops: on a shared 2-core machine two threads are ~10x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- allocation ---------------------------------------------------------------------------------


def _brute_force(costs, cands, avg, constraints, exact):
    n, cap = len(costs), budget_total(avg, len(costs))
    options = []
    for combo in itertools.product(range(len(cands)), repeat=n):
        bits = [cands[j] for j in combo]
        if sum(bits) > cap:
            continue
        if constraints and (max(cands) not in bits or (len(cands) > 1 and sorted(cands)[-2] not in bits)):
            continue
        options.append((sum(bits), sum(costs[e][j] for e, j in enumerate(combo))))
    if not options:
        return None
    if exact:
        top = max(t for t, _ in options)
        options = [o for o in options if o[0] == top]
    return min(c for _, c in options)


def test_allocation_is_optimal_against_brute_force():
    rng = random.Random(0)
    checked = infeasible = 0
    for _ in range(300):
        n = rng.randint(1, 5)
        cands = sorted(rng.sample([1, 2, 3, 4, 6, 8], rng.randint(1, 4)))
        costs = [[rng.random() * rng.choice([1e-3, 1, 100]) for _ in cands] for _ in range(n)]
        avg, constraints, exact = rng.uniform(0.5, 8.5), rng.random() < 0.5, rng.random() < 0.5
        ref = _brute_force(costs, cands, avg, constraints, exact)
        try:
            bits = allocate_bits(costs, cands, avg, constraints, exact)
        except AllocationError:
            assert ref is None
            infeasible += 1
            continue
        assert ref is not None and len(bits) == n and set(bits) <= set(cands)
        got = sum(costs[e][cands.index(b)] for e, b in enumerate(bits))
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-15)
        assert sum(bits) <= budget_total(avg, n)
        if constraints:
            assert max(cands) in bits and (len(cands) == 1 or sorted(cands)[-2] in bits)
        checked += 1
    assert checked > 100 and infeasible > 10


def test_allocation_respects_the_budget_exactly():
    rng = random.Random(1)
    for n in (4, 8, 16, 64):
        costs = [[rng.random() / b for b in (1, 2, 3, 4)] for _ in range(n)]
        bits = allocate_bits(costs, [1, 2, 3, 4], 2.5, paper_constraints=True)
        assert sum(bits) == 2.5 * n  # an exact allocation exists: the average equals the budget
    # 2.5 over 3 experts: 7.5 bits cannot be met, so the average is the largest reachable one below it.
    bits = allocate_bits([[1, 0.5, 0.2, 0.1]] * 3, [1, 2, 3, 4], 2.5, paper_constraints=False)
    assert sum(bits) == 7 and sum(bits) / 3 <= 2.5
    # Only even widths: 3.25 over 4 experts caps at 13 bits, the largest reachable total is 12.
    bits = allocate_bits([[1.0, 0.1]] * 4, [2, 4], 3.25, paper_constraints=False)
    assert sum(bits) == 12
    # Costs that do not fall with more bits: exact mode still spends the budget, the other does not.
    flat = [[1.0, 1.0, 1.0, 1.0]] * 4
    assert sum(allocate_bits(flat, [1, 2, 3, 4], 2.5, paper_constraints=False, exact=True)) == 10
    assert sum(allocate_bits(flat, [1, 2, 3, 4], 2.5, paper_constraints=False, exact=False)) == 4


def test_allocation_infeasible_budget_is_a_clear_error():
    with pytest.raises(AllocationError, match=r"avg_bits=1\.2 is infeasible.*smallest feasible average is 2.25 bits"):
        allocate_bits([[1, 2, 3, 4]] * 4, [1, 2, 3, 4], 1.2, paper_constraints=True)
    with pytest.raises(AllocationError, match="at least 2 experts"):
        allocate_bits([[1, 2]], [2, 4], 4.0, paper_constraints=True)
    with pytest.raises(AllocationError, match="smallest feasible average is 2"):
        allocate_bits([[1, 2]] * 3, [2, 4], 1.5, paper_constraints=False)
    with pytest.raises(ValueError, match="below the smallest candidate"):
        QuantizeConfig(avg_bits=0.5)


# -- packing and the quantizer --------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (7, 45), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, math.ceil(45 / 8) * bits)
    assert torch.equal(unpack_codes(packed, bits, 45), codes.to(torch.uint8))


def _output_error(x, w, wq):
    return float(((x @ (w - wq).transpose(1, 2)) ** 2).sum() / ((x @ w.transpose(1, 2)) ** 2).sum())


def test_gptq_beats_round_to_nearest_at_2_and_3_bits():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g) / 8
    x = torch.randn(3, 400, 64, generator=g) @ mix + 0.2 * torch.randn(3, 400, 64, generator=g)  # correlated inputs
    w = torch.randn(3, 48, 64, generator=g) * 0.05
    h = x.transpose(1, 2) @ x
    for bits in (2, 3):
        c, s, z, grp = quantize_rtn(w, bits, 32)
        rtn = _output_error(x, w, dequantize_codes(c, s, z, grp, 64))
        c, s, z, grp = quantize_gptq(w, h, bits, 32)
        gptq = _output_error(x, w, dequantize_codes(c, s, z, grp, 64))
        assert gptq < 0.8 * rtn, (bits, gptq, rtn)
    c, s, z, grp = quantize_gptq(w, h, 8, 32)
    assert _output_error(x, w, dequantize_codes(c, s, z, grp, 64)) < 1e-4


def test_group_falls_back_for_narrow_and_odd_dimensions():
    w = torch.randn(1, 5, 50)
    c, s, z, grp = quantize_rtn(w, 4, 32)  # 50 columns in groups of 32: the last group is zero-padded
    assert grp == 32 and c.shape == (1, 5, 64) and s.shape == (1, 5, 2)
    assert dequantize_codes(c, s, z, grp, 50).shape == (1, 5, 50)
    c, s, z, grp = quantize_rtn(w, 4, 128)  # narrower than a group: one group per row
    assert grp == 50 and s.shape == (1, 5, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_expert_matches_the_experts_module(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    _, block = next(adapter.moe_blocks(model))
    experts = block.experts
    x = torch.randn(10, model.config.hidden_size)
    n_exp = adapter.num_experts(model.config)
    index = torch.stack([torch.randperm(n_exp)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    with torch.no_grad():
        ref = experts(x, index, weights)
        gu, down = canonical_experts(adapter, experts)
        manual = torch.zeros_like(x)
        for t in range(10):
            for slot in range(2):
                e = int(index[t, slot])
                manual[t] += weights[t, slot] * expert_output(experts, e, x[t:t + 1], gu[e], down[e])[0]
    torch.testing.assert_close(manual, ref, rtol=1e-5, atol=1e-6)


# -- a small trained model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny PhiMoE trained for a few steps on stdlib text (peaked logits, non-trivial routing)."""
    root = tmp_path_factory.mktemp("mcmoe")
    texts = stdlib_texts(max_files=40)
    tok = train_tokenizer(root / "model", texts, vocab_size=320)
    data = root / "data"
    data.mkdir()
    for i, t in enumerate(texts):
        (data / f"doc{i:03d}.txt").write_text(t)
    stream = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    seq = 64
    rows = torch.tensor(stream[: len(stream) // seq * seq]).view(-1, seq)
    torch.manual_seed(0)
    model = tiny_model("phimoe", vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_local_experts=4)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        batch = rows[torch.randint(0, rows.shape[0] - 8, (8,))]
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert float(loss.detach()) < 4.5  # it learned something: uniform over 320 tokens is 5.77
    model.save_pretrained(root / "model")
    return {"model_dir": root / "model", "data": data, "eval_ids": rows[-8:], "root": root, "loss": float(loss.detach())}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _kl(ref_logits, logits):
    p = F.log_softmax(ref_logits, -1)
    return float((p.exp() * (p - F.log_softmax(logits, -1))).sum(-1).mean())


def test_8bit_quantization_is_near_lossless(trained, tmp_path):
    from slimmoe.tasks.core.checkpoint import load_model

    cfg = QuantizeConfig(avg_bits=8, candidate_bits=[8], group_size=64, calibration_batches=4, batch_size=4, seq_len=64)
    metrics = run_quantize(cfg, trained["model_dir"], trained["data"], tmp_path / "q8", log=lambda _m: None)
    assert metrics["avg_bits_experts"] == 8
    original = _logits(load_model(trained["model_dir"]), trained["eval_ids"])
    quantized = _logits(load_quantized(tmp_path / "q8"), trained["eval_ids"])
    kl = _kl(original, quantized)
    assert kl < 1e-3, kl
    print('KL8', kl, 'loss', trained.get('loss'))
    # and 2-bit experts are measurably lossy, so the check above can fail
    cfg2 = cfg.with_changes(avg_bits=2, candidate_bits=[2])
    run_quantize(cfg2, trained["model_dir"], trained["data"], tmp_path / "q2", log=lambda _m: None)
    kl2 = _kl(original, _logits(load_quantized(tmp_path / "q2"), trained["eval_ids"]))
    print('KL2', kl2)
    assert kl2 > 10 * kl


def test_pmq_checkpoint_reloads_with_the_same_logits(trained, tmp_path):
    from slimmoe.tasks.data.calibration import calibration_batches
    from slimmoe.tasks.core.checkpoint import load_model

    cfg = QuantizeConfig(avg_bits=2.5, group_size=32, calibration_batches=4, batch_size=4, seq_len=64)
    model = load_model(trained["model_dir"])
    batches = calibration_batches(trained["data"], 4, 4, 64, tokenizer_dir=trained["model_dir"])
    result = quantize_model(model, batches, cfg, keep_dtype=torch.float16, log=lambda _m: None)
    for layer in result.layers:
        assert sum(layer["bits"]) == 2.5 * len(layer["bits"])  # 4 experts: exactly 10 bits per layer
        assert 4 in layer["bits"] and 3 in layer["bits"]  # paper constraints
        assert sum(layer["freq"]) == pytest.approx(2.0)  # top-2 routing
        for e, n in enumerate(layer["routed"]):
            if n:
                assert layer["loss"]["4"][e] < layer["loss"]["1"][e]
    before = _logits(model, trained["eval_ids"])
    out = tmp_path / "pmq"
    out.mkdir()
    save_quantized(model, result.entries, out, torch.float16, {"method": "gptq"})
    for mode in ("forward", "load"):
        after = _logits(load_quantized(out, dequantize=mode), trained["eval_ids"])
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    qcfg = json.loads((out / "quantization_config.json").read_text())
    bits = {name: meta["bits"] for name, meta in qcfg["tensors"].items()}
    assert bits["model.layers.0.mlp.experts.gate_up_proj"] == result.layers[0]["bits"]


def test_run_quantize_reports_sizes_and_refuses_bad_input(trained, tmp_path):
    cfg = QuantizeConfig(avg_bits=2.5, group_size=32, calibration_batches=2, batch_size=4, seq_len=64)
    out = tmp_path / "q"
    m = run_quantize(cfg, trained["model_dir"], trained["data"], out, log=lambda _m: None)
    assert m["avg_bits_experts"] == 2.5
    assert m["disk_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert m["weights_file_bytes"] == (out / WEIGHTS_FILE).stat().st_size
    assert m["disk_bytes"] < m["original_disk_bytes"]
    assert 2.5 < m["expert_bits_per_weight"] < 4  # 2.5-bit codes + float16 scale/zero per group of 32
    assert m["memory_resident_bytes_16bit"] < m["memory_dequantized_at_load_bytes_16bit"]
    assert (out / "tokenizer.json").exists() and (out / "quantize_report.json").exists()
    # from_pretrained does not silently load random experts from this directory
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)
    # infeasible budget: refused before anything is written
    with pytest.raises(AllocationError, match="infeasible"):
        run_quantize(QuantizeConfig(avg_bits=1.5), trained["model_dir"], trained["data"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FileExistsError):
        run_quantize(cfg, trained["model_dir"], trained["data"], out)
    (out / "quantization_config.json").unlink()
    with pytest.raises(QuantizedFormatError, match="not a complete"):
        load_quantized(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_and_reloads(family, tmp_path):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (4, 24), generator=g) for _ in range(2)]
    cfg = QuantizeConfig(avg_bits=2.5, group_size=16, attention_bits=4, shared_expert_bits=4)
    original = _logits(model, batches[0])
    result = quantize_model(model, batches, cfg, log=lambda _m: None)
    before = _logits(model, batches[0])
    assert not torch.allclose(before, original)  # something was quantized
    kinds = {e.kind for e in result.entries}
    assert kinds == {"experts", "linear"}
    save_quantized(model, result.entries, tmp_path, torch.float16, {})
    after = _logits(load_quantized(tmp_path), batches[0])
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_cli_quantize(trained, tmp_path):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["quantize", str(trained["model_dir"]), str(out), "--avg-bits", "3", "--data",
                              str(trained["data"]), "--calibration-batches", "2", "--seq-len", "64",
                              "--group-size", "32", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["avg_bits_experts"] == 3
    assert (out / "quantization_config.json").exists()
    res = runner.invoke(app, ["quantize", str(trained["model_dir"]), str(tmp_path / "x"), "--avg-bits", "1.2",
                              "--data", str(trained["data"])])
    assert res.exit_code == 2 and "infeasible" in res.output
    assert not (tmp_path / "x").exists()


def test_cli_evaluate_scores_a_quantize_output_through_its_packed_experts(trained, tmp_path):
    """`slimmoe evaluate` on what `slimmoe quantize` wrote: loaded with its packed experts (not as a plain
    checkpoint), perplexity close to the dequantized model's own, fewer bytes than the original."""
    from typer.testing import CliRunner

    from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
    from slimmoe.tasks.data.shards import write_tokenized_dataset
    from slimmoe.workflows.cli import app

    runner = CliRunner()
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(trained["model_dir"]), str(out), "--avg-bits", "3", "--data",
                              str(trained["data"]), "--calibration-batches", "2", "--seq-len", "64", "--group-size", "32"])
    assert res.exit_code == 0, res.output
    ids = trained["eval_ids"].numpy()
    tokens = write_tokenized_dataset(tmp_path / "tokens", {"train": ids, "validation": ids},
                                     tokenizer_fingerprint(trained["model_dir"]), eos_token_id=2)
    assert tokens["splits"]["validation"]["rows"] == len(ids)
    reports = {}
    for name, model_dir in (("original", trained["model_dir"]), ("quantized", out)):
        res = runner.invoke(app, ["evaluate", str(model_dir), "--data", str(tmp_path / "tokens"), "--device", "cpu",
                                  "--out", str(tmp_path / f"eval_{name}"), "--json"])
        assert res.exit_code == 0, res.output
        reports[name] = json.loads(res.output[res.output.index("{"):])
    q, o = reports["quantized"], reports["original"]
    assert q["rows"] == o["rows"] == len(ids)
    assert math.isfinite(q["perplexity"]) and q["perplexity"] != o["perplexity"]  # the quantized weights ran
    assert q["perplexity"] < 1.5 * o["perplexity"]  # 3 bits with GPTQ stays close on this model
    assert q["memory"]["evaluation"]["peak_bytes"] > 0
