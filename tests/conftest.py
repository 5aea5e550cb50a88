import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny PhiMoE checkpoint with a trained byte-level BPE tokenizer (read-only for tests)."""
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_phimoe"), "phimoe")


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, ray_cluster):
    """A small trained teacher, its tokenized data and its logit cache (read-only for tests)."""
    from stage_helpers import build_stage_pipeline

    return build_stage_pipeline(tmp_path_factory.mktemp("stage"))


@pytest.fixture(scope="session")
def ddp_stage(pipeline, tmp_path_factory):
    """One 2-worker ddp stage on `pipeline` (pure KD, 40 steps), shared by the tests that check it and
    compare other strategies against it: (config, output dir, run_stage's headline)."""
    from slimmoe.tasks.nodes.stage import run_stage
    from stage_helpers import stage_cfg

    root = tmp_path_factory.mktemp("ddp_stage")
    cfg = stage_cfg(next_token_weight=0.0)
    headline = run_stage(cfg, pipeline["teacher"], pipeline["logits"], root / "out", root / "work",
                         teacher_fingerprint=pipeline["fp"], name="stage_1")
    return cfg, root / "out", headline
