"""The Grafana dashboard and the alerts query only metrics the code exports (read from the
operator's and the trainer's Prometheus registries, not from a list), and the monitors select
what the operator actually creates."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import (
    CHART,
    NAMESPACE,
    ROOT,
    Manifest,
    example_job,
    one,
    render,
    require_helm,
    run_helm,
)

from kubetune_operator import builders
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import Settings
from kubetune_trainer.metrics import TrainerMetrics
from support.tools import tool_path

MONITORING = CHART / "ci" / "monitoring-values.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "kubetune.json"
METRIC_TOKEN = re.compile(r"\bkubetune_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "unknown": ("",)}


def sample_names(registry: Any) -> set[str]:
    """Every series name a registry can expose, from its metric families' names and types
    (labelled families have no samples until used)."""
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    operator = OperatorMetrics()
    operator.track_phases(lambda: [])  # kubetune_operator_jobs{phase}, as handlers.py does
    trainer = TrainerMetrics(0, model="tiny://llama", method="lora", task="causal-lm")
    names = sample_names(operator.registry) | sample_names(trainer.registry)
    assert "kubetune_operator_jobs" in names and "kubetune_trainer_loss" in names
    return {n for n in names if n.startswith("kubetune_")}


@pytest.fixture(scope="module")
def monitoring_objects() -> tuple[Manifest, ...]:
    require_helm()
    return render(MONITORING)


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_json_parses_and_queries_only_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "kubetune" and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    used = {name for q in dashboard_queries(dashboard) for name in METRIC_TOKEN.findall(q)}
    assert used - exported == set(), "the dashboard queries metrics nothing exports"
    # What the dashboard is for: loss, tokens/s, progress, restarts, jobs by phase.
    for required in ("kubetune_trainer_loss", "kubetune_trainer_tokens_per_second",
                     "kubetune_trainer_step", "kubetune_trainer_total_steps",
                     "kubetune_operator_jobs_restarted_total", "kubetune_operator_jobs"):
        assert required in used, required
    titles = {p["title"] for p in panels}
    assert {"Training loss", "Tokens/s", "Progress", "Gang restarts", "Jobs by phase"} <= titles


def test_dashboard_configmap_carries_the_file(monitoring_objects: tuple[Manifest, ...]) -> None:
    config_map = one(monitoring_objects, "ConfigMap", "kubetune-dashboard")
    assert json.loads(config_map["data"]["kubetune.json"]) == json.loads(DASHBOARD.read_text())
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"


def alert_rules(objects: tuple[Manifest, ...]) -> dict[str, dict[str, Any]]:
    rule = one(objects, "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_alerts_use_exported_metrics(monitoring_objects: tuple[Manifest, ...],
                                     exported: set[str]) -> None:
    rules = alert_rules(monitoring_objects)
    assert set(rules) == {"KubetuneJobFailed", "KubetuneJobStalled", "KubetuneOperatorDown"}
    for name, rule in rules.items():
        used = set(METRIC_TOKEN.findall(rule["expr"]))
        assert used - exported == set(), name
        assert rule["labels"]["severity"] and rule["annotations"]["summary"], name
    assert "kubetune_operator_jobs_failed_total" in rules["KubetuneJobFailed"]["expr"]
    assert "kubetune_trainer_step" in rules["KubetuneJobStalled"]["expr"]
    assert "45m" in rules["KubetuneJobStalled"]["expr"]  # monitoring.prometheusRule.stalledWindow
    # `up` of the ServiceMonitor's job: prometheus-operator names the job after the Service.
    service = one(monitoring_objects, "Service")
    down = rules["KubetuneOperatorDown"]["expr"]
    assert f'job="{service["metadata"]["name"]}"' in down and f'namespace="{NAMESPACE}"' in down


def test_rules_need_the_service_monitor() -> None:
    require_helm()
    result = run_helm("template", "kubetune", str(CHART), "--set",
                      "monitoring.prometheusRule.enabled=true")
    assert result.returncode != 0
    assert "needs monitoring.serviceMonitor.enabled" in result.stderr


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_monitor_scrapes_the_operator(monitoring_objects: tuple[Manifest, ...]) -> None:
    monitor = one(monitoring_objects, "ServiceMonitor")
    service = one(monitoring_objects, "Service")
    deployment = one(monitoring_objects, "Deployment")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == \
        [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(service["spec"]["selector"], pod_labels)
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_pod_monitor_scrapes_the_trainer_pods_the_operator_builds(
        monitoring_objects: tuple[Manifest, ...]) -> None:
    monitor = one(monitoring_objects, "PodMonitor")
    job = example_job(ROOT / "examples" / "tiny-lora.yaml")
    owner = builders.Owner(name="tiny-lora", namespace="ml", uid="u", labels={})
    template = builders.build_job(job, owner, 3, Settings())["spec"]["template"]
    assert labels_match(monitor["spec"]["selector"]["matchLabels"],
                        template["metadata"]["labels"])
    ports = {p["name"]: p for p in template["spec"]["containers"][0]["ports"]}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == builders.METRICS_PORT_NAME and endpoint["port"] in ports
    # The relabelling reads the pod label the operator sets (Prometheus sanitises its name).
    sanitized = {re.sub(r"[^a-zA-Z0-9_]", "_", label): label
                 for label in template["metadata"]["labels"]}
    for relabel in endpoint["relabelings"]:
        [source] = relabel["sourceLabels"]
        assert source.removeprefix("__meta_kubernetes_pod_label_") in sanitized
    targets = {r["targetLabel"]: r["sourceLabels"][0] for r in endpoint["relabelings"]}
    assert targets["finetunejob"].endswith(re.sub(r"[^a-zA-Z0-9_]", "_", builders.LABEL_JOB))
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    namespaced = render(CHART / "ci" / "namespaced-values.yaml",
                        ("monitoring.podMonitor.enabled=true",))
    assert one(namespaced, "PodMonitor")["spec"]["namespaceSelector"] == \
        {"matchNames": ["team-a", "team-b"]}


def test_promql_parses_with_promtool(monitoring_objects: tuple[Manifest, ...],
                                     tmp_path: Path) -> None:
    """Where Prometheus' promtool is installed (Debian package `prometheus`): every alert and
    dashboard query is valid PromQL."""
    promtool = tool_path("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus) - PromQL not parsed")
    grafana = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m",
               "$namespace": ".*", "$finetunejob": ".*"}
    records = []
    for i, query in enumerate(dashboard_queries(json.loads(DASHBOARD.read_text()))):
        if query.startswith("label_values("):
            query = query.removeprefix("label_values(").rsplit(",", 1)[0]
        for key, value in grafana.items():
            query = query.replace(key, value)
        records.append({"record": f"kubetune:dashboard_query_{i}", "expr": query})
    rules = one(monitoring_objects, "PrometheusRule")["spec"]
    rules["groups"].append({"name": "dashboard", "rules": records})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_when_they_should_with_promtool(monitoring_objects: tuple[Manifest, ...],
                                                     tmp_path: Path) -> None:
    """`promtool test rules` on synthetic series: each alert fires on its failure and stays
    quiet otherwise (annotations left out: they are text, checked above)."""
    promtool = tool_path("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus) - alerts not exercised")
    spec = one(monitoring_objects, "PrometheusRule")["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    job = 'job="kubetune-operator-metrics", namespace="kubetune"'
    trainer = 'namespace="ml", rank="0", finetunejob='
    stalled, done = {"namespace": "ml", "finetunejob": "llama", "severity": "warning"}, "done"
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            # llama trains for 10 minutes, then its step stops moving while still "training".
            {"series": f'kubetune_trainer_phase{{{trainer}"llama", phase="training"}}',
             "values": "1x90"},
            {"series": f'kubetune_trainer_step{{{trainer}"llama"}}', "values": "0+1x10 10x80"},
            # "done" stopped stepping because it finished: phase training is 0.
            {"series": f'kubetune_trainer_phase{{{trainer}"{done}", phase="training"}}',
             "values": "1x10 0x80"},
            {"series": f'kubetune_trainer_step{{{trainer}"{done}"}}', "values": "0+1x10 10x80"},
            # The operator is up for 30 minutes, then gone.
            {"series": f"up{{{job}}}", "values": "1x30 0x60"},
            # One job failed at minute 5.
            {"series": f'kubetune_operator_jobs_failed_total{{{job}, '
                       'reason="BackoffLimitExceeded"}', "values": "0x5 1x85"},
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "KubetuneJobFailed", "exp_alerts": [
                {"exp_labels": {"reason": "BackoffLimitExceeded", "severity": "warning"}}]},
            {"eval_time": "30m", "alertname": "KubetuneJobFailed", "exp_alerts": []},
            {"eval_time": "50m", "alertname": "KubetuneJobStalled", "exp_alerts": []},
            {"eval_time": "65m", "alertname": "KubetuneJobStalled",
             "exp_alerts": [{"exp_labels": stalled}]},
            {"eval_time": "20m", "alertname": "KubetuneOperatorDown", "exp_alerts": []},
            {"eval_time": "40m", "alertname": "KubetuneOperatorDown",
             "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
        ],
    }]}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", "tests.yaml"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
