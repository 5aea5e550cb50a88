"""The shipped cluster manifests: what reaches the Jobs API (it runs code) and that the embedded
workflow is one `slimmoe run` accepts."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "cluster" / name).read_text()) if d]


def test_rayjob_guards_the_jobs_api_with_a_token_and_a_network_policy():
    docs = _docs("rayjob-a100.yaml")
    job = next(d for d in docs if d["kind"] == "RayJob")
    auth = job["spec"]["rayClusterSpec"].get("authOptions") or {}
    assert auth.get("mode") == "token" and auth.get("secretName"), "Ray token authentication must be on"

    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    head = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "head"]
    assert head, "no NetworkPolicy selects the Ray head pods"
    rules = head[0]["spec"]["ingress"]
    assert "Ingress" in head[0]["spec"]["policyTypes"]
    for rule in rules:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from") or []
        assert sources, f"an ingress rule without `from` admits every pod: {rule}"
        if not ports:  # all ports: only for the cluster's own Ray pods
            assert all(s.get("podSelector", {}).get("matchLabels") == {"ray.io/is-ray-node": "yes"} for s in sources)
    dashboard = [r for r in rules if 8265 in {p["port"] for p in r.get("ports", [])}]
    assert dashboard, "port 8265 is not admitted for the operator"
    namespaces = [s["namespaceSelector"] for r in dashboard for s in r["from"] if "namespaceSelector" in s]
    assert namespaces and all(ns.get("matchLabels") for ns in namespaces)  # a named namespace, not every one
    submitter = [s["podSelector"]["matchLabels"] for r in dashboard for s in r["from"] if "podSelector" in s]
    assert {"batch.kubernetes.io/job-name": job["metadata"]["name"]} in submitter


def test_rayjob_embedded_workflow_validates():
    from slimmoe.workflows.dag import build_dag

    config_map = next(d for d in _docs("rayjob-a100.yaml") if d["kind"] == "ConfigMap")
    dag = build_dag(yaml.safe_load(config_map["data"]["workflow.yaml"]), check_env=False)
    assert [n for n in dag.nodes if n.startswith("stage_")] == ["stage_1", "stage_2", "stage_3"]
