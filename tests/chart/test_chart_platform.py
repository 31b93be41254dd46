"""Shared-cluster values: admin policy, trainer defaults and NetworkPolicies reach the operator
and the cluster as the operator's code expects them."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from chartlib import (
    ROOT,
    example_job,
    find,
    one,
    operator_env,
    render,
    require_helm,
    run_helm,
    template_args,
)
from pss import violations

from kubetune_api.load import validate_job
from kubetune_api.spec import VOLUME_SOURCES
from kubetune_operator import builders
from kubetune_operator.builders import Owner
from kubetune_operator.policy import Policy, TolerationRule
from kubetune_operator.settings import Settings


def settings_of(*sets: str) -> Settings:
    env = operator_env(render(None, tuple(sets)))
    return Settings.from_env({k: v for k, v in env.items() if isinstance(v, str)})


def operator_pod_labels(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    labels: dict[str, str] = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_default_values_set_no_policy() -> None:
    assert settings_of().policy == Policy()


def test_policy_values_reach_the_operator() -> None:
    settings = settings_of(
        "policy.allowedImagePrefixes={registry.corp/ml/}", "policy.allowedSchedulers={volcano}",
        "policy.allowedPriorityClasses={batch-low,batch-high}",
        "policy.allowedTolerations[0].key=nvidia.com/gpu",
        "policy.allowedTolerations[0].effect=NoSchedule", "policy.requireQueue=true",
        "policy.defaultQueue=shared", "policy.allowedQueues={shared,team-a}",
        "policy.maxGpusPerJob=16", "policy.allowedKueuePriorityClasses={batch-low}",
        "policy.gpuResources={nvidia.com/gpu}", "policy.maxNodesPerJob=4",
        "policy.allowedExtraResources={rdma/*}",
        "policy.deniedMetadataPrefixes={scheduling.volcano.sh/}",
        "policy.maxEphemeralClaimSize=500Gi")
    assert settings.policy == Policy(
        allowed_image_prefixes=("registry.corp/ml/",), allowed_schedulers=("volcano",),
        allowed_priority_classes=("batch-low", "batch-high"),
        allowed_tolerations=(TolerationRule(key="nvidia.com/gpu", effect="NoSchedule"),),
        require_queue=True, default_queue="shared", allowed_queues=("shared", "team-a"),
        max_gpus_per_job=16, allowed_kueue_priority_classes=("batch-low",),
        gpu_resources=("nvidia.com/gpu",), max_nodes_per_job=4,
        allowed_extra_resources=("rdma/*",), denied_metadata_prefixes=("scheduling.volcano.sh/",),
        max_ephemeral_claim_size="500Gi")


@pytest.mark.parametrize(("sets", "where"), [
    (["policy.maxGpusPerJob=-1"], "/policy/maxGpusPerJob"),
    (["policy.maxNodesPerJob=0"], "/policy/maxNodesPerJob"),
    (["policy.maxEphemeralClaimSize=5 Gi"], "/policy/maxEphemeralClaimSize"),
    (["policy.allowedImages={x}"], "/policy"),
    (["policy.allowedTolerations[0].tolerationSeconds=5"], "/policy/allowedTolerations/0"),
    (["trainer.defaultResources.memoryPerGpu=lots"], "/trainer/defaultResources/memoryPerGpu"),
])
def test_bad_platform_values_fail_the_install(sets: list[str], where: str) -> None:
    require_helm()
    result = run_helm(*template_args(None, tuple(sets), include_crds=False))
    assert result.returncode != 0, f"helm accepted {sets}"
    assert where in result.stderr, result.stderr


def test_trainer_defaults_and_network_settings_reach_the_operator() -> None:
    defaults = settings_of()
    assert (defaults.cpu_per_gpu, defaults.memory_per_gpu, defaults.cpu_without_gpu,
            defaults.memory_without_gpu) == (Settings().cpu_per_gpu, Settings().memory_per_gpu,
                                              Settings().cpu_without_gpu,
                                              Settings().memory_without_gpu)
    assert defaults.network_policy is True and defaults.extra_egress == ()
    custom = settings_of("trainer.defaultResources.cpuPerGpu=8",
                         "trainer.defaultResources.memoryWithoutGpu=",
                         "trainer.networkPolicy.enabled=false",
                         "trainer.networkPolicy.extraEgress[0].ports[0].port=3128",
                         "trainer.networkPolicy.egressExcept={10.0.0.0/16,10.244.0.0/16}",
                         "trainer.networkPolicy.endpointPorts={9000}")
    assert (custom.cpu_per_gpu, custom.memory_without_gpu) == ("8", "")
    assert custom.network_policy is False
    assert custom.extra_egress == ({"ports": [{"port": 3128}]},)
    assert custom.egress_except[:2] == ("10.0.0.0/16", "10.244.0.0/16")
    assert custom.endpoint_ports == (9000,)


def test_the_operator_may_scrape_every_job_and_prometheus_when_allowed() -> None:
    prometheus = {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    objects = render(None, ("trainer.networkPolicy.metricsFrom[0].namespaceSelector"
                            ".matchLabels.name=monitoring",))
    env = operator_env(objects)
    settings = Settings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    operator_peer, prometheus_peer = settings.metrics_from
    assert prometheus_peer == prometheus
    assert operator_peer["namespaceSelector"] == {"matchLabels": {
        "kubernetes.io/metadata.name": "kubetune"}}
    assert selects(operator_peer["podSelector"]["matchLabels"], operator_pod_labels(objects))


def test_operator_network_policy_selects_it_and_reaches_the_ranks() -> None:
    objects = render()
    policy = one(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], operator_pod_labels(objects))
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    assert ports == {8000, 8081}  # metrics, health
    egress_ports = {p["port"] for rule in spec["egress"] for p in rule.get("ports", [])}
    assert {53, 443, 6443} <= egress_ports
    # A trainer pod the operator builds is a destination (any port: spec.metrics.port varies).
    job = builders.build_job(example(), Owner("j", "ml", "uid", {}), 1, Settings())
    trainer_labels = job["spec"]["template"]["metadata"]["labels"]
    [to_ranks] = [rule for rule in spec["egress"] if "to" in rule]
    assert "ports" not in to_ranks
    assert selects(to_ranks["to"][0]["podSelector"]["matchLabels"], trainer_labels)
    assert to_ranks["to"][0]["namespaceSelector"] == {}
    assert not find(render(None, ("networkPolicy.enabled=false",)), "NetworkPolicy")


def test_operator_metrics_can_be_limited_to_prometheus() -> None:
    objects = render(None, ("networkPolicy.metricsFrom[0].podSelector.matchLabels.app="
                            "prometheus",))
    metrics_rule = one(objects, "NetworkPolicy")["spec"]["ingress"][0]
    assert metrics_rule["from"] == [
        {"podSelector": {"matchLabels": {"app": "prometheus"}}},
        {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "kubetune",
                                         "app.kubernetes.io/component": "test"}}}]
    test_pod = one(objects, "Pod")  # `helm test` may still reach the port it checks
    assert selects(metrics_rule["from"][1]["podSelector"]["matchLabels"],
                   test_pod["metadata"]["labels"])


def example() -> Any:
    return example_job(ROOT / "examples" / "tiny-lora.yaml")


def test_every_volume_type_the_contract_allows_keeps_the_pod_restricted() -> None:
    """The contract's volume allow-list is Pod Security "restricted"'s: a pod using every
    allowed type, pod labels/annotations, envFrom and a token file still passes."""
    body = yaml.safe_load((ROOT / "examples" / "llama2-7b-qlora.yaml").read_text())
    sources: dict[str, dict[str, Any]] = {
        "persistentVolumeClaim": {"claimName": "c"}, "configMap": {"name": "m"},
        "secret": {"secretName": "s"}, "emptyDir": {}, "csi": {"driver": "d.example"},
        "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"],
                                                       "resources": {"requests": {
                                                           "storage": "1Gi"}}}}},
        "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]},
        "downwardAPI": {"items": [{"path": "l", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
    assert set(sources) == set(VOLUME_SOURCES)
    body["spec"]["pod"] = {
        "volumes": [{"name": kind.lower(), kind: source} for kind, source in sources.items()],
        "volumeMounts": [{"name": kind.lower(), "mountPath": f"/mnt/{kind.lower()}"}
                         for kind in sources],
        "envFrom": [{"secretRef": {"name": "extra"}}], "labels": {"team": "a"},
        "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma"}}
    body["spec"]["model"]["tokenSecret"] = {"name": "hf"}
    body["spec"]["model"]["cache"] = {"pvc": "hf-models"}
    body["metadata"]["namespace"] = "ml"
    job = validate_job(body)
    manifest = builders.build_job(job, Owner(job.name, "ml", "u", {}), 1, Settings())
    template = manifest["spec"]["template"]
    assert violations(template["spec"], template["metadata"].get("annotations")) == []
