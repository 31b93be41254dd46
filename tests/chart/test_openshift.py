"""OpenShift-friendly installs: the platform may assign pod UIDs (restricted-v2 SCC), and owner
references with blockOwnerDeletion need the finalizers permission (rbac.py, the strict
emulator in tests/chart/test_namespaced_mode.py enforces it)."""

from __future__ import annotations

import pytest
from chartlib import CHART, ROOT, example_job, one, operator_env, render
from pss import violations

from kubetune_operator import builders, rbac
from kubetune_operator.builders import Owner
from kubetune_operator.settings import Settings

OPENSHIFT = CHART / "ci" / "openshift-values.yaml"
FIXED = ("runAsUser", "runAsGroup", "fsGroup")


def operator_pod_context(values: object = None) -> dict[str, object]:
    deployment = one(render(values), "Deployment")  # type: ignore[arg-type]
    context: dict[str, object] = deployment["spec"]["template"]["spec"]["securityContext"]
    return context


def test_default_mode_runs_as_the_images_users() -> None:
    context = operator_pod_context()
    assert (context["runAsUser"], context["runAsGroup"]) == (65532, 65532)
    assert operator_env(render())["KUBETUNE_PLATFORM_ASSIGNS_UIDS"] == "false"


def test_platform_assigned_uids_leave_the_operator_pod_without_fixed_ids() -> None:
    context = operator_pod_context(OPENSHIFT)
    assert not set(FIXED) & set(context)
    assert context["runAsNonRoot"] is True and context["seccompProfile"]
    assert operator_env(render(OPENSHIFT))["KUBETUNE_PLATFORM_ASSIGNS_UIDS"] == "true"


@pytest.mark.parametrize(("assigned", "expected"), [(False, True), (True, False)])
def test_trainer_pods_follow_the_setting(assigned: bool, expected: bool) -> None:
    job = example_job(ROOT / "examples" / "tiny-lora.yaml")
    owner = Owner(name="tiny-lora", namespace="ml", uid="u", labels={})
    settings = Settings.from_env({"KUBETUNE_PLATFORM_ASSIGNS_UIDS": str(assigned).lower()})
    pod = builders.build_job(job, owner, 1, settings)["spec"]["template"]["spec"]
    context = pod["securityContext"]
    assert all((key in context) == expected for key in FIXED), context
    assert context["runAsNonRoot"] is True and violations(pod) == []


def test_a_bad_setting_names_the_variable() -> None:
    with pytest.raises(ValueError, match="KUBETUNE_PLATFORM_ASSIGNS_UIDS: expected true or fal"):
        Settings.from_env({"KUBETUNE_PLATFORM_ASSIGNS_UIDS": "sometimes"})


def test_blockowner_deletion_children_need_the_finalizers_permission() -> None:
    assert builders.owner_reference(Owner("x", "ns", "u", {}))["blockOwnerDeletion"] is True
    assert rbac.allows("kubetune.dev", "finetunejobs/finalizers", "update")
    for objects in (render(), render(OPENSHIFT)):
        rules = [r for role in objects if role["kind"] in ("ClusterRole", "Role")
                 for r in role["rules"]]
        assert any("finetunejobs/finalizers" in r["resources"] and "update" in r["verbs"]
                   for r in rules)


def test_trainer_images_work_under_an_arbitrary_uid() -> None:
    """Writable paths belong to group 0 and are group-writable: OpenShift runs the image with
    a random UID and GID 0."""
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / "trainer_image" / name).read_text()
        assert "chown 1000:0 /home/kubetune /opt/kubetune/out" in text, name
        assert "chmod g=u /home/kubetune /opt/kubetune/out" in text, name
