"""A teacher actor over several GPUs: the balanced split loads the same model, the pool asks Ray for
the GPUs, `auto` picks the fewest that hold the pass, and bad values are refused naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from pydantic import ValidationError

from slimmoe.tasks.core.checkpoint import load_model
from slimmoe.tasks.core.placement import balanced_device_map, split_layers
from slimmoe.tasks.data.config import PassFacts, TeacherLogitsConfig
from slimmoe.tasks.nodes.teacher_logits import resolve_teacher_pass, teacher_pool_args
from tiny import tiny_config, tiny_model

# Phi-3.5-MoE's shape (the transformers defaults): 41.9B parameters, 84 GB in bf16.
PHI35 = transformers.PhimoeConfig()


@pytest.fixture(scope="module")
def four_layer_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("four_layers")
    tiny_model("phimoe", num_hidden_layers=4).save_pretrained(out, safe_serialization=True)
    return out


def test_a_split_over_three_devices_gives_the_single_device_logits(four_layer_teacher):
    config = transformers.AutoConfig.from_pretrained(four_layer_teacher)
    device_map = balanced_device_map(config, ["cpu", "cpu", "cpu"])
    owners = [device_map[f"model.layers.{i}"] for i in range(4)]
    assert owners == ["cpu"] * 4
    # The same map over three distinct devices: contiguous runs, every device used, head on the last.
    numbered = balanced_device_map(config, [0, 1, 2])
    layers = [numbered[f"model.layers.{i}"] for i in range(4)]
    assert layers == sorted(layers) and set(layers) == {0, 1, 2}
    assert numbered["model.embed_tokens"] == 0 and numbered["lm_head"] == numbered["model.norm"] == 2
    assert set(numbered) == set(device_map) == {"model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head",
                                                *(f"model.layers.{i}" for i in range(4))}

    split = load_model(four_layer_teacher, experts_implementation="grouped_mm", device_map=device_map).eval()
    whole = load_model(four_layer_teacher, experts_implementation="grouped_mm").eval()
    x = torch.randint(3, config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(split(input_ids=x, use_cache=False).logits, whole(input_ids=x, use_cache=False).logits)


def test_the_split_balances_bytes_and_keeps_room_for_the_logits():
    # Loads in parameters: device 0 starts with 5, the last with 25; 8 layers of 10 go where the
    # largest load stays smallest (40 here; 105 / 3 = 35 is not reachable with whole layers).
    assert split_layers([10] * 8, 3, first_load=5, last_load=25) == [0, 0, 0, 1, 1, 1, 1, 2]
    assert split_layers([10] * 4, 1) == [0, 0, 0, 0]
    config = tiny_config("phimoe", num_hidden_layers=6)
    plain = balanced_device_map(config, [0, 1])
    reserved = balanced_device_map(config, [0, 1], reserve_bytes=10**9)
    on_last = lambda m: sum(m[f"model.layers.{i}"] == 1 for i in range(6))  # noqa: E731
    assert on_last(plain) == 3 and on_last(reserved) == 0  # a gigabyte of logits: the head's GPU holds no layer
    # A vocabulary whose embedding outweighs layers: untied, embedding and head balance each other;
    # tied, the one shared matrix sits on device 0 with the head, and the layers go to device 1.
    wide = dict(vocab_size=2048, num_hidden_layers=6)
    untied = balanced_device_map(tiny_config("phimoe", **wide), [0, 1])
    tied = balanced_device_map(tiny_config("phimoe", **wide, tie_word_embeddings=True), [0, 1])
    assert untied["lm_head"] == 1 and on_last(untied) == 3
    assert tied["lm_head"] == tied["model.norm"] == tied["model.embed_tokens"] == 0 and on_last(tied) == 5


def test_a_two_gpu_actor_asks_ray_for_two_gpus(tmp_path):
    cfg = TeacherLogitsConfig(gpus_per_actor=2, device="cuda", cpus_per_actor=0.5)
    args = teacher_pool_args(cfg, "cuda", 2)
    assert args["num_gpus"] == 2 and args["num_cpus"] == 0.5 and args["compute"].min_size == 1
    assert "num_gpus" not in teacher_pool_args(TeacherLogitsConfig(), "cpu", 0)
    # A Ray of its own with two (fake) GPUs: the session's shared cluster has none, which other tests need.
    script = textwrap.dedent(f"""
        import json, os, sys
        import ray, transformers
        from slimmoe.tasks.data.config import TeacherLogitsConfig
        from slimmoe.tasks.nodes.teacher_logits import resolve_teacher_pass, teacher_pool_args

        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        config = transformers.PhimoeConfig(**{tiny_config("phimoe").to_diff_dict()!r})
        cfg = TeacherLogitsConfig(gpus_per_actor=2, device="cuda", cpus_per_actor=0.5)
        gpus = resolve_teacher_pass(cfg, config, 16).gpus_per_actor
        try:
            resolve_teacher_pass(TeacherLogitsConfig(gpus_per_actor=3, device="cuda"), config, 16)
            too_many = None
        except ValueError as err:
            too_many = str(err)

        class Probe:
            def __call__(self, batch):
                ctx = ray.get_runtime_context()
                return {{"gpu_ids": [json.dumps(sorted(ctx.get_accelerator_ids()["GPU"]))] * len(batch["id"]),
                        "visible": [os.environ.get("CUDA_VISIBLE_DEVICES", "")] * len(batch["id"])}}

        rows = ray.data.range(2).map_batches(Probe, batch_size=1, **teacher_pool_args(cfg, "cuda", gpus)).take_all()
        print(json.dumps({{"gpus": gpus, "too_many": too_many, "rows": rows}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["gpus"] == 2
    assert "logits.gpus_per_actor=3" in got["too_many"] and "has 2 GPUs" in got["too_many"]
    assert [json.loads(r["gpu_ids"]) for r in got["rows"]] == [["0", "1"], ["0", "1"]]
    assert {r["visible"] for r in got["rows"]} == {"0,1"}


def test_auto_takes_the_fewest_gpus_that_hold_the_pass(ray_cluster):
    def auto(gb: float, batch_size: int = 8) -> int:
        cfg = TeacherLogitsConfig(gpus_per_actor="auto", gpu_memory_gb=gb, batch_size=batch_size, device="cuda")
        return cfg.resolve_pass(PassFacts(cluster_has_gpus=True), PHI35, seq_len=4096).gpus_per_actor

    # 84 GB of bf16 weights: not one 80 GB GPU; two halves of 42 GB plus 10.5 GB of float32 logits
    # for 8 x 4096 tokens fit. One 141 GB GPU holds it all.
    assert auto(80) == 2 and auto(141) == 1
    assert auto(80, batch_size=32) > 2  # four times the logits no longer fit beside half the weights
    with pytest.raises(ValueError, match=r"logits.gpus_per_actor: auto: the teacher pass does not fit 8 GPUs"):
        auto(10)
    # A CPU pass asks for no GPU, whatever auto would say.
    assert TeacherLogitsConfig(gpus_per_actor="auto").resolve_pass(PassFacts(False), PHI35, 4096).gpus_per_actor == 0


def test_auto_without_gpu_memory_and_no_gpu_worker_names_the_setting(ray_cluster):
    cfg = TeacherLogitsConfig(gpus_per_actor="auto", device="cuda", wait_for_actors_s=1)
    with pytest.raises(ValueError, match=r"no GPU worker answered within wait_for_actors_s=1s; set resources.gpu_memory_gb"):
        resolve_teacher_pass(cfg, PHI35, 4096)


def test_bad_values_are_refused_naming_the_field(ray_cluster, tmp_path):
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ValidationError, match=r"gpus_per_actor\n.*whole number of GPUs >= 1 or 'auto'"):
            TeacherLogitsConfig(gpus_per_actor=bad)
    assert TeacherLogitsConfig(gpus_per_actor="4").gpus_per_actor == 4
    for cpu in ({"device": "cpu"}, {"use_gpu": False}):
        with pytest.raises(ValidationError, match=r"logits.gpus_per_actor=2 asks for GPUs, but the teacher pass runs on CPU"):
            TeacherLogitsConfig(gpus_per_actor=2, **cpu)
    # device auto on a cluster without GPUs: known only on the driver, before the pool starts.
    with pytest.raises(ValueError, match=r"logits.gpus_per_actor=2 asks for GPUs.*the Ray cluster has no GPUs"):
        resolve_teacher_pass(TeacherLogitsConfig(gpus_per_actor=2), PHI35, 4096)


def test_the_workflow_fills_gpu_memory_and_names_a_bad_value(tmp_path):
    from standins import make_teacher, workflow_dict, write_config

    from slimmoe.workflows.config import WorkflowConfigError, load_workflow

    make_teacher(tmp_path / "teacher")
    cfg = workflow_dict(tmp_path)
    cfg["logits"]["gpus_per_actor"] = "auto"
    cfg["resources"]["gpu_memory_gb"] = 80
    logits = load_workflow(write_config(tmp_path, cfg)).config.logits
    assert (logits.gpus_per_actor, logits.gpu_memory_gb) == ("auto", 80)
    cfg["logits"]["gpus_per_actor"] = 0
    path = write_config(tmp_path, cfg)
    with pytest.raises(WorkflowConfigError, match=r"wf.yaml:\d+: logits.gpus_per_actor: .*whole number of GPUs"):
        load_workflow(path)


def test_the_command_line_takes_gpus_per_actor(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app

    seen = []

    def fake(cfg, teacher_dir, tokens_dir, out_dir):
        seen.append(cfg)
        return {"tokens": 0, "tokens_per_s": 0.0, "bytes_per_token": 0.0, "storage_ratio": 0.0}

    monkeypatch.setattr("slimmoe.tasks.nodes.teacher_logits.run_teacher_logits", fake)
    base = ["teacher-logits", "t", "tok", str(tmp_path / "out")]
    for value, expected in (("2", 2), ("auto", "auto")):
        res = CliRunner().invoke(app, [*base, "--gpus-per-actor", value, "--gpu-memory-gb", "80", "--device", "cuda"])
        assert res.exit_code == 0, res.output
        assert (seen[-1].gpus_per_actor, seen[-1].gpu_memory_gb) == (expected, 80)
    res = CliRunner().invoke(app, [*base, "--gpus-per-actor", "0"])
    assert res.exit_code == 2 and "--gpus-per-actor: " in res.output and "whole number of GPUs" in res.output


def test_the_next_forward_runs_while_a_batch_is_finished(four_layer_teacher):
    """Depth 2: the forward of batch 1 starts before the finish of batch 0 ends (it waits for that
    finish to have started, so a serial actor would never get there); depth 1 keeps them in order."""
    import asyncio
    import threading

    import pyarrow as pa

    from slimmoe.tasks.nodes.teacher_logits import _TeacherActor, _norm

    config = transformers.AutoConfig.from_pretrained(four_layer_teacher)
    batches = [pa.table({"row_id": pa.array([2 * i, 2 * i + 1], pa.int64()),
                         "input_ids": pa.array([[3, 4, 5, 6], [7, 8, 9, 10]], pa.list_(pa.int32())),
                         "path": pa.array(["x", "x"])}) for i in range(3)]

    def run(depth: int) -> list[str]:
        actor = _TeacherActor(str(four_layer_teacher), k=4, dtype="float32", device="cpu", gpus=0,
                              experts_implementation="grouped_mm", trust_remote_code=False, torch_threads=1,
                              vocab_size=config.vocab_size, split_of_path={_norm("x"): 0}, pipeline_depth=depth)
        events, finishing, forward_1 = [], threading.Event(), threading.Event()
        forward, finish = actor.forward, actor.finish

        def traced_forward(batch):
            i = batch.column("row_id")[0].as_py() // 2
            if i == 1:
                finishing.wait(timeout=5)  # on a serial actor: times out, finish 0 has not started
            events.append(f"forward {i} start")
            if i == 1:
                forward_1.set()
            return forward(batch)

        def traced_finish(batch, staged):
            i = batch.column("row_id")[0].as_py() // 2
            finishing.set()
            if i == 0 and depth > 1:
                # A finish can end before a loaded machine wakes the next forward's thread: hold it until
                # that forward has started (an actor that cannot overlap them never gets there).
                forward_1.wait(timeout=30)
            out = finish(batch, staged)
            events.append(f"finish {i} end")
            return out

        actor.forward, actor.finish = traced_forward, traced_finish

        async def main():
            return await asyncio.gather(*[actor(b) for b in batches])

        tables = asyncio.run(main())
        assert [t.column("row_id").to_pylist() for t in tables] == [[0, 1], [2, 3], [4, 5]]
        return events

    overlapped = run(2)
    assert overlapped.index("forward 1 start") < overlapped.index("finish 0 end"), overlapped
    serial = run(1)
    assert serial == ["forward 0 start", "finish 0 end", "forward 1 start", "finish 1 end",
                      "forward 2 start", "finish 2 end"]
