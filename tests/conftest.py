import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default: a run waits up to that long to start,
# to register each checkpoint and to see that it finished. Polling faster takes seconds off every stage.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session."""
    import ray

    if not ray.is_initialized():
        # The dummy S3 credentials in every worker: Ray Data reads test data from the moto server (`s3_server`)
        # in workers that may have started before that fixture set them in this process's environment.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": S3_ENV})
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


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace for workflow configs (see standins.workflow_dict): stand-in node kinds and a teacher;
    stand-in calls are logged to calls.txt."""
    import standins

    standins.install()
    standins.make_teacher(tmp_path / "teacher")
    monkeypatch.setenv("STANDIN_CALLS", str(tmp_path / "calls.txt"))
    yield tmp_path
    standins.uninstall()


# Dummy credentials: the AWS SDK inside pyarrow signs every request and would find none; and no
# lookups at a cloud metadata service this machine does not have (each one waits for a timeout).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class S3Server:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint  # http://127.0.0.1:PORT

    def new_bucket(self) -> str:
        import boto3

        name = f"slimmoe-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def uri(self, bucket: str, prefix: str = "store") -> str:
        """A storage URI that carries its endpoint, so any process with the credentials can open it."""
        host = self.endpoint.split("://", 1)[1]
        return f"s3://{bucket}/{prefix}?endpoint_override={host}&scheme=http&region=us-east-1"

    def keys(self, bucket: str) -> list[str]:
        """Every object key in the bucket, as the S3 API lists them (directory markers included)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    """Moto's S3 server in this process on localhost; subprocesses reach it through the endpoint in
    the storage URI and the dummy credentials set in the environment for the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would bury a failure's log
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield S3Server(f"http://{host}:{port}")
        finally:
            server.stop()
