"""What the GPU paths decide, checked on CPU: the experts kernel per device, the strategy a GPU stage
gets, TF32, loading straight onto the device, and DeepSpeed's buffers staying float32."""

import os
import sys
import subprocess
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from slimmoe.tasks.core.kernels import GPU_CAPABILITY, enable_gpu_numerics, experts_kernel, fallback_reason
from slimmoe.tasks.data.config import PassFacts, TeacherLogitsConfig
from slimmoe.tasks.slimming.config import StageConfig
from slimmoe.tasks.slimming.engines import restore_buffers

A100, H100 = GPU_CAPABILITY["a100"], GPU_CAPABILITY["h100"]


def test_the_experts_kernel_never_is_the_per_expert_fallback_unless_asked_for():
    assert experts_kernel(None, on_gpu=False) == "grouped_mm"  # measured faster than eager on CPU
    assert experts_kernel(None, True, H100, weights_16bit=True) == "grouped_mm"
    assert experts_kernel(None, True, A100, weights_16bit=True) == "eager"  # no native grouped GEMM on sm80
    assert experts_kernel(None, True, H100, weights_16bit=False) == "eager"  # autocast over float32 weights
    assert experts_kernel(None, True, None) == "eager"
    for capability in (A100, H100, None):
        for sixteen in (True, False):
            chosen = experts_kernel("auto", True, capability, sixteen)
            assert fallback_reason(chosen, True, capability, sixteen) is None, (capability, sixteen)
    assert experts_kernel("grouped_mm", True, A100) == "grouped_mm"  # a kernel asked for is kept
    assert "8.0" in fallback_reason("grouped_mm", True, A100, True)
    with pytest.raises(ValueError, match="experts_implementation='fast'"):
        experts_kernel("fast", True, H100)


def test_a_gpu_stage_computes_its_experts_in_bf16_with_float32_masters():
    one = StageConfig(expert_intermediate_size=32, token_budget=800, use_gpu=True, num_workers=1)
    assert one.strategy == "fsdp" and one.experts_weights_16bit()  # FSDP2's bf16 parameters, even on one GPU
    kept = StageConfig(expert_intermediate_size=32, token_budget=800, use_gpu=True, num_workers=1, keep_optimizer_state=True)
    assert kept.strategy == "ddp" and not kept.experts_weights_16bit()  # a ddp-only option: autocast, eager
    assert StageConfig(expert_intermediate_size=32, token_budget=800, num_workers=2).strategy == "ddp"  # CPU as before
    assert kept.with_changes(keep_optimizer_state=False).strategy == "fsdp"  # derived again, not kept
    with pytest.raises(ValidationError, match="experts_implementation: grouped_mm with strategy: ddp on GPU"):
        StageConfig(expert_intermediate_size=32, token_budget=800, use_gpu=True, strategy="ddp", experts_implementation="grouped_mm")
    assert StageConfig(expert_intermediate_size=32, token_budget=800).experts_kernel_on(torch.device("cpu")) == "grouped_mm"


def test_the_teacher_pass_kernel_is_planned_from_the_gpu_type_and_else_left_to_each_actor():
    cfg = TeacherLogitsConfig(use_gpu=True)
    assert cfg.resolve_pass(PassFacts(True, gpu_capability=H100)).experts_kernel == "grouped_mm"
    assert cfg.resolve_pass(PassFacts(True, gpu_capability=A100)).experts_kernel == "eager"
    assert cfg.resolve_pass(PassFacts(True)).experts_kernel == "auto"  # the node: each actor asks its own GPU
    assert TeacherLogitsConfig.kernel_for("auto", True, A100, "bfloat16") == "eager"
    assert TeacherLogitsConfig(use_gpu=True, dtype="float32").resolve_pass(
        PassFacts(True, gpu_capability=H100)).experts_kernel == "eager"
    assert TeacherLogitsConfig(use_gpu=False).resolve_pass(PassFacts(False)).experts_kernel == "grouped_mm"


def test_tf32_is_turned_on_for_cuda_devices_only():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        enable_gpu_numerics(torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        enable_gpu_numerics(torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.get_float32_matmul_precision() == "high"  # and torch can still report it
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_a_model_for_a_gpu_is_loaded_straight_onto_it(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from slimmoe.tasks.core.checkpoint import load_model

    asked = {}

    def from_pretrained(path, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError, match="stop here"):
        load_model(tiny_model_dir, device="cuda:1")
    assert asked["device_map"] == {"": torch.device("cuda", 1)}
    asked.clear()
    with pytest.raises(RuntimeError, match="stop here"):
        load_model(tiny_model_dir, device="cpu")
    assert "device_map" not in asked


def test_restore_buffers_puts_back_the_exact_float32_rotary_frequencies():
    from tiny import tiny_model

    model = tiny_model("mixtral")
    saved = {n: b.detach().clone() for n, b in model.named_buffers() if b.dtype == torch.float32}
    exact = dict(saved)
    model.bfloat16()  # what DeepSpeed's bf16 mode did before it kept buffers
    assert any(b.dtype == torch.bfloat16 for n, b in model.named_buffers() if n.endswith("inv_freq"))
    restored = restore_buffers(model, saved)
    assert any(n.endswith("inv_freq") for n in restored)
    for name, buf in model.named_buffers():
        if name in exact:
            assert buf.dtype == torch.float32 and torch.equal(buf, exact[name]), name


_DEEPSPEED_WORKER = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from tiny import tiny_model
from slimmoe.tasks.slimming.config import StageConfig
from slimmoe.tasks.slimming.engines import DeepSpeedEngine
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
cfg = StageConfig(expert_intermediate_size=32, token_budget=800, strategy="deepspeed", use_gpu=True)  # bf16 mode, as on GPUs
assert cfg.train_dtype() == "bfloat16"
engine = DeepSpeedEngine(tiny_model("mixtral").train(), cfg, torch.device("cpu"), total_steps=4)
params = {p.dtype for p in engine.model.module.parameters()}
buffers = {n: b.dtype for n, b in engine.model.module.named_buffers() if n.endswith("inv_freq")}
print("PARAMS", sorted(map(str, params)), "BUFFERS", sorted(set(map(str, buffers.values()))), len(buffers))
"""


def test_deepspeed_in_bf16_keeps_the_rotary_buffers_float32(tmp_path):
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29533"}
    proc = subprocess.run([sys.executable, "-c", _DEEPSPEED_WORKER, str(Path(__file__).parent), str(tmp_path / "pg")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("PARAMS"))
    assert "'torch.bfloat16'" in line.split("BUFFERS")[0], line  # bf16 mode is really on
    assert line.split("BUFFERS")[1].split()[0] == "['torch.float32']" and not line.endswith(" 0"), line
