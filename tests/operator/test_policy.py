"""Admin policy (policy.py): pure rule checks, and how the settings read it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_api.load import validate_job
from kubetune_api.spec import FineTuneJobSpec
from kubetune_operator import builders, policy
from kubetune_operator.policy import Policy, PolicyError, parse_policy, violations
from kubetune_operator.settings import Settings

GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def spec(pod: dict[str, Any] | None = None, nodes: int = 1, gpus: int = 1,
         extra: dict[str, int] | None = None,
         gpu_resource: str = "nvidia.com/gpu") -> FineTuneJobSpec:
    return validate_job({"metadata": {"name": "j", "namespace": "ml"}, "spec": {
        "model": {"name": "tiny://llama"}, "method": {"type": "lora"},
        "dataset": {"train": "data.jsonl"}, "output": {"uri": "out"},
        "resources": {"nodes": nodes, "gpusPerNode": gpus, "gpuResource": gpu_resource,
                      "extraResources": extra or {}}, "pod": pod or {}}}).spec


def test_no_policy_allows_everything() -> None:
    job = spec({"image": "evil.example/miner:1", "priorityClassName": "system-node-critical",
                "schedulerName": "mine", "tolerations": [GPU_TAINT]}, nodes=64, gpus=8)
    assert violations(job, {}, Policy()) == []
    assert Policy().is_empty and Settings().policy.is_empty


def test_the_queue_label_constant_is_the_builders_one() -> None:
    assert policy.LABEL_KUEUE_QUEUE == builders.LABEL_KUEUE_QUEUE
    assert policy.LABEL_KUEUE_PRIORITY == builders.LABEL_KUEUE_PRIORITY


@pytest.mark.parametrize(("rules", "pod", "expected"), [
    ({"allowedImagePrefixes": ["registry.corp/ml/"]}, {"image": "docker.io/x/trainer:1"},
     "spec.pod.image: docker.io/x/trainer:1 is not allowed (allowedImagePrefixes: "
     "registry.corp/ml/)"),
    ({"allowedImagePrefixes": []}, {"image": "registry.corp/ml/t:1"},
     "spec.pod.image: registry.corp/ml/t:1 is not allowed (allowedImagePrefixes: none)"),
    ({"allowedPriorityClasses": ["batch-low"]}, {"priorityClassName": "system-cluster-critical"},
     "spec.pod.priorityClassName: system-cluster-critical is not allowed "
     "(allowedPriorityClasses: batch-low)"),
    ({"allowedSchedulers": ["volcano"]}, {"schedulerName": "my-scheduler"},
     "spec.pod.schedulerName: my-scheduler is not allowed (allowedSchedulers: volcano)"),
    ({"allowedTolerations": []}, {"tolerations": [GPU_TAINT]},
     "spec.pod.tolerations[0]: " + json.dumps(GPU_TAINT)
     + " matches no allowed toleration (allowedTolerations: none)"),
    ({"allowedTolerations": [{"key": "pool", "value": "shared"}]},
     {"tolerations": [{"key": "pool", "operator": "Equal", "value": "shared"}, GPU_TAINT]},
     "spec.pod.tolerations[1]: " + json.dumps(GPU_TAINT) + " matches no allowed toleration "
     '(allowedTolerations: {"key": "pool", "value": "shared"})'),
])
def test_each_rule_names_the_field_and_the_rule(rules: dict[str, Any], pod: dict[str, Any],
                                                 expected: str) -> None:
    assert violations(spec(pod), {}, parse_policy(json.dumps(rules))) == [expected]


def test_allowed_values_pass_and_unset_fields_are_always_allowed() -> None:
    rules = parse_policy(json.dumps({
        "allowedImagePrefixes": ["registry.corp/ml/"], "allowedPriorityClasses": ["batch"],
        "allowedSchedulers": [], "allowedTolerations": [{"key": "nvidia.com/gpu"}],
        "maxGpusPerJob": 16}))
    ok = spec({"image": "registry.corp/ml/trainer:2", "priorityClassName": "batch",
               "tolerations": [GPU_TAINT]}, nodes=2, gpus=8)
    assert violations(ok, {}, rules) == []
    assert violations(spec(), {}, rules) == []  # operator image, default scheduler, no class


def test_the_operators_own_image_is_allowed_when_named() -> None:
    rules = Policy(allowed_image_prefixes=("registry.corp/ml/",))
    own = spec({"image": "ghcr.io/kubetune/trainer:0.1.0"})
    assert violations(own, {}, rules, operator_image="ghcr.io/kubetune/trainer:0.1.0") == []
    assert len(violations(own, {}, rules, operator_image="ghcr.io/kubetune/trainer:0.2.0")) == 1


def test_gpu_cap_counts_nodes_times_gpus() -> None:
    rules = Policy(max_gpus_per_job=16)
    assert violations(spec(nodes=2, gpus=8), {}, rules) == []
    assert violations(spec(nodes=3, gpus=8), {}, rules) == [
        "spec.resources: 3 nodes x 8 GPUs = 24 GPUs (maxGpusPerJob: 16)"]
    assert violations(spec(nodes=1, gpus=1), {}, Policy(max_gpus_per_job=0)) != []


def test_queue_required_defaulted_and_restricted() -> None:
    label = policy.LABEL_KUEUE_QUEUE
    required = Policy(require_queue=True)
    assert violations(spec(), {}, required) == [
        f"metadata.labels[{label}]: missing (requireQueue: a Kueue queue is required)"]
    assert violations(spec(), {label: "team-a"}, required) == []
    defaulted = Policy(require_queue=True, default_queue="shared")
    assert violations(spec(), {}, defaulted) == []
    assert policy.with_default_queue({"team": "a"}, defaulted) == {"team": "a", label: "shared"}
    assert policy.with_default_queue({label: "mine"}, defaulted) == {label: "mine"}
    assert policy.with_default_queue({}, Policy()) == {}
    restricted = Policy(allowed_queues=("team-a",), default_queue="team-a")
    assert violations(spec(), {label: "team-b"}, restricted) == [
        f"metadata.labels[{label}]: team-b is not allowed (allowedQueues: team-a)"]


def test_every_violation_is_reported_at_once() -> None:
    rules = Policy(allowed_schedulers=(), max_gpus_per_job=1, require_queue=True)
    problems = violations(spec({"schedulerName": "x"}, gpus=2), {}, rules)
    assert [p.split(":")[0] for p in problems] == [
        "spec.pod.schedulerName", f"metadata.labels[{policy.LABEL_KUEUE_QUEUE}]",
        "spec.resources"]


@pytest.mark.parametrize(("text", "words"), [
    ("{not json", "KUBETUNE_POLICY: not JSON"),
    ('{"allowedImages": ["x"]}', "KUBETUNE_POLICY: allowedImages: Extra inputs"),
    ('{"maxGpusPerJob": -1}', "maxGpusPerJob: Input should be greater than or equal to 0"),
    ('{"allowedTolerations": [{"keys": "x"}]}', "allowedTolerations.0.keys"),
])
def test_a_malformed_policy_stops_the_operator_with_the_field(text: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words.replace("[", r"\[")):
        Settings.from_env({"KUBETUNE_POLICY": text})


def test_settings_read_the_policy_json() -> None:
    settings = Settings.from_env({"KUBETUNE_POLICY": json.dumps(
        {"allowedSchedulers": ["volcano"], "defaultQueue": "q", "allowedTolerations": None})})
    assert settings.policy == Policy(allowed_schedulers=("volcano",), default_queue="q")
    assert Settings.from_env({"KUBETUNE_POLICY": ""}).policy == Policy()


def test_a_long_list_of_violations_is_capped() -> None:
    many = [{"key": f"pool-{i}", "operator": "Exists"} for i in range(60)]
    problems = violations(spec({"tolerations": many}), {}, Policy(allowed_tolerations=()))
    assert len(problems) == 60
    message = policy.summary(problems)
    assert len(message) <= policy.MAX_MESSAGE + 40
    assert message.startswith("spec.pod.tolerations[0]") and message.endswith(
        "(60 violations in all)")
    assert policy.summary(problems[:1]) == problems[0]


def test_the_admitted_hash_covers_the_spec_but_not_run_policy() -> None:
    admitted = spec()
    pinned = policy.spec_hash(admitted)
    assert pinned.startswith("sha256:") and policy.spec_hash(spec()) == pinned
    suspended = admitted.model_copy(deep=True)
    suspended.run_policy.suspend = True
    assert policy.spec_hash(suspended) == pinned  # runPolicy may change while active
    assert policy.spec_hash(spec(nodes=2)) != pinned
    assert policy.spec_hash(spec({"image": "registry.corp/ml/t:2"})) != pinned


def test_a_later_attempt_is_checked_against_the_policy_and_the_admitted_spec() -> None:
    rules = Policy(allowed_queues=("team-a",))
    label = {policy.LABEL_KUEUE_QUEUE: "team-a"}
    pinned = policy.spec_hash(spec())
    assert policy.attempt_violations(spec(), label, rules, None, None) == []
    assert policy.attempt_violations(spec(), label, rules, None, pinned) == []
    [changed] = policy.attempt_violations(spec(nodes=4), label, rules, None, pinned)
    assert changed.startswith(f"spec: changed after its first attempt was admitted "
                              f"(admittedSpecHash: {pinned})")
    relabelled = {policy.LABEL_KUEUE_QUEUE: "vip"}
    assert policy.attempt_violations(spec(), relabelled, rules, None, pinned) == [
        f"metadata.labels[{policy.LABEL_KUEUE_QUEUE}]: vip is not allowed "
        "(allowedQueues: team-a)"]


def test_gpus_asked_for_in_extra_resources_count_toward_the_cap() -> None:
    """32 nodes x (1 MIG slice + nvidia.com/gpu: 8 in extraResources) under a cap of 8."""
    rules = Policy(max_gpus_per_job=8)
    job = spec(nodes=32, extra={"nvidia.com/gpu": 8}, gpu_resource="nvidia.com/mig-1g.10gb")
    assert violations(job, {}, rules) == [
        "spec.resources: 32 nodes x (1 nvidia.com/mig-1g.10gb + 8 nvidia.com/gpu) = 288 GPUs "
        "(maxGpusPerJob: 8)"]
    mig = spec(nodes=4, extra={"nvidia.com/mig-3g.40gb": 2})
    assert violations(mig, {}, rules) != []  # a MIG prefix is a GPU by default
    rdma = spec(nodes=8, extra={"rdma/hca_shared_devices_a": 1})
    assert violations(rdma, {}, rules) == []  # not a GPU: not counted
    admin_listed = Policy(max_gpus_per_job=8, gpu_resources=("rdma/*",))
    assert violations(rdma, {}, admin_listed) == [
        "spec.resources: 8 nodes x (1 nvidia.com/gpu + 1 rdma/hca_shared_devices_a) = 16 GPUs "
        "(maxGpusPerJob: 8)"]


def test_nodes_are_capped_even_without_gpus() -> None:
    rules = Policy(max_nodes_per_job=16)
    assert violations(spec(nodes=16, gpus=0), {}, rules) == []
    assert violations(spec(nodes=100000, gpus=0), {}, rules) == [
        "spec.resources.nodes: 100000 (maxNodesPerJob: 16)"]


def test_extra_resources_come_from_an_allowlist() -> None:
    rules = Policy(allowed_extra_resources=("rdma/*",))
    assert violations(spec(extra={"rdma/hca_shared_devices_a": 1}), {}, rules) == []
    assert violations(spec(extra={"example.com/fpga": 1}), {}, rules) == [
        "spec.resources.extraResources.example.com/fpga: not allowed "
        "(allowedExtraResources: rdma/*)"]


def test_kueue_priority_classes_come_from_an_allowlist() -> None:
    label = policy.LABEL_KUEUE_PRIORITY
    rules = Policy(allowed_kueue_priority_classes=("batch-low",))
    assert violations(spec(), {}, rules) == []
    assert violations(spec(), {label: "batch-low"}, rules) == []
    assert violations(spec(), {label: "prod-critical"}, rules) == [
        f"metadata.labels[{label}]: prod-critical is not allowed "
        "(allowedKueuePriorityClasses: batch-low)"]


def test_denied_label_and_annotation_prefixes_are_refused() -> None:
    rules = Policy(denied_metadata_prefixes=(
        "scheduling.volcano.sh/", "container.apparmor.security.beta.kubernetes.io/",
        "cluster-autoscaler.kubernetes.io/"))
    job = spec({"labels": {"team": "a", "scheduling.volcano.sh/queue-name": "vip"},
                "annotations": {
                    "container.apparmor.security.beta.kubernetes.io/trainer": "unconfined",
                    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                    "k8s.v1.cni.cncf.io/networks": "rdma"}})
    assert [p.split(":")[0] for p in violations(job, {}, rules)] == [
        "spec.pod.labels[scheduling.volcano.sh/queue-name]",
        "spec.pod.annotations[container.apparmor.security.beta.kubernetes.io/trainer]",
        "spec.pod.annotations[cluster-autoscaler.kubernetes.io/safe-to-evict]"]
    assert violations(job, {}, Policy()) == []


def test_an_image_prefix_ends_at_a_path_boundary() -> None:
    rules = Policy(allowed_image_prefixes=("registry.corp.example/ml",))
    assert violations(spec({"image": "registry.corp.example/ml/t:1"}), {}, rules) == []
    assert violations(spec({"image": "registry.corp.example/ml:1"}), {}, rules) == []
    [problem] = violations(spec({"image": "registry.corp.example/ml-evil/x"}), {}, rules)
    assert problem.startswith("spec.pod.image: registry.corp.example/ml-evil/x is not allowed")


def uri_spec(**uris: str) -> FineTuneJobSpec:
    return validate_job({"metadata": {"name": "j", "namespace": "ml"}, "spec": {
        "model": {"name": "tiny://llama"}, "method": {"type": "lora"},
        "dataset": {"train": uris.get("train", "data.jsonl"), **(
            {"eval": uris["eval"]} if "eval" in uris else {})},
        "output": {"uri": uris.get("output", "out")},
        "checkpoint": {"uri": uris.get("checkpoint", "s3://b/ckpt")}}}).spec


def test_uris_take_only_the_documented_schemes_and_the_admins() -> None:
    good = uri_spec(train="s3://b/t.jsonl", eval="hf://datasets/o/d/e.jsonl",
                    output="gs://b/out", checkpoint="file:///ckpt")
    assert violations(good, {}, Policy()) == []
    assert violations(uri_spec(train="data/train.jsonl"), {}, Policy()) == []
    metadata = uri_spec(train="http://169.254.169.254/latest/meta-data/iam")
    assert violations(metadata, {}, Policy()) == [
        "spec.dataset.train: scheme http is not allowed (schemes: s3, gs, hf, file; "
        "extraUriSchemes: none)"]
    chained = uri_spec(output="simplecache::https://attacker.example/x",
                       checkpoint="ftp://h/c", eval="sftp://h/e")
    assert [p.split(" is")[0] for p in violations(chained, {}, Policy())] == [
        "spec.dataset.eval: scheme sftp", "spec.output.uri: scheme simplecache",
        "spec.output.uri: scheme https", "spec.checkpoint.uri: scheme ftp"]
    azure = uri_spec(output="abfs://c/out")
    assert violations(azure, {}, Policy(extra_uri_schemes=("abfs",))) == []


TOKEN_VOLUME = {"name": "kube", "projected": {"sources": [
    {"serviceAccountToken": {"path": "token", "audience": "https://kubernetes.default"}}]}}


def test_a_projected_service_account_token_is_refused_unless_allowed() -> None:
    job = spec({"volumes": [TOKEN_VOLUME]})
    assert violations(job, {}, Policy()) == [
        "spec.pod.volumes[0]: a projected serviceAccountToken is not allowed "
        "(allowServiceAccountTokens: false)"]
    assert violations(job, {}, Policy(allow_service_account_tokens=True)) == []
    labels = spec({"volumes": [{"name": "info", "projected": {"sources": [
        {"downwardAPI": {"items": [{"path": "labels",
                                    "fieldRef": {"fieldPath": "metadata.labels"}}]}}]}}]})
    assert violations(labels, {}, Policy()) == []


def test_volume_types_csi_drivers_and_storage_classes_follow_the_policy() -> None:
    csi = {"name": "fuse", "csi": {"driver": "gcsfuse.csi.storage.gke.io"}}
    scratch = {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
        "accessModes": ["ReadWriteOnce"], "storageClassName": "premium-ssd",
        "resources": {"requests": {"storage": "100Ti"}}}}}}
    default_class = {"name": "scratch2", "ephemeral": {"volumeClaimTemplate": {"spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}
    job = spec({"volumes": [csi, scratch, default_class]})
    assert violations(job, {}, Policy()) == []
    rules = Policy(allowed_volume_types=("persistentVolumeClaim", "ephemeral"),
                   allowed_csi_drivers=("secrets-store.csi.k8s.io",),
                   allowed_storage_classes=("standard",))
    assert violations(job, {}, rules) == [
        "spec.pod.volumes[0]: csi is not allowed (allowedVolumeTypes: persistentVolumeClaim, "
        "ephemeral)",
        "spec.pod.volumes[0]: csi driver gcsfuse.csi.storage.gke.io is not allowed "
        "(allowedCsiDrivers: secrets-store.csi.k8s.io)",
        "spec.pod.volumes[1]: storageClassName premium-ssd is not allowed "
        "(allowedStorageClasses: standard)",
        "spec.pod.volumes[2]: storageClassName (cluster default) is not allowed "
        "(allowedStorageClasses: standard)"]


def test_every_mixture_source_takes_only_the_allowed_schemes() -> None:
    mixture = uri_spec(train=[{"path": "s3://b/a.jsonl"},
                              {"path": "http://169.254.169.254/latest/meta-data/iam"}])
    assert violations(mixture, {}, Policy()) == [
        "spec.dataset.train[1].path: scheme http is not allowed (schemes: s3, gs, hf, file; "
        "extraUriSchemes: none)"]


def scratch_claim(storage: str | None) -> dict[str, Any]:
    requests = {} if storage is None else {"requests": {"storage": storage}}
    claim = {"accessModes": ["ReadWriteOnce"], "resources": requests}
    return {"name": f"scratch-{str(storage).lower()}",
            "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}


def test_ephemeral_claims_are_capped_in_size() -> None:
    job = spec({"volumes": [scratch_claim("100Ti"), scratch_claim("500Gi"),
                            scratch_claim("512000Mi"), scratch_claim(None),
                            scratch_claim("lots")]})
    assert violations(job, {}, Policy()) == []
    assert violations(job, {}, Policy(max_ephemeral_claim_size="500Gi")) == [
        "spec.pod.volumes[0]: ephemeral claim of 100Ti is over the cap "
        "(maxEphemeralClaimSize: 500Gi)",
        "spec.pod.volumes[3]: ephemeral claim without resources.requests.storage is not "
        "allowed (maxEphemeralClaimSize: 500Gi)",
        "spec.pod.volumes[4]: ephemeral claim size lots is not a quantity "
        "(maxEphemeralClaimSize: 500Gi)"]


def test_a_malformed_claim_size_cap_is_refused_at_start() -> None:
    with pytest.raises(PolicyError, match=r"maxEphemeralClaimSize: .*not a quantity: 5 Gi"):
        parse_policy(json.dumps({"maxEphemeralClaimSize": "5 Gi"}))
    assert parse_policy('{"maxEphemeralClaimSize": "5Gi"}').max_ephemeral_claim_size == "5Gi"
