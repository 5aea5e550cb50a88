"""What slimmoe writes, served: llama.cpp's `convert_hf_to_gguf.py` (from the `llama-cpp-python` sdist on
PyPI, see gguf_client.py) converts the output of every writer slimmoe has, for every family, and every
tensor of the checkpoint must arrive in the GGUF exactly as llama.cpp expects it.

Writers: the ddp/deepspeed stage's final save (`core.checkpoint.save_model_dir`), the fsdp stage's gathered
save (`slimming.fsdp.save_sharded_model`, here at world size 1), streaming surgery (`slimming.streaming.
stream_slim`) and `slimmoe trim` (`nodes.trim.run_trim`, an expert drop). The sources are what transformers'
`save_pretrained` writes (for PhiMoE the class name `PhimoeForCausalLM`, not the Hub's `PhiMoEForCausalLM`,
which llama.cpp's converter and vLLM look up), so each writer must put the Hub name in itself.
A second check per (family, writer) reads the GGUF's hyperparameters as llama.cpp's loader does and
compares the attention shapes it would create with the tensors (gguf_client.llama_cpp_attention_problems).

Tensors and hyperparameters only: the converter is run with `tokenizer.ggml.model = "none"` (llama.cpp's
LLAMA_VOCAB_TYPE_NONE) in place of a vocabulary, because it refuses any BPE tokenizer whose pre-tokenizer
hash is not in its table of known Hub tokenizers, and no tokenizer these tests can build offline matches
one. The tokenizer files a writer copies are checked elsewhere (test_trim, test_streaming_surgery).

The first run downloads the sdist (~76 MB) into ~/.cache/slimmoe-tests/; later runs reuse it offline.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from gguf_client import compare_gguf, convert, expert_count, llama_cpp_attention_problems
from slimmoe.tasks.core.adapters import ADAPTERS, get_adapter
from slimmoe.tasks.core.checkpoint import save_model_dir
from slimmoe.tasks.slimming.config import ModelSizes, SlimTargetError, SlimTargets, check_targets
from slimmoe.tasks.slimming.scores import magnitude_scores
from slimmoe.tasks.slimming.surgery import keep_plan, slim_model
from tiny import FAMILIES, tiny_model

WRITERS = ["ddp", "fsdp", "stream", "trim"]
CASES = [(f, w) for f in FAMILIES for w in WRITERS]  # each its own test id: "phimoe-ddp", ...

# The `architectures` names the families' Hub checkpoints carry, which llama.cpp's converter (and vLLM)
# dispatch on. Written out here rather than read from slimmoe, so the test checks slimmoe against them.
HUB_ARCHITECTURES = {
    "phimoe": "PhiMoEForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}

# Real Phi-3.5-MoE configs carry it and llama.cpp's Phi-3 converter reads it (the rope scaling context).
FAMILY_OVERRIDES = {"phimoe": {"original_max_position_embeddings": 256}}
TRIM_SEQ_LEN = 16


def _targets(model) -> SlimTargets:
    """A real cut: half of every routed expert, one KV group where the family prunes heads, a smaller
    shared expert where it has its own size."""
    adapter = get_adapter(model)
    return SlimTargets(adapter.expert_size(model.config) // 2,
                       num_key_value_heads=1 if adapter.head_pruning else None,
                       shared_expert_intermediate_size=24 if adapter.shared_expert_size_key else None)


def _token_shards(root: Path) -> Path:
    """Calibration tokens for trim as token shards (ids inside the tiny vocabulary): trim needs no
    tokenizer to read them, and the sources have none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slimmoe.tasks.data.formats import TokenShardsManifest

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (4, TRIM_SEQ_LEN), generator=g).tolist()
    pq.write_table(pa.table({"row_id": pa.array(range(len(ids)), pa.int64()),
                             "input_ids": pa.array(ids, pa.list_(pa.int32()))}), root / "part-0.parquet")
    TokenShardsManifest(seq_len=TRIM_SEQ_LEN, rows=len(ids), tokens=len(ids) * TRIM_SEQ_LEN, tokenizer_fingerprint=None,
                        eos_token_id=2, files=[{"path": "part-0.parquet", "rows": len(ids),
                                                "bytes": (root / "part-0.parquet").stat().st_size}]).write(root)
    return root


def _fsdp_saves(sources: dict[str, Path], root: Path, record) -> None:
    """The fsdp stage's build and save, at world size 1. FSDP2's fully_shard needs a process group even
    for one rank (as a one-worker stage has), so this makes a single-process gloo group and tears it
    down again, leaving the test process as it found it."""
    import torch.distributed as dist

    from slimmoe.tasks.slimming.fsdp import save_sharded_model, sharded_model_from

    assert not dist.is_initialized(), "a process group is already up in this test process"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for family, src in sources.items():
            with record(family, "fsdp") as out:
                model = sharded_model_from(src, torch.device("cpu"))
                save_sharded_model(model, out, config_from=src)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every (family, writer) output, converted in one converter process:
    {(family, writer): {"dir", "gguf", "error" (the writer's traceback, if it raised), "convert" (the
    converter's verdict), "cut" (the SlimTargets the writer applied, if any)}}."""
    from contextlib import contextmanager

    from slimmoe.tasks.nodes.trim import run_trim
    from slimmoe.tasks.slimming.streaming import stream_slim
    from slimmoe.tasks.trimming.config import TrimConfig

    root = tmp_path_factory.mktemp("serving")
    outputs: dict[tuple[str, str], dict] = {}
    sources: dict[str, Path] = {}
    cuts: dict[str, SlimTargets] = {}  # the SlimTargets of the ddp and stream cuts

    @contextmanager
    def record(family: str, writer: str):
        # One writer failing must not hide the others: its traceback becomes that test's failure.
        entry = outputs[family, writer] = {
            "dir": root / writer / family, "gguf": root / "gguf" / f"{writer}-{family}.gguf", "error": None,
            "convert": None, "cut": cuts.get(family) if writer in ("ddp", "stream") else None,
            "source": sources.get(family)}
        try:
            yield entry["dir"]
        except Exception:  # noqa: BLE001
            entry["error"] = traceback.format_exc()

    data = _token_shards(root / "tokens")
    trim_cfg = TrimConfig(method="expert-drop", n=1, calibration_batches=1, batch_size=2, seq_len=TRIM_SEQ_LEN)
    for family in FAMILIES:
        model = tiny_model(family, **FAMILY_OVERRIDES.get(family, {}))
        sources[family] = src = root / "src" / family
        model.save_pretrained(src)
        scores = magnitude_scores(model)
        cuts[family] = targets = _targets(model)
        with record(family, "ddp") as out:
            save_model_dir(slim_model(model, scores, targets), out)
        with record(family, "stream") as out:
            stream_slim(src, out, keep_plan(model.config, scores, targets))
        with record(family, "trim") as out:
            run_trim(trim_cfg, src, data, out, log=lambda _m: None)
    _fsdp_saves(sources, root, record)

    written = [e for e in outputs.values() if e["error"] is None]
    verdicts = convert([(e["dir"], e["gguf"]) for e in written])
    for e in written:
        e["convert"] = verdicts[str(e["dir"])]
    return outputs


@pytest.mark.parametrize("family,writer", CASES, ids=[f"{f}-{w}" for f, w in CASES])
def test_llama_cpp_converts_what_slimmoe_writes(served, family, writer):
    entry = served[family, writer]
    if entry["error"] is not None:
        pytest.fail(f"slimmoe's {writer} writer raised for {family}:\n{entry['error']}")
    cfg = json.loads((entry["dir"] / "config.json").read_text())
    # the model converted is the cut one (so the cut shapes are what reaches the GGUF)
    if writer == "trim":
        assert expert_count(cfg) == 3, cfg
    elif entry["cut"] is not None:
        assert cfg[ADAPTERS[family].expert_size_key] == entry["cut"].expert_intermediate_size, cfg

    assert cfg.get("architectures") == [HUB_ARCHITECTURES[family]], \
        f"config.json architectures {cfg.get('architectures')}: serving engines look up {HUB_ARCHITECTURES[family]}"
    verdict = entry["convert"]
    assert verdict["ok"], f"convert_hf_to_gguf.py refused {family} from {writer}: {verdict['error']}\n" \
                          f"{verdict.get('traceback', '')}"

    report = compare_gguf(entry["dir"], entry["gguf"])
    assert report["tokenizer_model"] == "none"  # the converter ran as this test means it to
    assert report["all_exact"], json.dumps(report, indent=1, default=str)
    for key in ("expert_count", "block_count"):
        assert report["metadata"][key]["gguf"] == report["metadata"][key]["config"], (key, report["metadata"])


@pytest.mark.parametrize("family,writer", CASES, ids=[f"{f}-{w}" for f, w in CASES])
def test_llama_cpp_would_load_the_attention_shapes(served, family, writer):
    """The converter copies any shapes; llama.cpp's loader then derives each attention tensor's shape from
    the GGUF's hyperparameters, and some of its architectures fix the query projection at n_embd wide
    (see gguf_client.Q_WIDTH): those families with fewer query heads convert but do not load, and
    slimmoe's serve.llama_cpp rule must say so. A separate test from the conversion, so this verdict
    stands on its own."""
    entry = served[family, writer]
    if entry["error"] is not None or not entry["convert"]["ok"]:
        pytest.fail(f"nothing to load: see test_llama_cpp_converts_what_slimmoe_writes[{family}-{writer}]")
    problems = llama_cpp_attention_problems(entry["gguf"])
    # slimmoe's serve.llama_cpp rule must refuse exactly the cuts llama.cpp would not load (PhiMoE and
    # Qwen2-MoE with fewer query heads) and accept the others.
    refused = None
    if entry["cut"] is not None:
        source = AutoConfig.from_pretrained(entry["source"])  # the uncut model the writer started from
        try:
            check_targets(ModelSizes.of(source), entry["cut"], llama_cpp=True)
        except SlimTargetError as err:
            refused = str(err)
    if refused is None:
        assert not problems, "\n".join(problems[:4])
    else:
        assert problems and "serve.llama_cpp" in refused, (refused, problems)
