"""The Helm chart, linted and rendered by the real helm binary: every object validates against
real Kubernetes schemas, the CRD is the repository's, and the operator gets the settings its
code reads."""

from __future__ import annotations

import json
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chartlib import (
    CHART,
    CI_VALUES,
    KUBE_VERSIONS,
    NAMESPACE,
    ROOT,
    SCENARIOS,
    Manifest,
    find,
    one,
    operator_container,
    operator_env,
    render,
    run_helm,
    values_of,
)
from monitoring_schemas import MONITORING_SCHEMAS

from kubetune_api.crd import CRD_PATH, RUNTIME_CRD_PATHS
from kubetune_api.load import validate_job
from kubetune_operator import settings as operator_settings
from kubetune_operator.settings import Settings

SCENARIO_IDS = [name for name, _ in SCENARIOS]
KEEP = {"helm.sh/resource-policy": "keep"}


def test_ci_values_cover_every_install_mode() -> None:
    names = {path.name for path in CI_VALUES}
    assert {"all-namespaces-values.yaml", "namespaced-values.yaml", "ha-values.yaml",
            "monitoring-values.yaml"} <= names


@pytest.mark.parametrize(("scenario", "values"), SCENARIOS, ids=SCENARIO_IDS)
def test_helm_lint_strict(scenario: str, values: Path | None) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    if values is not None:
        args += ["--values", str(values)]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


# --- every rendered object against Kubernetes' own schemas ----------------------------------

def crd_schemas(objects: tuple[Manifest, ...]) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of the CRDs the chart renders."""
    schemas = {}
    for crd in find(objects, "CustomResourceDefinition"):
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate(obj: Manifest, version: str, custom: dict[tuple[str, str], dict[str, Any]]) -> str:
    """Validate one object; returns how ("kubernetes" or "crd")."""
    key = (obj["apiVersion"], obj["kind"])
    if key in custom:  # a custom resource whose CRD the chart ships (kopf peering)
        jsonschema.validate({k: v for k, v in obj.items()}, custom[key])
        return "crd"
    kubernetes_validate.validate(obj, version, strict=True)
    return "kubernetes"


@pytest.mark.parametrize(("scenario", "values"), SCENARIOS, ids=SCENARIO_IDS)
def test_every_object_validates_against_kubernetes_schemas(scenario: str,
                                                           values: Path | None) -> None:
    objects = render(values)
    custom = {**crd_schemas(objects), **MONITORING_SCHEMAS}
    counts: dict[str, int] = {}
    for version in KUBE_VERSIONS:
        for obj in objects:
            where = f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}"
            try:
                how = validate(obj, version, custom)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
                pytest.fail(f"{scenario}: {where}: {exc}")
            counts[how] = counts.get(how, 0) + 1
    assert counts.get("kubernetes", 0) >= 5 * len(KUBE_VERSIONS)
    print(f"{scenario}: {len(objects)} objects x {len(KUBE_VERSIONS)} versions: {counts}")


def test_chart_declares_the_oldest_validated_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    match = re.fullmatch(r">=\s*(\d+\.\d+)\.0-0", chart["kubeVersion"])
    assert match and match.group(1) == KUBE_VERSIONS[0]


@pytest.mark.parametrize(("scenario", "values"), SCENARIOS, ids=SCENARIO_IDS)
def test_objects_have_dns_names_and_namespaces(scenario: str, values: Path | None) -> None:
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                      "ClusterKopfPeering"}
    watched = set(values_of(values)["watchNamespaces"])
    for obj in render(values):
        meta = obj["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]), meta["name"]
        assert len(meta["name"]) <= 63 or obj["kind"] == "CustomResourceDefinition"
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in meta, obj["kind"]
        elif obj["kind"] in ("Role", "RoleBinding", "KopfPeering"):
            assert meta["namespace"] in watched
        elif obj["kind"] == "ConfigMap" and meta["name"].endswith("-dashboard"):
            assert meta["namespace"]
        else:
            assert meta["namespace"] == NAMESPACE, f"{obj['kind']}/{meta['name']}"


# --- the CRD ----------------------------------------------------------------------------------

GENERATED_CRDS = [CRD_PATH, *RUNTIME_CRD_PATHS.values()]


@pytest.mark.parametrize("crd_path", GENERATED_CRDS, ids=lambda p: p.name)
def test_chart_crd_file_is_a_byte_copy_of_crds(crd_path: Path) -> None:
    chart_crd = CHART / "files" / "crds" / crd_path.name
    assert chart_crd.read_bytes() == crd_path.read_bytes(), \
        f"{chart_crd.relative_to(ROOT)} differs from {crd_path.relative_to(ROOT)}: run `make crds`"


@pytest.mark.parametrize("crd_path", GENERATED_CRDS, ids=lambda p: p.name)
def test_rendered_crd_equals_crds_dir_plus_keep_annotation(crd_path: Path) -> None:
    source = yaml.safe_load(crd_path.read_text())
    rendered = one(render(), "CustomResourceDefinition", source["metadata"]["name"])
    expected = json.loads(json.dumps(source))
    expected["metadata"]["annotations"] = KEEP
    assert rendered == expected
    without_keep = one(render(None, ("crds.keep=false",)), "CustomResourceDefinition",
                       source["metadata"]["name"])
    assert without_keep == source


def test_crd_can_be_left_out() -> None:
    names = {o["metadata"]["name"] for o in find(render(None, ("crds.install=false",)),
                                                  "CustomResourceDefinition")}
    assert not {p.stem for p in GENERATED_CRDS} & names
    # kopf's peering CRDs live in the chart's crds/ directory (`helm install --skip-crds`).
    assert names == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def test_kopf_peering_crds_are_the_resources_kopf_uses() -> None:
    from kopf._cogs.structs import references

    crds = {o["spec"]["names"]["plural"]: o for o in find(render(), "CustomResourceDefinition")}
    for selector, scope in ((references.CLUSTER_PEERINGS_K, "Cluster"),
                            (references.NAMESPACED_PEERINGS_K, "Namespaced")):
        crd = crds[selector.any_name]
        assert crd["spec"]["group"] == selector.group and crd["spec"]["scope"] == scope
        assert [v["name"] for v in crd["spec"]["versions"]] == [selector.version]


# --- settings handed to the operator --------------------------------------------------------

class RecordingEnv(dict[str, str]):
    """An environment that remembers which variables were asked for."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        super().__init__(values or {})
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


def settings_variables() -> set[str]:
    env = RecordingEnv()
    Settings.from_env(env)
    return env.read


def expected_image(image: dict[str, Any], app_version: str) -> str:
    name = "/".join(part for part in (image.get("registry"), image["repository"]) if part)
    if image.get("digest"):
        return f"{name}@{image['digest']}"
    return f"{name}:{image.get('tag') or app_version}"


@pytest.mark.parametrize(("scenario", "values"), SCENARIOS, ids=SCENARIO_IDS)
def test_operator_gets_every_setting_by_the_names_settings_reads(scenario: str,
                                                                 values: Path | None) -> None:
    objects, config = render(values), values_of(values)
    env = operator_env(objects)
    kopf_identity = {"POD_ID"}  # kopf's peer identity (kopf reads it, not Settings)
    # The kubelet gives every pod the API server's address (the NetworkPolicy keeps trainers
    # away from it); the chart does not set it.
    kubelet_given = {"KUBERNETES_SERVICE_HOST"}
    assert set(env) - kopf_identity == settings_variables() - kubelet_given, \
        "the chart must set exactly the variables operator/kubetune_operator/settings.py reads"
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    settings = Settings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert settings.trainer_image == expected_image(config["trainer"]["image"], app_version)
    assert settings.watch_namespaces == tuple(config["watchNamespaces"])
    assert settings.storage_secret == (config["storage"]["defaultSecretName"] or None)
    assert settings.image_pull_secrets == tuple(config["trainer"]["imagePullSecrets"])
    assert settings.service_account == (config["trainer"]["serviceAccountName"] or None)
    assert settings.termination_grace_seconds == \
        config["trainer"]["terminationGracePeriodSeconds"]
    assert settings.progress_interval == config["operator"]["progressInterval"]
    assert settings.scrape_timeout == config["operator"]["scrapeTimeout"]
    assert settings.force_delete_after == config["operator"]["forceDeleteAfterSeconds"]
    assert settings.log_level == logging.getLevelName(config["operator"]["logLevel"])
    assert (settings.peering is None) == (config["replicas"] == 1)
    assert settings.platform_assigns_uids == config["platformAssignsUids"]

    container = operator_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.metrics_port == ports["metrics"] == config["metrics"]["port"]
    assert settings.health_port == ports["health"]
    for probe in ("livenessProbe", "readinessProbe"):
        # kopf's liveness endpoint, as main.py starts it: http://0.0.0.0:<health_port>/healthz
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["image"] == expected_image(config["image"], app_version)


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("sets", "operator", "trainer"), [
    # make push-images REGISTRY=127.0.0.1:5000/team, then the digests it printed
    (("image.registry=127.0.0.1:5000/team", f"image.digest={DIGEST}",
      "trainer.image.registry=127.0.0.1:5000/team", "trainer.image.tag=0.1.0-cpu"),
     f"127.0.0.1:5000/team/operator@{DIGEST}", "127.0.0.1:5000/team/trainer:0.1.0-cpu"),
    # an empty registry: the repository is the whole name (a mirror with its own layout)
    (("image.registry=", "image.repository=mirror.corp/ml/kt-operator",
      "trainer.image.registry=", "trainer.image.repository=mirror.corp/ml/kt-trainer"),
     "mirror.corp/ml/kt-operator:0.1.0", "mirror.corp/ml/kt-trainer:0.1.0"),
], ids=["pushed-registry", "whole-repository"])
def test_images_come_from_the_registry_the_user_pushed_to(sets: tuple[str, ...], operator: str,
                                                          trainer: str) -> None:
    objects = render(sets=sets)
    assert operator_container(objects)["image"] == operator
    assert operator_env(objects)["KUBETUNE_TRAINER_IMAGE"] == trainer


def test_default_trainer_image_is_the_operators_own_default() -> None:
    env = operator_env(render())
    assert env["KUBETUNE_TRAINER_IMAGE"] == operator_settings.DEFAULT_TRAINER_IMAGE
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_placement_and_resources_reach_the_operator_pod() -> None:
    values = CHART / "ci" / "all-namespaces-values.yaml"
    config = values_of(values)
    pod = one(render(values), "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == config["nodeSelector"]
    assert pod["tolerations"] == config["tolerations"]
    assert pod["imagePullSecrets"] == [{"name": n} for n in config["imagePullSecrets"]]
    assert operator_container(render(values))["resources"] == config["resources"]
    affinity = CHART / "ci" / "namespaced-ha-values.yaml"
    assert one(render(affinity), "Deployment")["spec"]["template"]["spec"]["affinity"] == \
        values_of(affinity)["affinity"]


# --- replicas: standalone or HA with kopf peering -------------------------------------------

def test_one_replica_is_standalone() -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert operator_env(objects)["KUBETUNE_PEERING"] == "standalone"
    assert not find(objects, "PodDisruptionBudget")
    assert not find(objects, "ClusterKopfPeering") and not find(objects, "KopfPeering")


@pytest.mark.parametrize("values", ["ha-values.yaml", "namespaced-ha-values.yaml"])
def test_several_replicas_peer_through_a_peering_object_the_chart_creates(values: str) -> None:
    path = CHART / "ci" / values
    objects, config = render(path), values_of(path)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == config["replicas"] > 1
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    peering = operator_env(objects)["KUBETUNE_PEERING"]
    assert Settings.from_env({"KUBETUNE_PEERING": peering}).peering == peering
    if config["watchNamespaces"]:  # kopf touches a KopfPeering in each watched namespace
        peerings = find(objects, "KopfPeering")
        assert {p["metadata"]["namespace"] for p in peerings} == set(config["watchNamespaces"])
        assert not find(objects, "ClusterKopfPeering")
    else:
        peerings = find(objects, "ClusterKopfPeering")
        assert len(peerings) == 1 and not find(objects, "KopfPeering")
    assert {p["metadata"]["name"] for p in peerings} == {peering}
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


# --- NOTES.txt: the first job it tells the user to submit is a valid one --------------------

def test_notes_first_job_is_valid_and_its_data_ships_in_the_trainer_image() -> None:
    result = run_helm("install", "kubetune", str(CHART), "--namespace", NAMESPACE,
                      "--dry-run=client", "--output", "json")
    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["info"]["notes"]
    match = re.search(r"<<'YAML'\n(.*?)\n\s*YAML\n", notes, re.S)
    assert match, notes
    job = yaml.safe_load(match.group(1))
    job["metadata"]["namespace"] = "default"
    parsed = validate_job(job)
    assert (ROOT / parsed.spec.dataset.train).is_file()
    for dockerfile in ("trainer_image/Dockerfile", "trainer_image/Dockerfile.cpu"):
        text = (ROOT / dockerfile).read_text()
        assert re.search(r"^COPY .*examples/data", text, re.M), dockerfile
    assert f"kubetune.dev/finetunejob={job['metadata']['name']}" in notes
    assert "kubectl get finetunejobs" in notes
