"""Every CUDA path of slimmoe once, on one GPU, in under 8 minutes: the first GPU run's report.

    python benchmarks/gpu_check.py [--smoke] [--phases facts,moe_layer,...] [--out FILE] [--workdir DIR]

Nothing in slimmoe had run on a GPU when this was written. The script runs each GPU path of the
project on one GPU with random weights it builds itself (no network: HF_HUB_OFFLINE=1, everything in
a temporary --workdir) and prints one JSON object per line per measurement, `{"phase": ..., "name":
..., ...}`, flushed as it goes: paste the lines into the issue notes as they are. A phase that fails
prints `{"phase": ..., "error": "Type: message", "where": [...]}` and the next phase runs; the exit
code is 1 when any line was an error. Each phase checks its own time limit between steps and, past
it, prints a `time_limit` line naming what it skipped. stdout carries the JSON lines only: whatever
else writes to it (DeepSpeed's logger, NCCL, Ray) is sent to stderr.

Phases (--phases picks some, in this order):
  facts       versions (python, torch, transformers, slimmoe's commit, accelerate/deepspeed/ray);
              CUDA, cuDNN, NCCL; the device; device memory taken by the CUDA context, by the first
              cuBLAS matmul and by a one-rank NCCL process group (`torch.cuda.mem_get_info` deltas);
              the experts kernel `core.kernels.experts_kernel` picks there, and TF32 after
              `enable_gpu_numerics`.
  moe_layer   one MoE layer at Phi-3.5-MoE widths (4096 x 6400, 16 experts, top-2) and Qwen3-30B-A3B
              widths (2048 x 768, 128 experts, top-8): eager against grouped_mm in bf16, forward and
              forward+backward ms, TFLOP/s, error against a float32 eager reference (TF32 off); and
              float32 weights under bf16 autocast (the ddp engine's case) for the Phi widths.
  teacher     the teacher actor (`nodes.teacher_logits._TeacherActor`, its async forward + finish
              without Ray) on a ~1.8B PhiMoE in bf16 and in float32: tokens/s, peak memory against
              `planning.memory.teacher_pass_memory`, and how far the bf16 cache is from the float32
              one (top-1 agreement, top-k overlap, rest column, KL over the top-k + rest buckets).
  fsdp_stage  the fsdp strategy at world size 1 on a ~0.3B PhiMoE: `fsdp.sharded_model_from` (buffers
              float32 on the device), sharded Taylor scores against the unsharded `taylor_scores`
              (Spearman per layer, overlap of a 50% cut's kept neurons), 30 steps of
              `engines.FSDPEngine` on the stage's distillation loss (loss, tokens/s, MFU, memory
              against `stage_train_memory`), a `torch.distributed.checkpoint` resume replaying the
              last 5 steps, `save_final` reloaded by plain `from_pretrained`.
  engines     `engines.DDPEngine` and `engines.DeepSpeedEngine` (ZeRO-2) on fsdp_stage's batches:
              first losses beside fsdp's, tokens/s, memory, the buffer dtypes DeepSpeed leaves.
  ray         (ray importable; on --smoke only with --with-ray) a GPU task and a one-worker Ray Train
              job whose process group runs one all-reduce.

--smoke runs the same phases and code on CPU with tiny models in seconds (gloo instead of NCCL, no
device memory numbers): tests/test_gpu_check.py runs it, so the GPU run cannot die of a typo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Set before transformers or huggingface_hub is imported: the check must never wait on a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed reads these even when it is handed an existing process group.
for _key, _value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                     ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

PHASES = ("facts", "moe_layer", "teacher", "fsdp_stage", "engines", "ray")

# Logit spread of the random models' output heads: a random head at the usual init gives near-uniform
# logits, whose top-1 is decided by noise, so bf16-vs-float32 agreement would measure nothing.
LOGIT_STD = 4.0

# Sizes per mode. GPU: the real widths where they matter (MoE layers, a teacher near 1.8B), a ~0.3B
# student so that training, two checkpoints and a reload fit the time; limits add up to 7.5 minutes.
SIZES = {
    "gpu": dict(
        limits={"facts": 30, "moe_layer": 80, "teacher": 100, "fsdp_stage": 120, "engines": 70, "ray": 50},
        moe_tokens=8192, moe_iters=5,
        moe_widths={"phimoe": dict(hidden=4096, expert=6400, experts=16, top_k=2, heads=32, kv=8, head_dim=128),
                    "qwen3_moe": dict(hidden=2048, expert=768, experts=128, top_k=8, heads=32, kv=4, head_dim=128)},
        teacher=dict(vocab=32064, hidden=2048, expert=2048, layers=8, experts=16, top_k=2, heads=32, kv=8),
        teacher_batch=8, teacher_seq=2048, teacher_batches=4, k=64,
        student=dict(vocab=32064, hidden=1024, expert=1024, layers=4, experts=16, top_k=2, heads=16, kv=4),
        micro_batch=4, seq=1024, steps=30, resume_at=25, calibration_batches=4, engine_steps=10,
    ),
    "smoke": dict(
        limits={"facts": 30, "moe_layer": 30, "teacher": 30, "fsdp_stage": 60, "engines": 60, "ray": 120},
        moe_tokens=256, moe_iters=2,
        moe_widths={"phimoe": dict(hidden=64, expert=64, experts=4, top_k=2, heads=4, kv=2, head_dim=16),
                    "qwen3_moe": dict(hidden=64, expert=64, experts=4, top_k=2, heads=4, kv=2, head_dim=16)},
        teacher=None,  # tests/tiny.py's PhiMoE
        teacher_batch=4, teacher_seq=32, teacher_batches=2, k=8,
        student=None,
        micro_batch=2, seq=32, steps=30, resume_at=25, calibration_batches=2, engine_steps=6,
    ),
}


class OutOfTime(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class PhaseHung(TimeoutError):
    """Raised by SIGALRM inside a step that ran far past its phase's limit (a wait that never ends)."""


class Check:
    """What the phases share: device, sizes, the output lines, and what one phase builds for another."""

    def __init__(self, args, lines):
        self.smoke = args.smoke
        self.with_ray = args.with_ray
        self.device = torch.device("cpu") if args.smoke else torch.device(args.device)
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu:
            self.device = torch.device("cuda", self.device.index or 0)
            torch.cuda.set_device(self.device)
        self.capability = torch.cuda.get_device_capability(self.device) if self.on_gpu else None
        self.sizes = SIZES["smoke" if args.smoke else "gpu"]
        self.lines = lines
        self.out = open(args.out, "w") if args.out else None
        self.keep_workdir = args.workdir is not None
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="slimmoe-gpu-check-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.errors = 0
        self.shared: dict = {}
        self.phase = "main"
        self.deadline = math.inf

    # -- output -----------------------------------------------------------------------------------

    def emit(self, name: str, **values) -> None:
        self._write({"phase": self.phase, "name": name, **values})

    def error(self, err: BaseException, name: str | None = None) -> None:
        self.errors += 1
        frames = traceback.extract_tb(err.__traceback__)[-4:]
        where = [f"{_short_path(f.filename)}:{f.lineno} {f.name}" for f in frames]
        line = {"phase": self.phase, "error": f"{type(err).__name__}: {str(err)[:1500]}", "where": where}
        if name:
            line["name"] = name
        self._write(line)

    def _write(self, line: dict) -> None:
        text = json.dumps(_plain(line))
        for stream in (self.lines, self.out):
            if stream is not None:
                stream.write(text + "\n")
                stream.flush()

    # -- time -------------------------------------------------------------------------------------

    def check_time(self, what: str) -> None:
        """Call before each step of a phase: past the phase's limit, the rest of it is skipped."""
        if time.perf_counter() > self.deadline:
            raise OutOfTime(what)

    def run_phase(self, name: str, fn) -> None:
        self.phase = name
        limit = self.sizes["limits"][name]
        start = time.perf_counter()
        self.deadline = start + limit
        errors = self.errors
        # The limit is checked between steps; a step that never returns (Ray waiting for resources, a
        # collective nobody joins) is interrupted at twice the limit, so the phases after it still run.
        hard = int(2 * limit) + 30
        previous = signal.signal(signal.SIGALRM, lambda *_: _hung(name, hard))
        signal.alarm(hard)
        try:
            fn(self)
        except OutOfTime as stop:
            self.emit("time_limit", limit_s=limit, elapsed_s=time.perf_counter() - start,
                      skipped=f"the rest of the phase, from: {stop.what}")
        except Exception as err:  # noqa: BLE001 - one broken path must not hide the others
            self.error(err)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            self.free()
        self.emit("done", ok=self.errors == errors, seconds=time.perf_counter() - start)

    # -- device -----------------------------------------------------------------------------------

    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()

    def reset_peak(self) -> int:
        """Start a peak-memory window; returns the bytes allocated at its start (0 on CPU)."""
        if not self.on_gpu:
            return 0
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self, base: int = 0) -> dict:
        """Peak device memory of the window, less `base`; None on CPU (no device allocator to ask)."""
        if not self.on_gpu:
            return {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
        self.sync()
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device) - base,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}

    def gpu_numerics(self) -> None:
        """TF32 on, as every CUDA path of slimmoe turns it on, whichever phases run before this one."""
        from slimmoe.tasks.core.kernels import enable_gpu_numerics

        enable_gpu_numerics(self.device)

    def kernel(self, weights_16bit: bool) -> str:
        from slimmoe.tasks.core.kernels import experts_kernel

        return experts_kernel(None, self.on_gpu, self.capability, weights_16bit=weights_16bit)

    def process_group(self) -> str:
        """The one-rank default process group every phase shares (NCCL on GPU, gloo on CPU). Made once:
        NCCL communicators are not meant to be torn down and rebuilt in one process."""
        import torch.distributed as dist

        if not dist.is_initialized():
            store = dist.FileStore(str(self.workdir / "process_group_store"), 1)
            kwargs = {"device_id": self.device} if self.on_gpu else {}
            dist.init_process_group("nccl" if self.on_gpu else "gloo", store=store, rank=0, world_size=1, **kwargs)
            probe = torch.ones(1, device=self.device)
            dist.all_reduce(probe)  # NCCL builds its communicator at the first collective
            self.sync()
        return dist.get_backend()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if self.out is not None:
            self.out.close()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _hung(phase: str, seconds: int):
    raise PhaseHung(f"the {phase} phase was still in one step after {seconds} s; interrupted")


def _plain(v):
    """JSON-ready values: 6 significant digits, tensors and dtypes as plain values."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else str(v)
    if isinstance(v, torch.Tensor):
        return _plain(v.item() if v.numel() == 1 else v.tolist())
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):  # numpy scalars
        return _plain(v.item())
    return str(v)


def _short_path(path: str) -> str:
    for root in (str(REPO) + "/", "site-packages/"):
        if root in path:
            return path.split(root, 1)[1]
    return path


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    """How far `got` is from `want`: max abs, max abs over the reference's max abs, relative L2."""
    got, want = got.detach().float(), want.detach().float()
    diff = (got - want).abs()
    scale = want.abs().max().clamp_min(1e-30)
    return {"max_abs_err": diff.max(), "max_rel_err": diff.max() / scale,
            "rel_l2_err": (got - want).norm() / want.norm().clamp_min(1e-30)}


@contextlib.contextmanager
def _exact_float32():
    """float32 matmuls without TF32, for a reference that is worth comparing against."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _gpu_key(c: Check) -> str | None:
    """The `planning.flops.PEAK_TFLOPS` key of this device, from its name (None if it lists none)."""
    from slimmoe.tasks.planning.flops import PEAK_TFLOPS

    if not c.on_gpu:
        return None
    name = torch.cuda.get_device_name(c.device).lower()
    return next((key for key in PEAK_TFLOPS if key in name), None)


# -- facts ------------------------------------------------------------------------------------------

def phase_facts(c: Check) -> None:
    import transformers

    from slimmoe.tasks.core.kernels import enable_gpu_numerics, experts_kernel, fallback_reason

    c.emit("versions", python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
           slimmoe_commit=_git_commit(), **{name: _dist_version(name) for name in ("accelerate", "deepspeed", "ray")})
    if c.on_gpu:
        props = torch.cuda.get_device_properties(c.device)
        c.emit("device", device=str(c.device), gpu=props.name, capability=list(c.capability),
               total_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
               device_count=torch.cuda.device_count(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               nccl=_nccl_version(), bf16=torch.cuda.is_bf16_supported(),
               grouped_mm=hasattr(torch, "_grouped_mm"), driver=_nvidia_driver())
    else:
        c.emit("device", device="cpu", torch_threads=torch.get_num_threads(), grouped_mm=hasattr(torch, "_grouped_mm"))

    capability = tuple(c.capability) if c.capability else None
    for weights_16bit in (True, False):
        chosen = experts_kernel(None, c.on_gpu, capability, weights_16bit=weights_16bit)
        c.emit("experts_kernel", weights_16bit=weights_16bit, kernel=chosen,
               grouped_mm_fallback=fallback_reason("grouped_mm", c.on_gpu, capability, weights_16bit))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    enable_gpu_numerics(c.device)
    c.emit("tf32", before={"matmul": before[0], "cudnn": before[1]},
           after_enable_gpu_numerics={"matmul": torch.backends.cuda.matmul.allow_tf32,
                                      "cudnn": torch.backends.cudnn.allow_tf32})

    c.check_time("device memory")
    if c.on_gpu:
        # The first mem_get_info creates the CUDA context; the rest of the device is free unless another
        # process holds some of it (then the context figure includes that).
        free, total = torch.cuda.mem_get_info(c.device)
        context = total - free
        a = torch.randn(4096, 4096, device=c.device, dtype=torch.bfloat16)
        b = torch.randn(4096, 4096, device=c.device, dtype=torch.bfloat16)
        cublas = _outside_allocator(c, lambda: a @ b)
        nccl = _outside_allocator(c, c.process_group)
        del a, b
        c.emit("memory", cuda_context_bytes=context, first_matmul=cublas, nccl_group=nccl,
               note="outside_allocator_bytes: device memory taken outside torch's caching allocator (cuBLAS "
                    "handle and workspace, lazily loaded kernels, NCCL buffers); allocator_bytes: what torch "
                    "reserved meanwhile, the matmul's 32 MiB output included")
    c.emit("process_group", backend=c.process_group(), world_size=1)


def _outside_allocator(c: Check, fn) -> dict:
    """Device memory `fn` takes, split into what torch's caching allocator reserved and the rest."""
    c.sync()
    free0, reserved0 = torch.cuda.mem_get_info(c.device)[0], torch.cuda.memory_reserved(c.device)
    fn()
    c.sync()
    free1, reserved1 = torch.cuda.mem_get_info(c.device)[0], torch.cuda.memory_reserved(c.device)
    reserved = reserved1 - reserved0
    return {"outside_allocator_bytes": (free0 - free1) - reserved, "allocator_bytes": reserved}


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()  # a tuple on current torch, an int (e.g. 21803) on older ones
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# -- moe_layer ---------------------------------------------------------------------------------------

def _moe_config(family: str, w: dict):
    import transformers

    common = dict(hidden_size=w["hidden"], num_hidden_layers=1, num_attention_heads=w["heads"],
                  num_key_value_heads=w["kv"], num_experts_per_tok=w["top_k"], vocab_size=256)
    if family == "phimoe":
        return transformers.PhimoeConfig(intermediate_size=w["expert"], num_local_experts=w["experts"], **common)
    return transformers.Qwen3MoeConfig(moe_intermediate_size=w["expert"], num_experts=w["experts"],
                                       intermediate_size=w["expert"], head_dim=w["head_dim"], **common)


def phase_moe_layer(c: Check) -> None:
    from transformers import AutoModelForCausalLM

    tokens, iters = c.sizes["moe_tokens"], c.sizes["moe_iters"]
    c.gpu_numerics()  # the float32 arms run as slimmoe runs them; the reference turns TF32 off itself
    c.emit("definitions", tokens=tokens, timed_iterations=iters,
           flops_counted="routed experts' gate_up and down matmuls only: 6*tokens*top_k*hidden*expert forward, 3x "
                         "that forward+backward (router, activation and combine left out)",
           reference="float32 weights and inputs, eager, TF32 off; errors are of the layer's output",
           routing_differs_frac="tokens whose chosen experts differ from the reference's (a flipped expert "
                                "dominates max_abs_err; rel_l2_err is the one to read)",
           peak_allocated_bytes="above what was allocated when the arm started (weights and inputs)")
    for index, (family, w) in enumerate(c.sizes["moe_widths"].items()):
        c.check_time(f"{family} widths")
        torch.manual_seed(0)
        with torch.device(c.device):
            model = AutoModelForCausalLM.from_config(_moe_config(family, w), dtype=torch.float32).eval()
        mlp = model.model.layers[0].mlp
        routes: list = []
        mlp.experts.register_forward_pre_hook(lambda _m, args, kwargs: routes.append(
            (args[1] if len(args) > 1 else kwargs["top_k_index"]).detach().sort(-1).values), with_kwargs=True)
        x = torch.randn(1, tokens, w["hidden"], device=c.device)
        dy = torch.randn_like(x)
        flops_fwd = 6.0 * tokens * w["top_k"] * w["hidden"] * w["expert"]
        shape = {"family": family, **{k: w[k] for k in ("hidden", "expert", "experts", "top_k")}}

        model.set_experts_implementation("eager")
        with _exact_float32(), torch.no_grad():
            routes.clear()
            ref = mlp(x)
            ref_routes = routes[-1]

        def arm(label: str, kernel: str, inputs: torch.Tensor, grad: torch.Tensor, autocast: bool):
            """One kernel's line; None (after an error line) when it fails, so the other arms still run."""
            c.check_time(f"{family} {label}")
            model.set_experts_implementation(kernel)
            routes.clear()
            amp = (torch.autocast(c.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext())
            base = c.reset_peak()
            try:
                with amp:
                    fwd_ms, out, routed = _time_forward(c, mlp, inputs, iters, routes)
                    bwd_ms, dx = _time_forward_backward(c, mlp, inputs, grad, iters)
            except Exception as err:  # noqa: BLE001 - e.g. a kernel this torch lacks, or out of memory
                c.error(err, name=f"{family}/{label}")
                c.free()
                return None
            line = {**shape, "kernel": kernel, "weights": str(next(mlp.parameters()).dtype), "autocast_bf16": autocast,
                    "fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms,
                    "tflops_fwd": flops_fwd / (fwd_ms / 1e3) / 1e12,
                    "tflops_fwd_bwd": 3 * flops_fwd / (bwd_ms / 1e3) / 1e12,
                    **_errors(out, ref), "routing_differs_frac": (routed != ref_routes).any(-1).float().mean(),
                    **c.peak(base)}
            c.emit(f"{family}/{label}", **line)
            return out, dx, routed

        if index == 0:  # the ddp engine's case: float32 master weights under bf16 autocast
            arm("fp32_weights_autocast/grouped_mm", "grouped_mm", x, dy, autocast=True)
            arm("fp32_weights_autocast/eager", "eager", x, dy, autocast=True)
        model.to(torch.bfloat16)
        x16, dy16 = x.to(torch.bfloat16), dy.to(torch.bfloat16)
        eager = arm("bf16/eager", "eager", x16, dy16, autocast=False)
        grouped = arm("bf16/grouped_mm", "grouped_mm", x16, dy16, autocast=False)
        if eager is not None and grouped is not None:
            (out_e, dx_e, routed_e), (out_g, dx_g, routed_g) = eager, grouped
            c.emit(f"{family}/bf16/eager_vs_grouped_mm", **shape, same_routing=bool(torch.equal(routed_e, routed_g)),
                   output=_errors(out_g, out_e), input_grad=_errors(dx_g, dx_e))
        del model, mlp, x, dy, ref, x16, dy16, eager, grouped
        c.free()


def _time_forward(c: Check, mlp, x, iters: int, routes: list):
    """Forward ms (one untimed warm-up first), the output, and the routing it used."""
    with torch.no_grad():
        out = mlp(x)
        c.sync()
        start = time.perf_counter()
        for _ in range(iters):
            out = mlp(x)
        c.sync()
    return (time.perf_counter() - start) / iters * 1e3, out, routes[-1]


def _time_forward_backward(c: Check, mlp, x, dy, iters: int):
    """Forward+backward ms (one untimed warm-up first) and the input's gradient."""
    start = 0.0
    for i in range(iters + 1):
        if i == 1:
            c.sync()
            start = time.perf_counter()
        xx = x.detach().requires_grad_()
        mlp(xx).backward(dy)
        for p in mlp.parameters():
            p.grad = None
    c.sync()
    return (time.perf_counter() - start) / iters * 1e3, xx.grad


# -- random models on disk --------------------------------------------------------------------------

def _phimoe_config(s: dict):
    import transformers

    return transformers.PhimoeConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["expert"],
                                     num_hidden_layers=s["layers"], num_local_experts=s["experts"],
                                     num_experts_per_tok=s["top_k"], num_attention_heads=s["heads"],
                                     num_key_value_heads=s["kv"], max_position_embeddings=4096)


def _save_random_phimoe(c: Check, sizes: dict | None, out: Path, seed: int) -> Path:
    """A PhiMoE with random weights saved in bf16 (as Phi-3.5-MoE ships), its head spread to LOGIT_STD.
    --smoke: tests/tiny.py's. Built on the device: initialising ~2B weights on CPU takes long."""
    from transformers import AutoModelForCausalLM

    from slimmoe.tasks.core.params import count_parameters
    from tiny import tiny_model

    start = time.perf_counter()
    if sizes is None:
        model = tiny_model("phimoe", seed=seed)
    else:
        torch.manual_seed(seed)
        with torch.device(c.device):
            model = AutoModelForCausalLM.from_config(_phimoe_config(sizes), dtype=torch.bfloat16)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.normal_(0.0, LOGIT_STD / math.sqrt(head.shape[1]))
    model.to(torch.bfloat16).save_pretrained(out)
    counts = count_parameters(model)
    cfg = model.config
    c.emit("model", dir=out.name, total_params=counts["total"], active_params=counts["active"], saved_dtype="bfloat16",
           vocab=cfg.vocab_size, hidden=cfg.hidden_size, expert=cfg.intermediate_size, layers=cfg.num_hidden_layers,
           experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok, heads=cfg.num_attention_heads,
           kv_heads=cfg.num_key_value_heads, seconds=time.perf_counter() - start)
    del model
    c.free()
    return out


# -- teacher ----------------------------------------------------------------------------------------

def phase_teacher(c: Check) -> None:
    import numpy as np
    import pyarrow as pa

    from slimmoe.tasks.core.checkpoint import load_config
    from slimmoe.tasks.data.formats import binary_column_to_numpy, ids_dtype

    s = c.sizes
    c.gpu_numerics()
    teacher_dir = _save_random_phimoe(c, s["teacher"], c.workdir / "teacher", seed=1)
    vocab, batch, seq, k = load_config(teacher_dir).vocab_size, s["teacher_batch"], s["teacher_seq"], s["k"]
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, vocab, (batch, seq), generator=g) for _ in range(s["teacher_batches"] + 1)]
    path = str(c.workdir / "tokens.parquet")  # only a label: the actor tags rows with it, reads nothing
    tables = [pa.table({"row_id": pa.array(range(i * batch, (i + 1) * batch), pa.int64()),
                        "input_ids": pa.array(x.to(torch.int32).numpy().tolist(), pa.list_(pa.int32())),
                        "path": pa.array([path] * batch)}) for i, x in enumerate(ids)]

    def decode(rows) -> dict:
        n = rows.num_rows
        return {"ids": torch.from_numpy(binary_column_to_numpy(rows.column("topk_ids"), ids_dtype(vocab), seq * k)
                                        .astype(np.int64)).view(n, seq, k),
                "lp": torch.from_numpy(binary_column_to_numpy(rows.column("topk_logprobs"), np.float16, seq * k)
                                       .astype(np.float32)).view(n, seq, k),
                "rest": torch.from_numpy(binary_column_to_numpy(rows.column("rest_logprob"), np.float32, seq)
                                         .copy()).view(n, seq)}

    caches, kl = {}, {}
    for dtype in ("float32", "bfloat16"):
        c.check_time(f"the {dtype} teacher")
        try:
            caches[dtype], kl[dtype] = _teacher_pass(c, teacher_dir, dtype, tables, ids[1], decode,
                                                     caches.get("float32"))
        except Exception as err:  # noqa: BLE001 - the other dtype still runs
            c.error(err, name=dtype)
        c.free()
    if len(caches) < 2:
        return
    a, b = caches["bfloat16"], caches["float32"]
    ids_a, ids_b = torch.cat([x["ids"] for x in a]), torch.cat([x["ids"] for x in b])
    rest_a, rest_b = torch.cat([x["rest"] for x in a]), torch.cat([x["rest"] for x in b])
    lp_a, lp_b = torch.cat([x["lp"] for x in a]), torch.cat([x["lp"] for x in b])
    first_a, first_b = a[0]["ids"].flatten(0, 1), b[0]["ids"].flatten(0, 1)
    overlap = (first_a.unsqueeze(-1) == first_b.unsqueeze(-2)).any(-1).float().mean()
    c.emit("bf16_vs_float32", positions=ids_a[..., 0].numel(),
           top1_agreement=(ids_a[..., 0] == ids_b[..., 0]).float().mean(), topk_overlap_first_batch=overlap,
           top1_logprob_abs_err={"mean": (lp_a[..., 0] - lp_b[..., 0]).abs().mean(),
                                 "max": (lp_a[..., 0] - lp_b[..., 0]).abs().max()},
           rest_logprob_abs_err={"mean": (rest_a - rest_b).abs().mean(), "max": (rest_a - rest_b).abs().max()},
           rest_mass_abs_err_max=(rest_a.exp() - rest_b.exp()).abs().max(),
           rest_mass_mean=rest_b.exp().mean(),
           kl_bf16_model_vs_float32_cache={"mean": kl["bfloat16"].mean(), "max": kl["bfloat16"].max()},
           kl_float32_model_vs_float32_cache={"mean": kl["float32"].mean(), "max": kl["float32"].max()},
           note="KL(float32 cache's top-k + rest buckets || model's buckets), per_token_kl on the first timed batch; "
                "the float32-model line is the float16 storage's share")


def _teacher_pass(c: Check, teacher_dir: Path, dtype: str, tables: list, kl_ids: torch.Tensor, decode, reference):
    """One pass of the teacher actor in `dtype` (a warm-up batch, then the rest, timed): its line, the
    decoded cache rows, and the per-position KL of this model against `reference` (the float32 pass's
    cache of the first timed batch; its own cache when None)."""
    from slimmoe.tasks.core.checkpoint import load_config
    from slimmoe.tasks.nodes.teacher_logits import _norm, _TeacherActor
    from slimmoe.tasks.planning.memory import model_shape, teacher_pass_memory
    from slimmoe.tasks.slimming.losses import per_token_kl

    s = c.sizes
    config = load_config(teacher_dir)
    batch, seq, k = s["teacher_batch"], s["teacher_seq"], s["k"]
    depth = 2  # the actor's default on a GPU: the finish of one batch overlaps the next forward
    kernel = c.kernel(weights_16bit=dtype == "bfloat16")
    path = tables[0].column("path")[0].as_py()
    base = c.reset_peak()
    start = time.perf_counter()
    actor = _TeacherActor(str(teacher_dir), k=k, dtype=dtype, device=c.device.type, gpus=1 if c.on_gpu else 0,
                          experts_implementation=kernel, trust_remote_code=False, torch_threads=None,
                          vocab_size=config.vocab_size, split_of_path={_norm(path): 0}, pipeline_depth=depth)
    load_s = time.perf_counter() - start
    asyncio.run(_through_actor(actor, tables[:1]))  # warm-up: lazy kernel loading, allocator growth
    c.sync()
    start = time.perf_counter()
    rows = asyncio.run(_through_actor(actor, tables[1:]))
    seconds = time.perf_counter() - start
    measured = c.peak(base)
    cache = [decode(r) for r in rows]
    # KL over the float32 pass's cached buckets, the loss's own formula: against the float32 model it is
    # the float16 storage's error alone; against the bf16 model, what bf16 adds.
    ref = (reference or cache)[0]
    with torch.inference_mode():
        logits = actor.model(input_ids=kl_ids.to(actor.input_device), use_cache=False).logits.float()
        kl = per_token_kl(logits, *(ref[key].to(logits.device) for key in ("ids", "lp", "rest"))).cpu()
        del logits
    predicted = teacher_pass_memory(model_shape(config), batch, seq, k, on_gpu=c.on_gpu, overhead=0,
                                    pipeline_depth=depth, dtype_bytes=2 if dtype == "bfloat16" else 4)
    tokens = batch * seq * len(rows)
    c.emit(dtype, kernel=kernel, batch_size=batch, seq_len=seq, k=k, pipeline_depth=depth, tokens=tokens,
           load_s=load_s, tokens_per_s=tokens / seconds,
           tf32=torch.backends.cuda.matmul.allow_tf32 if c.on_gpu else None,
           **measured, predicted_bytes=predicted.total, predicted=predicted.as_dict(),
           measured_over_predicted=(measured["peak_allocated_bytes"] / predicted.total
                                    if measured["peak_allocated_bytes"] is not None else None),
           note="predicted: teacher_pass_memory(overhead=0), i.e. tensors plus allocator slack, no CUDA "
                "context; measured: max_memory_allocated since before the load")
    return cache, kl


async def _through_actor(actor, tables):
    """The batches through the actor as Ray Data drives it: concurrently, at most `pipeline_depth` in flight."""
    return await asyncio.gather(*(actor(t) for t in tables))


# -- fsdp_stage --------------------------------------------------------------------------------------

def _stage_run(c: Check, strategy: str, kernel: str):
    """The StageRun an engine reads (config, paths, steps) for a distill-only stage on the student, with
    the student saved where a stage keeps its cut model (`run.pruned_dir`)."""
    from slimmoe.tasks.slimming.config import Cut, StageConfig, stage_steps
    from slimmoe.tasks.slimming.stage_run import StageRun

    s = c.sizes
    work = c.workdir / "stage"
    if "student" not in c.shared:
        work.mkdir(exist_ok=True)
        _save_random_phimoe(c, s["student"], work / "pruned", seed=3)
        c.shared["student"] = True
    cfg = StageConfig(distill_only=True, token_budget=s["steps"] * s["micro_batch"] * s["seq"],
                      micro_batch=s["micro_batch"], strategy=strategy, use_gpu=c.on_gpu, num_workers=1, zero_stage=2,
                      experts_implementation=kernel)
    return StageRun(cfg=cfg, name=f"gpu_check_{strategy}", model_dir=work / "pruned", cache_dir=work / "no_cache",
                    work_dir=work, steps=stage_steps(cfg, s["seq"], batches_per_epoch=s["steps"]),
                    cuts=(Cut(0, cfg.targets),), cuts_the_teacher=False, teacher_fingerprint=None,
                    tokenizer_fingerprint=None)


def _distill_batches(c: Check, vocab: int) -> list[dict]:
    """The stage's batches as the logit cache hands them (int64 ids, log-probs rounded through float16),
    the teacher a fixed random bigram model (low rank): its top-k depends on the current token, so a
    student can learn it and the loss falls. The same batches for every engine."""
    from slimmoe.tasks.slimming.losses import topk_with_rest

    if "batches" in c.shared:
        return c.shared["batches"]
    s = c.sizes
    g = torch.Generator().manual_seed(4)
    rank = 32
    a = torch.randn(vocab, rank, generator=g).to(c.device)
    b = (torch.randn(rank, vocab, generator=g) * (LOGIT_STD / math.sqrt(rank))).to(c.device)
    batches = []
    for _ in range(s["steps"]):
        ids = torch.randint(3, vocab, (s["micro_batch"], s["seq"]), generator=g).to(c.device)
        t_ids, t_lp, t_rest = topk_with_rest(a[ids] @ b, s["k"])
        batches.append({"input_ids": ids, "topk_ids": t_ids.long(), "topk_logprobs": t_lp.half().float(),
                        "rest_logprob": t_rest.float()})
    c.shared["batches"] = batches
    return batches


def _train_step(engine, batch: dict, cfg, eos, forward=None) -> tuple[float, dict]:
    """One optimizer step as the stage's train loop makes it (one micro-batch)."""
    from slimmoe.tasks.slimming.losses import distillation_loss, document_mask

    mask = document_mask(batch["input_ids"], eos) if cfg.mask_document_boundaries else None
    logits = (forward or engine.forward)(batch["input_ids"])
    loss, parts = distillation_loss(logits, batch["input_ids"], batch["topk_ids"], batch["topk_logprobs"],
                                    batch["rest_logprob"], cfg.temperature, cfg.next_token_weight, mask)
    engine.backward(loss, last_micro=True)
    engine.step()
    return float(loss.detach()), parts


def _rng_state(c: Check) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(c.device) if c.on_gpu else None}


def _set_rng_state(c: Check, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], c.device)


def _train(c: Check, engine, batches, cfg, eos, forward=None, save_at: int | None = None, ckpt: Path | None = None):
    """Steps over `batches` (with a checkpoint before step `save_at`): the losses, tokens/s from the
    second step on (the checkpoint's time left out), the checkpoint's seconds and RNG state, and the
    peak device memory of the whole run (the model and the cached batches included)."""
    losses, kd = [], []
    c.reset_peak()
    start, rng, save_s = time.perf_counter(), None, 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            c.sync()
            start = time.perf_counter()
        if i == save_at:
            c.sync()
            t = time.perf_counter()
            engine.save(ckpt, 0)
            rng = _rng_state(c)  # the train loop checkpoints the RNG too (PhiMoE samples its routing in training)
            save_s = time.perf_counter() - t
        loss, parts = _train_step(engine, batch, cfg, eos, forward)
        losses.append(loss)
        kd.append(parts["kd"])
    c.sync()
    tokens = max(1, len(batches) - 1) * batches[0]["input_ids"].numel()
    seconds = time.perf_counter() - start - (save_s if save_at else 0.0)
    return {"losses": losses, "kd": kd, "tokens_per_s": tokens / seconds, "memory": c.peak(), "save_s": save_s,
            "rng": rng}


def _batches_bytes(batches: list[dict]) -> int:
    return sum(t.numel() * t.element_size() for b in batches for t in b.values())


def _mfu(c: Check, active: int, tokens_per_s: float):
    from slimmoe.tasks.planning.flops import peak_tflops, train_flops

    key = _gpu_key(c)
    peak = peak_tflops(key) if key else None
    return {"mfu": train_flops(active, tokens_per_s) / (peak * 1e12) if peak else None, "peak_tflops": peak,
            "achieved_tflops": train_flops(active, tokens_per_s) / 1e12}


def phase_fsdp_stage(c: Check) -> None:
    from transformers import AutoModelForCausalLM

    from slimmoe.tasks.core.checkpoint import load_config, load_model
    from slimmoe.tasks.planning.memory import model_shape, stage_train_memory
    from slimmoe.tasks.slimming import fsdp
    from slimmoe.tasks.slimming.config import SlimTargets
    from slimmoe.tasks.slimming.engines import FSDPEngine
    from slimmoe.tasks.slimming.scores import next_token_score_loss, taylor_scores
    from slimmoe.tasks.slimming.surgery import keep_plan

    s = c.sizes
    c.process_group()
    c.gpu_numerics()
    kernel = c.kernel(weights_16bit=c.on_gpu)  # FSDP2 computes in bf16 parameters on GPU
    run = _stage_run(c, "fsdp", kernel)
    cfg, config = run.cfg, load_config(run.pruned_dir)
    batches = _distill_batches(c, config.vocab_size)

    c.check_time("sharded loading")
    start = time.perf_counter()
    model = fsdp.sharded_model_from(run.pruned_dir, c.device, cfg.experts_implementation)
    load_s = time.perf_counter() - start
    buffers = {n: f"{b.dtype} {b.device}" for n, b in model.named_buffers()}
    bad = sorted(n for n, b in model.named_buffers()
                 if b.device != c.device or (b.is_floating_point() and b.dtype != torch.float32))
    shards = {f"{fsdp.local_tensor(p).dtype} {fsdp.local_tensor(p).device}" for p in model.parameters()}
    c.emit("sharded_model", load_s=load_s, kernel=kernel, buffers_ok=not bad, bad_buffers=bad,
           float_buffers={n: v for n, v in buffers.items() if "float" in v}, parameter_shards=sorted(shards),
           local_param_bytes=fsdp.local_param_bytes(model))

    c.check_time("Taylor scores")
    calibration = [b["input_ids"] for b in batches[: s["calibration_batches"]]]
    start = time.perf_counter()
    sharded = fsdp.sharded_taylor_scores(model, calibration, next_token_score_loss, with_heads=True)
    sharded_s = time.perf_counter() - start
    reference = load_model(run.pruned_dir, dtype=torch.float32, device=c.device,
                           experts_implementation=c.kernel(weights_16bit=False))
    unsharded = taylor_scores(reference, calibration, next_token_score_loss, with_heads=True)
    del reference
    c.free()
    c.emit("taylor_scores", batches=sharded.batches, sharded_s=sharded_s,
           sharded_compute="bf16" if c.on_gpu else "float32", unsharded_compute="float32",
           **_compare_scores(config, sharded, unsharded, keep_plan, SlimTargets))

    c.check_time("training")
    torch.manual_seed(cfg.seed)
    engine = FSDPEngine(model, cfg, c.device, run.steps.total_steps)
    engine.model.train()
    ckpt = c.workdir / "stage" / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    at = s["resume_at"]
    trained = _train(c, engine, batches, cfg, eos, save_at=at, ckpt=ckpt)
    shape = model_shape(config)
    predicted = stage_train_memory(shape, "fsdp", 1, s["micro_batch"], s["seq"], c.on_gpu, k=s["k"], overhead=0)
    c.shared["fsdp_losses"] = trained["losses"]
    c.emit("train", steps=len(batches), micro_batch=s["micro_batch"], seq_len=s["seq"], k=s["k"],
           loss_first=trained["losses"][0], loss_last=trained["losses"][-1], kd_first=trained["kd"][0],
           kd_last=trained["kd"][-1], loss_fell=trained["losses"][-1] < trained["losses"][0],
           losses=trained["losses"], tokens_per_s=trained["tokens_per_s"], active_params=shape.active,
           **_mfu(c, shape.active, trained["tokens_per_s"]), **trained["memory"],
           cached_batches_bytes=_batches_bytes(batches), predicted_bytes=predicted.total, predicted=predicted.as_dict(),
           measured_over_predicted=(trained["memory"]["peak_allocated_bytes"] / predicted.total
                                    if c.on_gpu else None), checkpoint_save_s=trained["save_s"],
           memory_note="peak_allocated_bytes: everything allocated during the 30 steps, the cached batches "
                       "included; predicted: stage_train_memory(overhead=0), tensors and allocator slack")

    c.check_time("the final save")
    _final_save(c, engine, run, batches[0]["input_ids"], AutoModelForCausalLM)
    del engine, model
    c.free()

    c.check_time("resume from the distributed checkpoint")
    start = time.perf_counter()
    model = FSDPEngine.resume_student(run, ckpt, c.device)
    resumed = FSDPEngine(model, cfg, c.device, run.steps.total_steps)
    resumed.load(ckpt)
    load_s = time.perf_counter() - start
    _set_rng_state(c, trained["rng"])
    resumed.model.train()
    replay = _train(c, resumed, batches[at:], cfg, eos)["losses"]
    original = trained["losses"][at:]
    c.emit("resume", from_step=at, checkpoint_bytes=sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
           load_s=load_s, original=original, replayed=replay,
           max_abs_diff=max(abs(x - y) for x, y in zip(original, replay)))
    del resumed, model
    c.free()


def _compare_scores(config, sharded, unsharded, keep_plan, SlimTargets) -> dict:
    """Per-layer Spearman of the expert-neuron scores, the ranking of KV groups, and how many of a 50%
    cut's kept neurons (and half the KV groups) the two scorings share."""
    def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
        ra = a.flatten().double().cpu().argsort(stable=True).argsort().double()
        rb = b.flatten().double().cpu().argsort(stable=True).argsort().double()
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))

    flat_a, flat_b = sharded.flat().cpu(), unsharded.flat().cpu()
    layers = sorted(unsharded.experts)
    rho = [spearman(sharded.experts[i], unsharded.experts[i]) for i in layers]
    kv_same = [bool(torch.equal(sharded.kv_groups[i].cpu().argsort(stable=True),
                                unsharded.kv_groups[i].cpu().argsort(stable=True))) for i in sorted(unsharded.kv_groups)]
    targets = SlimTargets(expert_intermediate_size=config.intermediate_size // 2,
                          num_key_value_heads=max(1, config.num_key_value_heads // 2))
    plan_a, plan_b = keep_plan(config, sharded, targets), keep_plan(config, unsharded, targets)
    kept = [float(sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(plan_a.experts[i], plan_b.experts[i]))
                  / plan_b.experts[i].numel()) for i in layers]
    kv_kept = [bool(torch.equal(plan_a.kv_groups[i], plan_b.kv_groups[i])) for i in sorted(plan_b.kv_groups)]
    return {"max_rel_diff": float((flat_a - flat_b).abs().max() / flat_b.abs().max().clamp_min(1e-30)),
            "expert_spearman_per_layer": rho, "expert_spearman_min": min(rho),
            "kv_group_ranking_equal_per_layer": kv_same, "kept_half_overlap_per_layer": kept,
            "kept_half_overlap_min": min(kept), "kv_half_kept_equal_per_layer": kv_kept}


def _final_save(c: Check, engine, run, input_ids: torch.Tensor, AutoModelForCausalLM) -> None:
    """`save_final` (the gathered save), then a plain `from_pretrained` of the result: what it loads
    against the trained tensors cast to the saved dtype, and its logits against the trained model's."""
    from safetensors import safe_open

    start = time.perf_counter()
    engine.save_final(run, 0)
    save_s = time.perf_counter() - start
    stored = set()
    for f in sorted(run.final_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            stored |= {str(h.get_slice(k).get_dtype()) for k in h.keys()}
    engine.model.eval()
    with torch.no_grad():
        want = engine.model(input_ids=input_ids).logits.float()
    reloaded, info = AutoModelForCausalLM.from_pretrained(run.final_dir, output_loading_info=True)
    default_dtype = next(reloaded.parameters()).dtype
    state = reloaded.state_dict()
    diff = 0.0
    for name, p in engine.model.named_parameters():  # gathered one at a time, as the save does
        full = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        diff = max(diff, float((full.to(state[name].dtype).float() - state[name].float()).abs().max()))
    # Compared in the dtype the trained model computes in (bf16 on GPU under FSDP2's policy).
    reloaded = reloaded.to(c.device, torch.bfloat16 if c.on_gpu else torch.float32).eval()
    with torch.no_grad():
        got = reloaded(input_ids=input_ids).logits.float()
    c.emit("final_save", save_s=save_s, files=sorted(p.name for p in run.final_dir.iterdir()),
           stored_dtypes=sorted(stored),
           from_pretrained_dtype=default_dtype, missing_keys=sorted(info["missing_keys"]),
           unexpected_keys=sorted(info["unexpected_keys"]), mismatched_keys=[str(m) for m in info["mismatched_keys"]],
           max_abs_diff_to_trained_cast=diff, logits=_errors(got, want),
           top1_agreement=(got.argmax(-1) == want.argmax(-1)).float().mean())
    engine.model.train()
    del reloaded, state


# -- engines -----------------------------------------------------------------------------------------

def phase_engines(c: Check) -> None:
    from slimmoe.tasks.core.checkpoint import load_config

    c.process_group()
    c.gpu_numerics()
    config = load_config(_stage_run(c, "ddp", c.kernel(weights_16bit=False)).pruned_dir)
    batches = _distill_batches(c, config.vocab_size)[: c.sizes["engine_steps"]]
    losses = {}
    arms = ["ddp", "deepspeed"]
    for strategy in arms:
        c.check_time(f"the {strategy} engine")
        try:
            losses[strategy] = _engine_arm(c, strategy, batches, config)
        except Exception as err:  # noqa: BLE001 - the other engine still runs
            c.error(err, name=strategy)
            if strategy == "ddp" and isinstance(err, ImportError):
                # The ddp engine imports Ray Train even at world size 1: run what it does there (the plain
                # module under bf16 autocast on GPU) next, so a machine without Ray still gets the numbers.
                arms.insert(1, "ddp_without_ray")
        c.free()
    n = min(5, len(batches))
    c.emit("losses_side_by_side", steps=n, fsdp=c.shared.get("fsdp_losses", [])[:n],
           **{name: values[:n] for name, values in losses.items()})


def _engine_arm(c: Check, strategy: str, batches: list[dict], config) -> list[float]:
    from slimmoe.tasks.core.checkpoint import load_model
    from slimmoe.tasks.planning.memory import model_shape, stage_train_memory
    from slimmoe.tasks.slimming import engines

    s = c.sizes
    plain = strategy == "ddp_without_ray"
    # ddp keeps float32 weights under autocast; DeepSpeed's bf16 module computes in its own weights.
    kernel = c.kernel(weights_16bit=strategy == "deepspeed" and c.on_gpu)
    run = _stage_run(c, "ddp" if plain else strategy, kernel)
    cfg = run.cfg
    model = load_model(run.pruned_dir, dtype=torch.float32, device=c.device, experts_implementation=kernel)
    model.train()
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    forward = None
    if plain:
        engine = engines.Engine(model, cfg, c.device, run.steps.total_steps)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if c.on_gpu else contextlib.nullcontext()

        def forward(input_ids):
            with amp:
                return engine.forward(input_ids)
    else:
        engine = engines.engine_class(strategy)(model, cfg, c.device, run.steps.total_steps)
    init_s = time.perf_counter() - start
    module = getattr(engine.model, "module", engine.model)
    floats = {n: str(b.dtype) for n, b in module.named_buffers() if b.is_floating_point()}
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    trained = _train(c, engine, batches, cfg, eos, forward=forward)
    shape = model_shape(config)
    predicted = stage_train_memory(shape, "ddp" if plain else strategy, 1, s["micro_batch"], s["seq"], c.on_gpu,
                                   k=s["k"], overhead=0)
    c.emit(strategy, kernel=kernel, init_s=init_s, steps=len(batches), losses=trained["losses"],
           tokens_per_s=trained["tokens_per_s"], **_mfu(c, shape.active, trained["tokens_per_s"]),
           float_buffers=floats, buffers_float32=all(d == "torch.float32" for d in floats.values()),
           parameter_dtypes=sorted({str(p.dtype) for p in module.parameters()}), **trained["memory"],
           cached_batches_bytes=_batches_bytes(c.shared["batches"]), predicted_bytes=predicted.total,
           measured_over_predicted=(trained["memory"]["peak_allocated_bytes"] / predicted.total if c.on_gpu else None))
    return trained["losses"]


# -- ray -----------------------------------------------------------------------------------------------

def phase_ray(c: Check) -> None:
    if importlib.util.find_spec("ray") is None:
        c.emit("skipped", reason="ray is not importable")
        return
    if c.smoke and not c.with_ray:
        c.emit("skipped", reason="--smoke runs the ray phase only with --with-ray")
        return
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # The driver's own CUDA memory stays held; the workers get their own contexts beside it.
    ray.init(address="local", num_cpus=4, num_gpus=1 if c.on_gpu else 0, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        start = time.perf_counter()
        probe = ray.remote(num_gpus=1 if c.on_gpu else 0)(_ray_probe)
        facts = ray.get(probe.remote(), timeout=60)
        c.emit("gpu_task", seconds=time.perf_counter() - start, **facts)
        c.check_time("the Ray Train job")
        start = time.perf_counter()
        resources = {"CPU": 1, **({"GPU": 1} if c.on_gpu else {})}
        # The worker writes what it saw to a file: Ray Train 2's Result keeps metrics only with a checkpoint.
        out = c.workdir / "ray_train_worker.json"
        TorchTrainer(
            _ray_train_worker, train_loop_config={"out": str(out)},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=c.on_gpu, resources_per_worker=resources),
            run_config=RunConfig(name="gpu_check", storage_path=str(c.workdir / "ray_train")),
        ).fit()
        c.emit("train_worker", seconds=time.perf_counter() - start, **json.loads(out.read_text()))
    finally:
        ray.shutdown()


def _ray_probe() -> dict:
    import torch

    out = {"cuda_available": torch.cuda.is_available(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _ray_train_worker(config: dict) -> None:
    import ray.train.torch
    import torch
    import torch.distributed as dist

    device = ray.train.torch.get_device()
    t = torch.ones(4, device=device)
    dist.all_reduce(t)
    Path(config["out"]).write_text(json.dumps({"backend": dist.get_backend(), "device": str(device),
                                               "world_size": dist.get_world_size(), "all_reduce_sum": float(t.sum())}))


# -- main ----------------------------------------------------------------------------------------------

RUNNERS = {"facts": phase_facts, "moe_layer": phase_moe_layer, "teacher": phase_teacher,
           "fsdp_stage": phase_fsdp_stage, "engines": phase_engines, "ray": phase_ray}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, seconds (what the test runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--out", help="also write the JSON lines to this file")
    parser.add_argument("--workdir", help="keep the models and checkpoints here (default: a temporary directory, "
                                          "removed at the end)")
    parser.add_argument("--with-ray", action="store_true", help="run the ray phase on --smoke too")
    args = parser.parse_args(argv)
    selected = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(selected) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")

    # The JSON lines keep the real stdout; anything else written there (DeepSpeed's logger, NCCL, Ray,
    # C libraries writing to fd 1) goes to stderr, so stdout can be pasted as it is.
    sys.stdout.flush()
    lines = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        c = Check(args, lines)
    except Exception as err:  # e.g. --device cuda where there is none: still one JSON line to paste
        lines.write(json.dumps({"phase": "main", "error": f"{type(err).__name__}: {err}"}) + "\n")
        return 1
    try:
        c.emit("start", smoke=args.smoke, device=str(c.device), phases=selected, workdir=str(c.workdir))
        for name in PHASES:
            if name in selected:
                c.run_phase(name, RUNNERS[name])
    finally:
        c.phase = "main"
        c.emit("end", errors=c.errors)
        c.close()
        lines.close()
    return 1 if c.errors else 0


if __name__ == "__main__":
    sys.exit(main())
