"""A teacher (or a by-hand command's model) named by its Hub id, offline: resolved to a commit through a
Hub cache the test fills itself (the layout huggingface_hub reads), every node keyed on that commit,
and a moved branch never reusing an old output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from standins import take_calls, workflow_dict, write_config

REPO = "org/tiny-moe"
runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """Two saves of one tiny PhiMoE with the same tokenizer and different weights (two commits of a repo)."""
    from tiny import tiny_model

    a = tiny_model_dir
    b = tmp_path_factory.mktemp("hub_models") / "b"
    b.mkdir()
    vocab = json.loads((a / "config.json").read_text())["vocab_size"]
    tiny_model("phimoe", seed=1, vocab_size=vocab).save_pretrained(b)
    for f in a.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, b / f.name)
    return {"a": a, "b": b}


class HubCache:
    """A Hub cache as `hf download` leaves it: blobs by content, snapshots of symlinks, refs naming commits."""

    def __init__(self, root: Path):
        self.root = root

    def repo_dir(self, repo: str) -> Path:
        return self.root / ("models--" + repo.replace("/", "--"))

    def publish(self, repo: str, src: Path, ref: str | None = "main", only: tuple = ()) -> str:
        files = sorted(f for f in src.iterdir() if f.is_file() and (not only or f.name in only))
        commit = hashlib.sha1(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)).hexdigest()
        repo_dir = self.repo_dir(repo)
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in files:
            blob = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy2(f, repo_dir / "blobs" / blob)
            (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
        if ref:
            self.move(repo, ref, commit)
        return commit

    def move(self, repo: str, ref: str, commit: str) -> None:
        (self.repo_dir(repo) / "refs").mkdir(parents=True, exist_ok=True)
        (self.repo_dir(repo) / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch, models):
    cache = HubCache(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache.root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cache.a = cache.publish(REPO, models["a"])
    return cache


def _workflow(ws: Path, **teacher) -> Path:
    cfg = workflow_dict(ws, teacher=teacher)
    cfg["data"]["seq_len"] = 128  # validation checks it against the tiny teacher's context (256)
    return write_config(ws, cfg)


def _hub_workflow(ws: Path, **teacher) -> Path:
    return _workflow(ws, path=REPO, **teacher)


def _marker(ws: Path, node: str, key: str) -> dict:
    return json.loads((ws / "store" / "wf" / node / key / "_SUCCESS").read_text())


def test_a_hub_teacher_runs_from_its_snapshot_and_every_node_is_keyed_on_the_commit(ws, hub, models):
    from slimmoe.workflows.dag import build_dag
    from slimmoe.workflows.driver import run_workflow

    path = _hub_workflow(ws)
    log: list[str] = []
    first = run_workflow(path, log=log.append)
    calls = ws / "calls.txt"
    assert take_calls(calls) == ["tokenize", "teacher_logits", "stage_1", "stage_2", "stage_3", "one_stage",
                                 "evaluate_stage_3", "evaluate_one_stage"]
    snapshot = hub.repo_dir(REPO) / "snapshots" / hub.a
    # The commit is recorded when the run starts, and the nodes read the snapshot, never the Hub.
    assert f"skipped teacher (Hub model {REPO} at main: commit {hub.a}, snapshot {snapshot}" in "\n".join(log)
    assert first["teacher"].path == str(snapshot)
    logits = _marker(ws, "teacher_logits", first["teacher_logits"].key)
    assert logits["inputs"]["teacher"]["hub"] == {"repo_id": REPO, "revision": "main", "commit": hub.a,
                                                  "path": str(snapshot)}

    # main moves to a commit with other weights (same tokenizer): everything that reads the weights
    # runs again, nothing old is reused; the tokenized data is.
    b = hub.publish(REPO, models["b"])
    dag = build_dag(path)
    assert dag.nodes["teacher"].hub["commit"] == b
    assert dag.nodes["tokenize"].key == first["tokenize"].key
    assert all(dag.nodes[n].key != first[n].key for n in first if n not in ("teacher", "tokenize"))
    log.clear()
    run_workflow(path, log=log.append)
    assert take_calls(calls) == ["teacher_logits", "stage_1", "stage_2", "stage_3", "one_stage",
                                 "evaluate_stage_3", "evaluate_one_stage"]
    assert f"commit {b}" in "\n".join(log)

    # Pinned to the first commit by revision, the workflow is the first run again: all complete.
    pinned = run_workflow(_hub_workflow(ws, revision=hub.a), log=lambda _: None)
    assert take_calls(calls) == []
    assert {n: r.key for n, r in pinned.items()} == {n: r.key for n, r in first.items()}


def test_the_key_depends_on_the_commit_even_where_the_files_are_equal(ws, hub, models):
    """Two commits holding the same files (a README changed): the teacher pass is keyed apart."""
    from slimmoe.workflows.dag import build_dag

    path = _hub_workflow(ws)
    before = build_dag(path)
    snapshots = hub.repo_dir(REPO) / "snapshots"
    other = "f" * 40
    shutil.copytree(snapshots / hub.a, snapshots / other, symlinks=True)
    hub.move(REPO, "main", other)
    after = build_dag(path)
    assert after.nodes["teacher"].facets["model"] == before.nodes["teacher"].facets["model"]
    assert after.nodes["teacher_logits"].key != before.nodes["teacher_logits"].key
    assert after.nodes["stage_1"].key != before.nodes["stage_1"].key


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_an_unknown_hub_id_offline_is_refused_in_one_line_with_the_download_command(ws, hub):
    from slimmoe.workflows.cli import app

    path = _workflow(ws, path="org/missing-moe")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if "teacher.path" in line]
    assert len(lines) == 1, result.output
    line = lines[0]
    assert f"wf.yaml:{_line_of(path, 'org/missing-moe')}: teacher.path: org/missing-moe is neither a local " \
           "directory nor in the Hub cache" in line
    assert "HF_HUB_OFFLINE is set" in line and "`hf download org/missing-moe --revision main --cache-dir " in line
    assert "does not exist" not in result.output  # not read as a path under the config's folder
    assert not (ws / "calls.txt").exists()

    # A revision the cache has no ref for is refused the same way, naming it.
    result = runner.invoke(app, ["run", str(_hub_workflow(ws, revision="v2"))])
    assert result.exit_code == 2 and f"hf download {REPO} --revision v2" in result.output
    # A revision beside a local directory has nothing to pick.
    local = _workflow(ws, path=str(ws / "teacher"), revision="v2")
    result = runner.invoke(app, ["run", str(local)])
    assert result.exit_code == 2
    assert f"wf.yaml:{_line_of(local, 'revision')}: teacher.revision: revision 'v2' picks a commit of a Hub " \
           "model" in result.output
    assert not (ws / "calls.txt").exists()


def test_plan_reads_config_json_from_the_snapshot_and_run_wants_the_weights(ws, hub, models):
    from slimmoe.tasks.core.params import count_parameters_from_config
    from slimmoe.workflows.cli import app
    from transformers import AutoConfig

    # A cache holding the config alone (what a laptop fetches to plan): plan works, run names what is missing.
    light = "org/config-only"
    commit = hub.publish(light, models["a"], only=("config.json",))
    path = _workflow(ws, path=light)
    result = runner.invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output[result.output.index("{"):])
    nodes = {n["name"]: n for n in plan["nodes"]}
    counts = count_parameters_from_config(AutoConfig.from_pretrained(models["a"]))
    assert nodes["teacher_logits"]["params_before"]["total"] == counts["total"]

    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert f"teacher.path: the snapshot of {light} at commit {commit}" in result.output
    assert "lacks model.safetensors" in result.output and f"hf download {light} --revision main" in result.output
    assert not (ws / "calls.txt").exists()


def test_slim_takes_a_hub_id_and_a_revision(hub, models, tmp_path):
    from safetensors.numpy import load_file

    from slimmoe.workflows.cli import app

    b = hub.publish(REPO, models["b"])  # main moves on; `v1` stays at the first commit
    hub.move(REPO, "v1", hub.a)
    outs = {}
    for name, model, revision in (("local", str(models["a"]), None), ("v1", REPO, "v1"), ("main", REPO, None)):
        outs[name] = tmp_path / name
        args = ["slim", model, str(outs[name]), "--expert-size", "16"] + (["--revision", revision] if revision else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        if model == REPO:
            assert f"commit {hub.a if revision else b}" in result.output

    def weights(out):
        return load_file(str(out / "model.safetensors"))

    local, v1, main = weights(outs["local"]), weights(outs["v1"]), weights(outs["main"])
    assert local.keys() == v1.keys() and all((local[k] == v1[k]).all() for k in local)
    assert any((local[k] != main[k]).any() for k in local)

    result = runner.invoke(app, ["slim", "org/missing-moe", str(tmp_path / "x"), "--expert-size", "16"])
    assert result.exit_code == 2 and "hf download org/missing-moe --revision main" in result.output
    assert not (tmp_path / "x").exists()


def test_hub_ids_are_told_from_paths():
    from slimmoe.tasks.core.hub import is_hub_id

    assert is_hub_id("microsoft/Phi-3.5-MoE-instruct") and is_hub_id("Qwen/Qwen3-30B-A3B") and is_hub_id("gpt2")
    for path in ("./org/name", "/abs/org/name", "~/models/x", "a/b/c", "../x", "org/name/"):
        assert not is_hub_id(path), path
    assert not is_hub_id(os.getcwd())  # a local path that exists wins


@pytest.fixture
def fake_hub(hub, monkeypatch):
    """A Hub endpoint on localhost that answers a gated model and an unknown one as huggingface.co does."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    answers = {"/api/models/org/gated-moe": (403, "GatedRepo"),
               "/api/models/org/nowhere-moe": (401, "RepoNotFound")}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status, code = answers.get(self.path, (404, "RepoNotFound"))
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "no"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()


def test_a_gated_or_private_model_asks_for_a_token(ws, fake_hub):
    from slimmoe.workflows.cli import app

    path = _workflow(ws, path="org/gated-moe")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert f"wf.yaml:{_line_of(path, 'org/gated-moe')}: teacher.path: org/gated-moe is a gated model: accept its " \
           "terms at https://huggingface.co/org/gated-moe and give a token of that account (set HF_TOKEN, or run " \
           "`hf auth login`)" in result.output
    result = runner.invoke(app, ["slim", "org/nowhere-moe", str(ws / "x"), "--expert-size", "16"])
    assert result.exit_code == 2
    assert "org/nowhere-moe is neither a local directory nor a model on the Hub you can read" in result.output
    assert "HF_TOKEN" in result.output and not (ws / "calls.txt").exists()
