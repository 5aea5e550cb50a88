"""lm-eval-harness for real: a local multiple-choice task (a JSONL file and a task YAML in a directory
given as `--lm-eval-include-path`) scored by lm-eval's `hf` model on our checkpoints through
`slimmoe evaluate`, with the Hugging Face Hub and datasets offline.

The task comes twice, with each document's label flipped in the second copy: a model picks one of
the two choices of every document, so the two accuracies add up to exactly 1 only if lm-eval
really scored each document with the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SEQ = 32
DOCS = [  # context, two continuations
    ("def add(a, b):", ["return a + b", "import sys"]),
    ("for i in range(10):", ["print(i)", "class Foo:"]),
    ("import os", ["import sys", "return None"]),
    ("class Foo:", ["pass", "for x in y:"]),
    ("if x is None:", ["raise ValueError", "def f():"]),
    ("with open(path) as f:", ["data = f.read()", "else:"]),
]
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    from tiny import stdlib_texts
    from transformers import AutoTokenizer

    from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
    from slimmoe.tasks.data.shards import write_tokenized_dataset

    root = tmp_path_factory.mktemp("lm_eval")
    tasks = root / "tasks"
    tasks.mkdir()
    for name, flip in (("slimmoe_tiny_mc", 0), ("slimmoe_tiny_mc_flipped", 1)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": q, "choices": c, "label": flip}) + "\n" for q, c in DOCS))
        (tasks / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    stream = [i for text in stdlib_texts(max_files=4) for i in tok(text, add_special_tokens=False)["input_ids"]]
    rows = np.asarray(stream[: 8 * SEQ], dtype=np.int32).reshape(8, SEQ)
    write_tokenized_dataset(root / "tokens", {"train": rows, "validation": rows}, tokenizer_fingerprint(tiny_model_dir),
                            eos_token_id=tok.eos_token_id)
    return {"root": root, "tasks": tasks, "tokens": root / "tokens"}


def _offline_env(root: Path) -> dict:
    # A fresh process reads these at import: nothing may reach the Hub, and the datasets cache is the
    # test's own (the local task's data is still prepared through it).
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                HF_HOME=str(root / "hf_home"), HF_DATASETS_CACHE=str(root / "hf_datasets"))


def _evaluate(model_dir: Path, setup: dict, out: Path, tasks: str) -> dict:
    cmd = [sys.executable, "-m", "slimmoe.workflows.cli", "evaluate", str(model_dir), "--data", str(setup["tokens"]),
           "--device", "cpu", "--max-rows", "4", "--throughput-batch-size", "1", "--throughput-seq-len", "8",
           "--throughput-warmup", "0", "--throughput-repeats", "1", "--out", str(out),
           "--lm-eval-tasks", tasks, "--lm-eval-include-path", str(setup["tasks"]), "--lm-eval-batch-size", "4",
           "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(setup["root"]), timeout=540)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads(res.stdout)  # --json prints the report alone on stdout
    assert report == json.loads((out / "report.json").read_text())
    return report


def _check_pair(lm_eval_report: dict) -> None:
    accs = []
    for name in ("slimmoe_tiny_mc", "slimmoe_tiny_mc_flipped"):
        entry = lm_eval_report[name]
        assert entry["status"] == "ok", entry
        assert entry["metrics"]["sample_len"] == len(DOCS)
        accs.append(entry["metrics"]["acc,none"])
    assert all(0 <= a <= 1 for a in accs)
    assert sum(accs) == pytest.approx(1.0), accs


def test_cli_evaluate_runs_a_local_lm_eval_task_offline(setup, tiny_model_dir, tmp_path):
    # (A task that cannot be found fails the evaluation: tests/test_hardening_inputs.py.)
    report = _evaluate(tiny_model_dir, setup, tmp_path / "eval", "slimmoe_tiny_mc,slimmoe_tiny_mc_flipped")
    _check_pair(report["lm_eval"])
    assert report["perplexity"] > 1 and report["config"]["lm_eval_include_path"] == str(setup["tasks"])


def test_a_quantized_checkpoint_scores_in_lm_evals_hf_model(setup, tiny_model_dir, tmp_path):
    """A packed `slimmoe quantize` output, which `from_pretrained` refuses, is loaded with its packed
    experts and scored by lm-eval's hf model all the same."""
    from transformers import AutoModelForCausalLM

    from slimmoe.tasks.mcmoe.config import QuantizeConfig
    from slimmoe.tasks.mcmoe.packed import is_quantized_checkpoint, save_quantized
    from slimmoe.tasks.mcmoe.pipeline import quantize_model

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (4, 24), generator=g) for _ in range(2)]
    result = quantize_model(model, batches, QuantizeConfig(avg_bits=2.5, group_size=16), log=lambda _m: None)
    out = tmp_path / "quantized"
    out.mkdir()
    save_quantized(model, result.entries, out, torch.float16, {}, tokenizer_from=tiny_model_dir)
    assert is_quantized_checkpoint(out)
    with pytest.raises(OSError):  # what lm-eval's hf model does with the path
        AutoModelForCausalLM.from_pretrained(str(out))

    report = _evaluate(out, setup, tmp_path / "eval", "slimmoe_tiny_mc,slimmoe_tiny_mc_flipped")
    _check_pair(report["lm_eval"])


def test_a_missing_include_path_fails_naming_the_field(tiny_model_dir, tmp_path):
    from slimmoe.tasks.evaluation.config import EvaluateConfig
    from slimmoe.tasks.evaluation.lm_eval import LmEvalTaskError, run_lm_eval_tasks

    cfg = EvaluateConfig(lm_eval_tasks="a,b", lm_eval_include_path=str(tmp_path / "nowhere"))
    with pytest.raises(LmEvalTaskError, match="lm_eval_include_path '.*nowhere' is not a directory") as err:
        run_lm_eval_tasks(tiny_model_dir, cfg, torch.device("cpu"))
    assert err.value.field == "lm_eval_include_path"
