"""llama.cpp's `convert_hf_to_gguf.py` as a real client of the checkpoints slimmoe writes (a test helper).

- `converter_dir()` fetches the converter the way a user would: the `llama-cpp-python` source
  distribution from PyPI (`pip download`, pinned version and sha256), of which only
  `vendor/llama.cpp/convert_hf_to_gguf.py`, `conversion/` and `gguf-py/gguf/` are extracted, once, under
  `~/.cache/slimmoe-tests/` (override: SLIMMOE_TESTS_CACHE). Nothing is built or installed.
- `convert(jobs)` runs the converter on many model directories in ONE subprocess of this interpreter
  (importing torch and the converter costs seconds; each tiny conversion then costs milliseconds), with
  `--outtype f32` so that every tensor can be compared bit for bit, and in "none" vocab mode: see
  WRAPPER. Returns each directory's verdict.
- `compare_gguf(model_dir, gguf_path)` maps every safetensors tensor of the directory to the GGUF tensor
  llama.cpp should have made of it (names, and the transforms its converter applies per family) and
  compares them exactly, reading the GGUF with the converter's own vendored `gguf.GGUFReader`.
- `llama_cpp_attention_problems(gguf_path)` compares the attention tensors with the shapes llama.cpp's
  loader would create from the GGUF's hyperparameters (the converter itself copies any shape).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
# sha256 of the PyPI sdist, computed when this was pinned: a changed or corrupted download is refused.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# What the converter needs, relative to the sdist's vendor/llama.cpp/ (it puts its own gguf-py/ first on
# sys.path; the older `gguf` wheel on PyPI does not match this converter).
SDIST_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


def cache_root() -> Path:
    return Path(os.environ.get("SLIMMOE_TESTS_CACHE", Path.home() / ".cache" / "slimmoe-tests"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_sdist(cache: Path) -> Path:
    """The pinned sdist, downloaded by pip on first use only (a cached file with the right hash is reused
    without asking the index)."""
    downloads = cache / "downloads"
    sdist = downloads / SDIST_NAME
    if sdist.is_file() and _sha256(sdist) == SDIST_SHA256:
        return sdist
    downloads.mkdir(parents=True, exist_ok=True)
    # into a directory of this process's own, moved into place once verified: two test runs starting at
    # once never see each other's half-written file
    tmp = Path(tempfile.mkdtemp(prefix="pip-download.", dir=downloads))
    try:
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
               "--no-binary", ":all:", "--disable-pip-version-check", "-d", str(tmp)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if p.returncode != 0 or not (tmp / SDIST_NAME).is_file():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {p.returncode}); the serving tests need llama.cpp's "
                               f"converter from PyPI:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        got = _sha256(tmp / SDIST_NAME)
        if got != SDIST_SHA256:
            raise RuntimeError(f"{SDIST_NAME} from PyPI has sha256 {got}, pinned {SDIST_SHA256}; refusing it")
        os.replace(tmp / SDIST_NAME, sdist)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sdist


def _extract(sdist: Path, dest: Path) -> None:
    """Only the NEEDED members, renamed to sit directly under `dest`; every name is checked to stay inside
    it (no absolute paths, no `..`), and links and special files are refused."""
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tf:
            members = []
            for m in tf.getmembers():
                if not m.name.startswith(SDIST_PREFIX):
                    continue
                rel = m.name[len(SDIST_PREFIX):]
                if not rel.startswith(NEEDED) or "/__pycache__/" in rel:
                    continue
                target = (tmp / rel).resolve()
                if rel.startswith("/") or ".." in Path(rel).parts or not target.is_relative_to(tmp.resolve()):
                    raise RuntimeError(f"{sdist}: member {m.name!r} would land outside {dest}")
                if not (m.isfile() or m.isdir()):
                    raise RuntimeError(f"{sdist}: member {m.name!r} is a link or special file")
                m.name = rel
                members.append(m)
            # filter="data" is tarfile's own guard against the same (and strips modes it should not set).
            tf.extractall(tmp, members=members, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file() or not (tmp / "gguf-py" / "gguf" / "gguf_reader.py").is_file():
            raise RuntimeError(f"{sdist} does not hold vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py/")
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise stay on the cache directory
        try:
            tmp.rename(dest)  # atomic: a half-extracted tree is never taken for the converter
        except OSError:
            if not (dest / "convert_hf_to_gguf.py").is_file():  # else another test run got there first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Runs in the subprocess: llama.cpp's own main() once per job, the job's outcome appended to a JSON-lines
# file (a crash mid-way keeps the verdicts already written).
#
# "none" vocab mode: the converter has no switch to skip the vocabulary, and it refuses a BPE tokenizer
# whose pre-tokenizer hash is not in its table of known Hub tokenizers; no tokenizer these tests can build
# offline is in it. So each model's set_vocab is replaced by the converter's own `_set_vocab_none`
# (`tokenizer.ggml.model = "none"`, which llama.cpp loads as LLAMA_VOCAB_TYPE_NONE): the GGUF holds the
# model's tensors and hyperparameters, which is what slimmoe changes, and no tokenizer.
WRAPPER = r'''
import json, logging, sys, time, traceback
from pathlib import Path

llama_dir, jobs_file, results_file = sys.argv[1:4]
sys.path.insert(0, llama_dir)
import convert_hf_to_gguf  # puts llama.cpp's own gguf-py first on sys.path
from conversion import base

_prepare_metadata = base.TextModel.prepare_metadata

def prepare_metadata(self, vocab_only):
    self.set_vocab = self._set_vocab_none  # an instance attribute beats every family's set_vocab
    return _prepare_metadata(self, vocab_only)

base.TextModel.prepare_metadata = prepare_metadata


class Errors(logging.Handler):  # the converter logs why before it calls sys.exit(1)
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


for job in json.loads(Path(jobs_file).read_text()):
    errors = Errors()
    logging.getLogger().addHandler(errors)
    sys.argv = ["convert_hf_to_gguf.py", job["model_dir"], "--outtype", "f32", "--outfile", job["outfile"]]
    result = {"model_dir": job["model_dir"], "ok": True, "error": None}
    t0 = time.perf_counter()
    try:
        convert_hf_to_gguf.main()
    except SystemExit as e:
        if e.code not in (0, None):
            result.update(ok=False, error=f"exit {e.code}: " + " | ".join(errors.messages))
    except BaseException as e:
        result.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=-6))
    finally:
        logging.getLogger().removeHandler(errors)
    if result["ok"] and not Path(job["outfile"]).is_file():
        result.update(ok=False, error="the converter returned but wrote no file")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    with open(results_file, "a") as f:
        f.write(json.dumps(result) + "\n")
'''


def converter_dir() -> Path:
    """The extracted converter (downloaded and extracted on first use), with the WRAPPER next to it."""
    cache = cache_root()
    dest = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if not (dest / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _extract(_download_sdist(cache), dest)
    wrapper = cache / f"run_convert-{LLAMA_CPP_PYTHON}.py"
    if not wrapper.is_file() or wrapper.read_text() != WRAPPER:
        tmp = wrapper.with_name(f"{wrapper.name}.{os.getpid()}.tmp")
        tmp.write_text(WRAPPER)
        tmp.replace(wrapper)
    return dest


def convert(jobs: list[tuple[Path, Path]], timeout: float = 600) -> dict[str, dict]:
    """Convert every (model_dir, gguf_path) in one subprocess. Returns {str(model_dir): {"ok", "error", ...}};
    a directory the process never reached (it crashed) gets ok=False and the end of its stderr."""
    llama_dir = converter_dir()
    wrapper = cache_root() / f"run_convert-{LLAMA_CPP_PYTHON}.py"
    work = Path(tempfile.mkdtemp(prefix="gguf_convert."))
    try:
        jobs_file, results_file = work / "jobs.json", work / "results.jsonl"
        jobs_file.write_text(json.dumps([{"model_dir": str(d), "outfile": str(g)} for d, g in jobs]))
        for _, g in jobs:
            Path(g).parent.mkdir(parents=True, exist_ok=True)
        # Offline (nothing in "none" mode should reach the Hub), one thread (2-core CI machines).
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("NO_LOCAL_GGUF", None)  # would make the converter use an installed gguf instead of its own
        p = subprocess.run([sys.executable, str(wrapper), str(llama_dir), str(jobs_file), str(results_file)],
                           env=env, capture_output=True, text=True, timeout=timeout)
        lines = results_file.read_text().splitlines() if results_file.is_file() else []
        results = {r["model_dir"]: r for r in map(json.loads, lines)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for d, _ in jobs:
        results.setdefault(str(d), {"model_dir": str(d), "ok": False,
                                    "error": f"no verdict: the converter process exited {p.returncode} before it; "
                                             f"stderr ends:\n{p.stderr[-3000:]}"})
    return results


# -- reading the GGUF -------------------------------------------------------------------------------------

def _gguf_module():
    """The converter's vendored gguf-py, imported as `gguf` (its modules import `gguf.constants` by that
    name). Only this test helper imports it, so there is no other `gguf` to clash with; sys.path is restored
    once it is in sys.modules."""
    mod = sys.modules.get("gguf")
    path = str(converter_dir() / "gguf-py")
    if mod is not None:
        if not str(Path(mod.__file__).resolve()).startswith(str(Path(path).resolve())):
            raise RuntimeError(f"another `gguf` package is already imported ({mod.__file__}); "
                               f"the serving tests read GGUF files with llama.cpp's own, from {path}")
        return mod
    sys.path.insert(0, path)
    try:
        return importlib.import_module("gguf")
    finally:
        sys.path.remove(path)


# -- HF tensor -> GGUF tensor ---------------------------------------------------------------------------
# llama.cpp's names (gguf-py/gguf/tensor_mapping.py) for the HF modules, per block "blk.{b}."
ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
        "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
        "q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b",
        "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm"}
FFN = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",  # Qwen, OLMoE, DeepSeek
       "w1": "gate", "w3": "up", "w2": "down"}  # Mixtral, PhiMoE (block_sparse_moe)
ROUTERS = ("mlp.gate", "block_sparse_moe.gate", "mlp.router")
EXPERTS = ("mlp.experts", "block_sparse_moe.experts")


def _llama_permute(w, n_head: int):
    """What llama.cpp's LLAMA converter does to Mixtral's q/k rows: HF's rotate-half (NeoX) layout ->
    interleaved pairs (GPT-J), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_gguf(cfg: dict, hf: dict) -> tuple[dict, list[str]]:
    """{GGUF name: the tensor llama.cpp should store} from the HF tensors `hf` of a model with config
    `cfg`, and the HF names nothing was made of (a tensor the mapping does not know, or a layout the
    converter would not read the same way: listed, so a test fails on it instead of ignoring it)."""
    import torch

    family = cfg["model_type"]
    exp, used = {}, set()

    def put(gguf_name: str, t, *sources: str) -> None:
        exp[gguf_name] = t.contiguous()
        used.update(sources)

    for k, g in (("model.embed_tokens.weight", "token_embd.weight"), ("lm_head.weight", "output.weight"),
                 ("model.norm.weight", "output_norm.weight"), ("model.norm.bias", "output_norm.bias")):
        if k in hf:
            put(g, hf[k], k)
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    for b in range(cfg["num_hidden_layers"]):
        p, g = f"model.layers.{b}.", f"blk.{b}."
        # gpt-oss's second norm sits after attention, before the MoE: llama.cpp calls it post_attention_norm
        second_norm = "post_attention_norm" if family == "gpt_oss" else "ffn_norm"
        for hf_norm, g_norm in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", second_norm)):
            for s in ("weight", "bias"):
                if (k := f"{p}{hf_norm}.{s}") in hf:
                    put(f"{g}{g_norm}.{s}", hf[k], k)
        for hf_name, g_name in ATTN.items():
            for s in ("weight", "bias"):
                if (k := f"{p}self_attn.{hf_name}.{s}") not in hf:
                    continue
                t = hf[k]
                if family == "mixtral" and hf_name in ("q_proj", "k_proj"):
                    t = _llama_permute(t, n_head if hf_name == "q_proj" else n_kv)
                put(f"{g}{g_name}.{s}", t, k)
        if (k := f"{p}self_attn.sinks") in hf:
            put(f"{g}attn_sinks.weight", hf[k], k)
        if (k := f"{p}self_attn.kv_b_proj.weight") in hf:
            # DeepSeek MLA: kv_b [H*(nope+v), kv_lora] is split per head into k_b (transposed) and v_b
            nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv = hf[k].view(n_head, nope + v, hf[k].shape[-1])
            put(f"{g}attn_k_b.weight", kv[:, :nope].transpose(1, 2), k)
            put(f"{g}attn_v_b.weight", kv[:, nope:], k)
        for router in ROUTERS:
            for s in ("weight", "bias"):
                if (k := f"{p}{router}.{s}") in hf:
                    put(f"{g}ffn_gate_inp.{s}", hf[k], k)
        if (k := f"{p}mlp.gate.e_score_correction_bias") in hf:
            put(f"{g}exp_probs_b.bias", hf[k], k)
        # routed experts, one HF tensor per expert (the Hub layout) -> one GGUF tensor [E, out, in]
        for moe in EXPERTS:
            expert_key = re.compile(re.escape(f"{p}{moe}.") + r"(\d+)\.")
            ids = sorted({int(m.group(1)) for name in hf if (m := expert_key.match(name))})
            for hf_w, g_w in FFN.items():
                keys = [f"{p}{moe}.{e}.{hf_w}.weight" for e in ids]
                if ids and all(key in hf for key in keys):
                    put(f"{g}ffn_{g_w}_exps.weight", torch.stack([hf[key] for key in keys]), *keys)
        if family == "gpt_oss" and (k := f"{p}mlp.experts.gate_up_proj") in hf:
            # gpt-oss keeps its experts fused on the Hub: gate_up_proj [E, H, 2I] with gate and up
            # interleaved on the last dim, down_proj [E, I, H]; llama.cpp stores [E, out, in] like the rest
            gate_up = hf[k].transpose(-1, -2)
            put(f"{g}ffn_gate_exps.weight", gate_up[:, 0::2, :], k)
            put(f"{g}ffn_up_exps.weight", gate_up[:, 1::2, :], k)
            if (kb := k + "_bias") in hf:
                put(f"{g}ffn_gate_exps.bias", hf[kb][..., 0::2], kb)
                put(f"{g}ffn_up_exps.bias", hf[kb][..., 1::2], kb)
            if (kd := f"{p}mlp.experts.down_proj") in hf:
                put(f"{g}ffn_down_exps.weight", hf[kd].transpose(-1, -2), kd)
            if (kd := f"{p}mlp.experts.down_proj_bias") in hf:
                put(f"{g}ffn_down_exps.bias", hf[kd], kd)
        # shared experts (Qwen2-MoE: shared_expert + its sigmoid gate; DeepSeek: shared_experts) and dense MLPs
        for shared in ("mlp.shared_expert", "mlp.shared_experts"):
            for hf_w, g_w in FFN.items():
                if (k := f"{p}{shared}.{hf_w}.weight") in hf:
                    put(f"{g}ffn_{g_w}_shexp.weight", hf[k], k)
        if (k := f"{p}mlp.shared_expert_gate.weight") in hf:
            put(f"{g}ffn_gate_inp_shexp.weight", hf[k], k)
        for hf_w, g_w in FFN.items():
            if (k := f"{p}mlp.{hf_w}.weight") in hf:
                put(f"{g}ffn_{g_w}.weight", hf[k], k)
    return exp, sorted(set(hf) - used)


# -- what llama.cpp's loader expects ----------------------------------------------------------------------
# The converter writes whatever shapes the checkpoint has; llama.cpp's loader then creates every attention
# tensor with a shape computed from the GGUF's hyperparameters and refuses a file whose tensor differs. The
# width of attn_q (and of attn_output's input) per architecture, as llama-cpp-python 0.3.36's
# vendor/llama.cpp/src/models/<arch>.cpp creates it; `head_k` is attention.key_length, else
# embedding_length / head_count (src/llama-model.cpp), `n_rot` rope.dimension_count, else head_k.
Q_WIDTH = {
    "llama": lambda h: h["n_head"] * h["head_k"],  # models/llama.cpp (Mixtral)
    "qwen3moe": lambda h: h["n_head"] * h["head_k"],  # models/qwen3moe.cpp
    "gpt-oss": lambda h: h["n_head"] * h["n_rot"],  # models/openai-moe.cpp
    "deepseek2": lambda h: h["n_head"] * h["key_length_mla"],  # models/deepseek2.cpp (MLA)
    # these three fix the query and output projections at n_embd x n_embd: fewer heads cannot load
    "phimoe": lambda h: h["n_embd"],  # models/phimoe.cpp
    "qwen2moe": lambda h: h["n_embd"],  # models/qwen2moe.cpp
    "olmoe": lambda h: h["n_embd"],  # models/olmoe.cpp
}


def llama_cpp_attention_problems(gguf_path: str | Path) -> list[str]:
    """How the GGUF's attention tensors differ from the shapes llama.cpp's loader would create from its
    hyperparameters (empty: they load). Shapes are ggml's [ne0 = input, ne1 = output]."""
    reader = _gguf_module().GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()

    def hp(key: str):
        k = f"{arch}.{key}"
        return reader.fields[k].contents() if k in reader.fields else None

    if arch not in Q_WIDTH:
        return [f"no llama.cpp loader rule for architecture {arch!r} in gguf_client.Q_WIDTH"]
    n_embd, n_head = hp("embedding_length"), hp("attention.head_count")
    n_kv = hp("attention.head_count_kv") or n_head
    head_k = hp("attention.key_length") or n_embd // n_head
    head_v = hp("attention.value_length") or n_embd // n_head
    h = {"n_embd": n_embd, "n_head": n_head, "head_k": head_k, "n_rot": hp("rope.dimension_count") or head_k,
         "key_length_mla": hp("attention.key_length_mla")}
    problems = []
    if arch == "llama" and h["n_rot"] != head_k:  # src/llama-model.cpp: "invalid n_rot"
        problems.append(f"rope.dimension_count {h['n_rot']} != head size {head_k}")
    want = {"attn_q": [n_embd, Q_WIDTH[arch](h)], "attn_output": [Q_WIDTH[arch](h), n_embd]}
    if arch != "deepseek2":  # MLA has no attn_k / attn_v
        want.update(attn_k=[n_embd, n_kv * head_k], attn_v=[n_embd, n_kv * head_v])
    tensors = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    for b in range(hp("block_count")):
        for name, shape in want.items():
            got = tensors.get(f"blk.{b}.{name}.weight")
            if got is not None and got != shape:
                problems.append(f"blk.{b}.{name}.weight is {got}, llama.cpp's {arch} loader creates {shape} "
                                f"(n_embd={n_embd}, head_count={n_head}, head_count_kv={n_kv}, head size={head_k})")
    return problems


def expert_count(cfg: dict) -> int | None:
    return cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")


def compare_gguf(model_dir: str | Path, gguf_path: str | Path, max_reported: int = 5) -> dict:
    """Every HF tensor of `model_dir` against the GGUF tensor made of it, exactly (f32 bytes and shape),
    and the GGUF metadata a runtime sizes the model by against config.json.

    Returns counts, `all_exact` (every HF tensor used, every GGUF tensor expected and equal), the first
    `max_reported` problems of each kind, and `metadata`: {key: {"gguf": ..., "config": ...}}."""
    import numpy as np

    from tiny import checkpoint_tensors

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    hf = checkpoint_tensors(model_dir)
    exp, unused = expected_gguf(cfg, hf)
    reader = _gguf_module().GGUFReader(str(gguf_path))
    got = {t.name: t for t in reader.tensors}
    exact, mismatched = 0, {}
    for name in sorted(set(exp) & set(got)):
        want, t = exp[name].detach().cpu().numpy(), got[name]
        have = np.asarray(t.data)
        if t.tensor_type.name == "F32" and want.dtype == have.dtype and want.shape == have.shape \
                and want.tobytes() == have.tobytes():
            exact += 1
        else:
            mismatched[name] = {"gguf_type": t.tensor_type.name, "gguf_shape": list(have.shape),
                                "hf_shape": list(want.shape), "hf_dtype": str(want.dtype),
                                "max_abs_diff": float(np.abs(want.astype(np.float64) - have).max())
                                if want.shape == have.shape else None}

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    arch = field("general.architecture")
    metadata = {key: {"gguf": field(f"{arch}.{key}"), "config": value}
                for key, value in (("block_count", cfg["num_hidden_layers"]), ("expert_count", expert_count(cfg)),
                                   ("expert_used_count", cfg.get("num_experts_per_tok")))}
    missing, unexpected = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    return {
        "arch": arch,
        "tokenizer_model": field("tokenizer.ggml.model"),
        "n_hf_tensors": len(hf), "n_gguf_tensors": len(got), "n_exact": exact,
        "all_exact": exact == len(exp) == len(got) and not unused,
        "mismatched": dict(list(mismatched.items())[:max_reported]), "n_mismatched": len(mismatched),
        "missing_in_gguf": missing[:max_reported], "unexpected_in_gguf": unexpected[:max_reported],
        "unused_hf_tensors": unused[:max_reported],
        "metadata": metadata,
    }
